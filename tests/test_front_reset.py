"""A front that dies with the supervisor's messages unread (it failed before
reading any, as one that cannot open its serial port does): what it sent before
(its PortFailed, the reason to print) is still read, then its EOF."""

from __future__ import annotations

import pytest

from bridged.config import default_config
from bridged.ipc.control import send_message, socketpair
from bridged.ipc.messages import PortFailed, WorkerStarted
from bridged.supervisor import Supervisor

pytestmark = pytest.mark.timeout(30)


def test_the_port_failure_is_read_past_the_reset(tmp_path):
    """The kernel reports ECONNRESET first (our WorkerStarted died unread), then
    the PortFailed; the supervisor keeps its reason and sees the EOF after it."""
    sup = Supervisor(default_config(), "", None, tmp_path)
    ours, theirs = socketpair()
    sup.sup_sock = ours
    try:
        send_message(theirs, PortFailed("/dev/ttyX is in use by another process (locked); stop it"))
        send_message(ours, WorkerStarted(0, 1234))  # never read by the front
        theirs.close()
        sup._drain_front_messages()
        assert sup._port_failure == "/dev/ttyX is in use by another process (locked); stop it"
        assert sup._front_eof
    finally:
        ours.close()
