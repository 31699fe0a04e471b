"""The supervisor never waits on a child: a front that stops reading its
channel does not hold it (its announcements of new workers wait, signals and
liveness go on), and a worker that outlives its front is killed so that the
session comes back."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import stat
import time

from tests.harness import Daemon

_SYS_PIDFD_GETFD = 438  # the same number on every architecture (the unified syscall table)
_DIED = {"child_died", "child_unresponsive", "worker_outlived_front"}


def _supervisor_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])  # field 4, ppid


def _shrink_send_buffers(pid: int) -> int:
    """Make the send buffer of each connected SEQPACKET socket of process ``pid``
    (its channels to its children) the smallest the kernel allows: a handful of
    messages fill it, where ~278 pings would by default.  Returns how many."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    shrunk = 0
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            assert fd >= 0, os.strerror(ctypes.get_errno())
            assert stat.S_ISSOCK(os.fstat(fd).st_mode)
            with socket.socket(fileno=fd) as sock:  # our copy: the socket itself is shared
                if sock.type == socket.SOCK_SEQPACKET and sock.family == socket.AF_UNIX:
                    try:
                        sock.getpeername()
                    except OSError:
                        continue
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
                    shrunk += 1
    finally:
        os.close(pidfd)
    return shrunk


def _stop_front_and_fill_its_channel(daemon: Daemon, timeout: float) -> int:
    """SIGSTOP the front, then kill link workers until an announcement of a new
    one finds the front's channel full; the front's pid."""
    front = daemon.wait_event("child_started", role="front")[-1]["pid"]
    assert _shrink_send_buffers(_supervisor_of(front)) >= 1
    os.kill(front, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while not daemon.events("worker_announcement_deferred"):
        assert time.monotonic() < deadline, daemon.log_text()[-3000:]
        for link_id in range(5):
            try:
                os.kill(daemon.worker_pid(link_id), signal.SIGKILL)
            except ProcessLookupError:
                pass  # killed already, not restarted yet
        time.sleep(0.1)
    return front


def test_a_front_that_does_not_read_does_not_hold_the_supervisor(make_daemon):
    """With the front stopped and its channel full (workers restarting meanwhile),
    the supervisor still answers SIGTERM at once and exits 0."""
    # 100 missed 0.1 s heartbeats: liveness leaves the front alone for 10 s.
    daemon = make_daemon("[watchdog]\nheartbeat_ms = 100\nmissed_heartbeats = 100\n")
    daemon.expected_errors |= _DIED
    daemon.host().boot()
    _stop_front_and_fill_its_channel(daemon, timeout=5)
    asked = time.monotonic()
    assert daemon.stop(timeout=9) == 0
    assert time.monotonic() - asked < 8  # the front's 1 s to stop, the workers' 4 s at most
    assert not daemon.events("child_unresponsive")  # it was SIGTERM, not liveness, that ended it


def test_a_stuck_front_with_a_full_channel_is_aborted_and_the_session_returns(make_daemon, echo_server):
    """The default heartbeats: the front stopped with its channel full misses
    its pings, is aborted, and a new front says ready and gets every worker."""
    daemon = make_daemon()
    daemon.expected_errors |= _DIED
    host = daemon.host()
    host.boot()
    front = _stop_front_and_fill_its_channel(daemon, timeout=2.5)
    host.expect(b"\r\nready\r\n", timeout=20)
    event = daemon.wait_event("child_unresponsive", role="front")[0]
    assert event["pid"] == front
    host.command(b"AT+CIPMUX=1")
    for link_id in range(5):
        host.command(b'AT+CIPSTART=%d,"TCP","127.0.0.1",%d' % (link_id, echo_server.port), timeout=15)
    host.send_data(b"AT+CIPSEND=4,5", b"hello")
    assert host.read_ipd() == (4, b"hello")
    host.close()


def test_a_worker_that_outlives_its_front_is_killed_and_the_session_returns(make_daemon):
    """A worker that does not end with its front (stopped here, its heartbeats
    60 s apart so liveness does not act first) gets SIGKILL 4 s after the
    front's death, and the new front says ready."""
    daemon = make_daemon("[watchdog]\nheartbeat_ms = 60000\n")
    daemon.expected_errors |= _DIED
    host = daemon.host()
    host.boot()
    front = daemon.wait_event("child_started", role="front")[-1]["pid"]
    stuck = daemon.worker_pid(2)
    os.kill(stuck, signal.SIGSTOP)
    os.kill(front, signal.SIGKILL)
    killed = time.monotonic()
    host.expect(b"\r\nready\r\n", timeout=12)
    assert 3.5 < time.monotonic() - killed  # not before the grace
    event = daemon.wait_event("worker_outlived_front")[0]
    assert (event["pid"], event["link_id"], event["seconds"]) == (stuck, 2, 4.0)
    assert not daemon.events("child_unresponsive")
    assert host.ask(b"AT").endswith(b"\r\nOK\r\n")
    host.close()
