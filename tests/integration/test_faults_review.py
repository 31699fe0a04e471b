"""Hostile-review regressions for the fault injection: floods, bounds, replays."""

from __future__ import annotations

import socket
import time

import pytest

from tests.integration.test_faults_net import _boot, _faults, _free_port, _start
from tests.integration.test_status import status_json

pytestmark = pytest.mark.timeout(120)


def test_a_udp_flood_under_loss_is_counted_but_not_logged_per_datagram(make_daemon):
    """net_udp_loss at every datagram of a 2000-datagram flood: status counts each, the log has a few lines."""
    daemon, host = _boot(make_daemon, _faults(5, net_udp_loss={"rate": 1, "link": 0}))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    local = _free_port(socket.SOCK_DGRAM)
    assert _start(host, 0, "UDP", peer.getsockname()[1], b",%d" % local) == b"0,CONNECT\r\n\r\nOK\r\n"
    try:
        for i in range(2000):
            peer.sendto(b"%04d" % i, ("127.0.0.1", local))
            if i % 100 == 99:
                time.sleep(0.01)  # within the socket's receive buffer
    finally:
        peer.close()
    time.sleep(2.5)  # the last batch is reported within a second
    counted = status_json(daemon)["faults"]["counts"]["net_udp_loss"]
    lines = [e for e in daemon.events("fault_injected") if e.get("name") == "net_udp_loss"]
    assert counted > 500  # the kernel may drop some of the flood itself
    assert 1 <= len(lines) <= 5, len(lines)
    assert sum(e.get("hits", 1) for e in lines) == counted
