"""The supervisor sleeps until its next deadline: each thing the old 0.1 s
poll noticed must still wake it on time.  The heartbeat is set to 60 s here,
so that a missed wake-up is not hidden by the next liveness tick."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil

from tests.harness import Daemon, Timeout
from tests.integration.test_idle import cpu_seconds, processes

LONG_TICK = "[watchdog]\nheartbeat_ms = 60000\n"
DIED = {"child_died", "worker_died"}


def _started_after(daemon: Daemon, count: int, timeout: float = 10.0, **fields) -> tuple[dict, float]:
    """The ``count``-th child_started matching ``fields``, and when the test saw it."""
    event = daemon.wait_event("child_started", count=count, timeout=timeout, **fields)[count - 1]
    return event, time.monotonic()


def _children(daemon: Daemon) -> list[psutil.Process]:
    return [p for p in psutil.Process(daemon.proc.pid).children() if p.status() != psutil.STATUS_ZOMBIE]


def _serving(daemon: Daemon, links: int = 5, timeout: float = 10.0) -> None:
    """Until the supervisor has exactly a front and ``links`` workers, none a zombie."""
    deadline = time.monotonic() + timeout
    while len(kids := _children(daemon)) != 1 + links:
        assert time.monotonic() < deadline, kids
        time.sleep(0.05)


def _answers_ok(host) -> bool:
    """Whether AT gets OK within 2 s.  An AT that reached a front the storm's next
    reload replaced is lost with it (as input during a restart is): no answer at all."""
    try:
        return host.ask(b"AT", timeout=2).endswith(b"OK\r\n")
    except Timeout:
        return False


def test_two_workers_killed_at_once_are_both_forked_again_at_once(make_daemon):
    """SIGKILL two workers together: one SIGCHLD (or two) wakes the sleeping
    supervisor and both are forked again within a second, not at the next tick."""
    daemon = make_daemon(LONG_TICK)
    daemon.expected_errors |= DIED
    host = daemon.host()
    host.boot()
    pids = processes(daemon)
    t0 = time.monotonic()
    os.kill(pids["link 1"], signal.SIGKILL)
    os.kill(pids["link 3"], signal.SIGKILL)
    for link_id in (1, 3):
        _, seen = _started_after(daemon, 2, link_id=link_id, role="link")
        assert seen - t0 < 1.0, f"link {link_id} forked again after {seen - t0:.2f} s"
    assert host.ask(b"AT").endswith(b"OK\r\n")
    host.close()


def test_a_killed_front_brings_the_session_back_at_once(make_daemon):
    """SIGKILL the front: its workers are stopped and reaped, a new front says ready
    within a few seconds (the supervisor never waits for a 60 s tick)."""
    daemon = make_daemon(LONG_TICK)
    daemon.expected_errors |= DIED
    host = daemon.host()
    host.boot()
    t0 = time.monotonic()
    os.kill(processes(daemon)["front"], signal.SIGKILL)
    host.expect(b"\r\nready\r\n", timeout=10)
    assert time.monotonic() - t0 < 3.0
    assert host.ask(b"AT").endswith(b"OK\r\n")
    _serving(daemon)
    host.close()


def test_a_backoff_restart_comes_at_its_time_and_sigterm_does_not_wait_for_it(make_daemon):
    """A worker killed four times in a row is forked again after its 1 s backoff (not
    later: nothing else would wake the supervisor for a minute); killed a fifth time,
    its 2 s restart is pending (the supervisor asleep, not spinning) when SIGTERM comes,
    and the daemon stops at once, status 0."""
    daemon = make_daemon(LONG_TICK)
    daemon.expected_errors |= DIED
    host = daemon.host()
    host.boot()
    delays = []
    for n in range(1, 5):  # backoffs 0, 0.25, 0.5, 1.0
        pid = daemon.worker_pid(0)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _, seen = _started_after(daemon, n + 1, link_id=0, role="link")
        delays.append(seen - t0)
    assert 0.9 <= delays[-1] < 1.6, delays
    os.kill(daemon.worker_pid(0), signal.SIGKILL)
    daemon.wait_event("child_died", count=5, link_id=0)
    cpu, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
    time.sleep(0.8)  # the restart is pending: the supervisor sleeps, it does not spin
    busy = (cpu_seconds(daemon.proc.pid) - cpu) / (time.monotonic() - t0)
    assert busy < 0.2, f"the supervisor was on the CPU {busy:.0%} of the time"
    t0 = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - t0 < 1.8
    assert len(daemon.events("child_started")) == 1 + 5 + 4  # the pending restart never happened
    host.close()


def test_a_front_failing_before_ready_ends_the_daemon_with_status_1(tmp_path):
    """A front that dies before ready five times in a row (its backoffs pending
    between) ends the daemon with status 1 and front_keeps_failing, within seconds."""
    daemon = Daemon(tmp_path, LONG_TICK + "[firmware]\nboot_ms = 10000\n").start()
    try:
        t0 = time.monotonic()
        for n in range(1, 6):
            event, _ = _started_after(daemon, n, role="front")
            os.kill(event["pid"], signal.SIGKILL)
        assert daemon.proc.wait(10) == 1
        assert time.monotonic() - t0 < 8
        assert daemon.events("front_keeps_failing")[0]["failures"] == 5
    finally:
        daemon.stop()


def test_a_front_stopped_before_ready_is_killed_and_forked_again(make_daemon):
    """SIGSTOP the front during its boot silence: it misses its heartbeats like any
    stuck child and a new front is forked."""
    daemon = make_daemon("[watchdog]\nheartbeat_ms = 200\nmissed_heartbeats = 2\n[firmware]\nboot_ms = 10000\n")
    daemon.expected_errors |= DIED | {"child_unresponsive"}
    event, _ = _started_after(daemon, 1, role="front")
    os.kill(event["pid"], signal.SIGSTOP)
    assert daemon.wait_event("child_unresponsive", role="front")[0]["pid"] == event["pid"]
    new, _ = _started_after(daemon, 2, role="front")
    assert new["pid"] != event["pid"]


def test_the_watchdog_is_fed_at_its_interval_between_sparse_ticks(make_daemon, notify_socket, monkeypatch):
    """WATCHDOG_USEC 0.4 s with a 60 s heartbeat: WATCHDOG=1 still comes every 0.2 s."""
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    daemon = make_daemon(LONG_TICK)
    daemon.host().boot()
    notify_socket.settimeout(0.5)
    end = time.monotonic() + 2.0
    pings = 0
    while time.monotonic() < end:
        if b"WATCHDOG=1" in notify_socket.recv(4096):
            pings += 1
    assert pings >= 7, pings


def test_a_watchdog_of_the_largest_interval_overflows_nothing(make_daemon, notify_socket, monkeypatch):
    """WATCHDOG_USEC at its largest (2^64-1): the supervisor's sleep stays bounded by
    its other deadlines; the daemon serves, restarts a killed worker and stops with 0."""
    monkeypatch.setenv("WATCHDOG_USEC", str(2**64 - 1))
    daemon = make_daemon()
    daemon.expected_errors |= DIED
    host = daemon.host()
    host.boot()
    os.kill(daemon.worker_pid(2), signal.SIGKILL)
    _started_after(daemon, 2, link_id=2, role="link")
    assert host.ask(b"AT").endswith(b"OK\r\n")
    host.close()


def test_a_storm_of_reloads_leaves_one_session(make_daemon):
    """Twenty SIGHUPs with a changed config, a worker SIGKILLed amid them: the daemon
    ends with one front and five workers, answers AT, and stops with 0."""
    daemon = make_daemon(LONG_TICK)
    daemon.expected_errors |= DIED
    host = daemon.host()
    host.boot()
    daemon.write_config(LONG_TICK + "[log]\nlevel = \"debug\"\n")
    victim = daemon.worker_pid(4)
    for n in range(20):
        os.kill(daemon.proc.pid, signal.SIGHUP)
        if n == 0:
            with contextlib.suppress(ProcessLookupError):  # the reload may have ended it first
                os.kill(victim, signal.SIGKILL)
        time.sleep(0.01)
    daemon.wait_event("reloading")
    _serving(daemon)
    deadline = time.monotonic() + 10
    while not _answers_ok(host):
        assert time.monotonic() < deadline
    _serving(daemon)
    host.close()


def test_a_child_dying_with_sigterm_is_no_failure(make_daemon):
    """A worker SIGKILLed as SIGTERM reaches the supervisor: exit status 0 at once."""
    daemon = make_daemon(LONG_TICK)
    daemon.expected_errors |= DIED
    daemon.host().boot()
    os.kill(daemon.worker_pid(0), signal.SIGKILL)
    t0 = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - t0 < 3


def test_a_reload_to_a_shorter_heartbeat_applies_at_once(make_daemon):
    """From a 60 s heartbeat, a reload to 0.2 s (2 misses) watches the new session at
    once: a worker stopped right after it is aborted within seconds, not after the
    minute the old tick still had to wait."""
    daemon = make_daemon(LONG_TICK)
    daemon.expected_errors |= DIED | {"child_unresponsive"}
    host = daemon.host()
    host.boot()
    daemon.write_config("[watchdog]\nheartbeat_ms = 200\nmissed_heartbeats = 2\n")
    os.kill(daemon.proc.pid, signal.SIGHUP)
    host.expect(b"\r\nready\r\n", timeout=10)
    pid = daemon.worker_pid(1)
    os.kill(pid, signal.SIGSTOP)
    assert daemon.wait_event("child_unresponsive", role="link", link_id=1, timeout=5)[0]["pid"] == pid
    host.close()


def test_a_front_killed_while_a_worker_restart_is_pending_starts_one_session(make_daemon):
    """A worker's 1 s backoff restart is pending when the front is killed: the new
    session forks every worker once (the pending restart is not a second worker 0)
    and serves."""
    daemon = make_daemon(LONG_TICK)
    daemon.expected_errors |= DIED
    host = daemon.host()
    host.boot()
    for n in range(1, 5):  # backoffs 0, 0.25, 0.5, then 1.0: pending
        os.kill(daemon.worker_pid(0), signal.SIGKILL)
        daemon.wait_event("child_died", count=n, link_id=0)
        if n < 4:
            _started_after(daemon, n + 1, link_id=0, role="link")
    os.kill(processes(daemon)["front"], signal.SIGKILL)
    host.expect(b"\r\nready\r\n", timeout=10)
    assert host.ask(b"AT").endswith(b"OK\r\n")
    time.sleep(1.2)  # past the pending restart's time
    _serving(daemon)
    assert len(daemon.events("child_started")) == 1 + 5 + 3 + 1 + 5
    host.close()
