"""A link worker the front refused (its downlink ring holds no record) that does
not exit at its control socket's EOF -- a hostile one -- is killed by the
supervisor, and the link id gets a new worker."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.integration.test_corrupt_downlink import _poison
from tests.integration.test_passive import server  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(60)

# Heartbeats too slow to act within the test: only the refusal can end the worker.
_NO_LIVENESS = "[watchdog]\nheartbeat_ms = 60000\n"


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.02)
    return False


def test_a_refused_worker_that_ignores_its_eof_is_killed_and_replaced(make_daemon, server):  # noqa: F811
    """A stopped worker (it neither exits at EOF nor answers: the stand-in for a
    hostile one) whose ring the front refuses is SIGKILLed by the supervisor within
    2 s (worker_killed_refused), a new worker says Hello and AT+CIPSTART on link 0 works."""
    daemon = make_daemon(_NO_LIVENESS)
    daemon.expected_errors |= {"downlink_refused", "worker_died", "worker_killed_refused", "child_died"}
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPRECVTYPE=0,1")
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % server.getsockname()[1])
    conn, _ = server.accept()
    daemon.wait_event("worker_ready", link_id=0)
    pid = daemon.worker_pid(0)
    os.kill(pid, signal.SIGSTOP)
    try:
        _poison(pid, "link0-down", b"\xff\xff\xff\x7f\x00\x00\x01\x00")
        host.write(b"AT+CIPRECVLEN?\r\n")
        host.expect(b"0,CLOSED\r\n", timeout=10)
        daemon.wait_event("downlink_refused", link_id=0)
        assert _gone(pid, 2.0), f"the refused worker {pid} still lives"
        daemon.wait_event("worker_killed_refused", link_id=0, pid=pid)
        daemon.wait_event("worker_ready", count=2, link_id=0, timeout=5)
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGCONT)  # without the fix: let the daemon's stop end it
    conn.close()
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % server.getsockname()[1], timeout=10)
    again, _ = server.accept()
    again.sendall(b"fresh")
    host.expect(b"+IPD,0,5\r\n", timeout=5)  # passive: a notice, then the read
    assert host.command(b"AT+CIPRECVDATA=0,64").find(b"fresh") >= 0
    again.close()
