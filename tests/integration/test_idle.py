"""An idle daemon sleeps: the supervisor waits for its next deadline, not on
a poll, and no process wakes more than its heartbeat needs (bench.idle
measures the same by hand)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.harness import Daemon

WINDOW = 2.0  # seconds measured
MAX_WAKEUPS = 5.0  # per second and process: a heartbeat each is 1-2; the old 0.1 s poll was 10+


def wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid``: one per sleep."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        total += int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return total


def cpu_seconds(pid: int) -> float:
    """Time on CPU of every thread of ``pid`` (schedstat, nanoseconds)."""
    return sum(int((task / "schedstat").read_text().split()[0])
               for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9


def processes(daemon: Daemon) -> dict[str, int]:
    """Role -> pid: the supervisor, the front and every link worker (latest started)."""
    pids = {"supervisor": daemon.proc.pid}
    for event in daemon.events("child_started"):
        role = event["role"] if event["role"] == "front" else f"link {event['link_id']}"
        pids[role] = event["pid"]
    return pids


def test_an_idle_daemon_sleeps_between_heartbeats(make_daemon, echo_server):
    """With a link open and nothing moving, each process (the supervisor too)
    wakes fewer than 5 times a second: a 0.1 s poll or a needless timer
    would show 10 or more."""
    daemon = make_daemon()
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % echo_server.port)
    pids = processes(daemon)
    assert len(pids) == 2 + 5, pids  # supervisor, front, the default profile's 5 links
    time.sleep(0.5)  # the commands' own wake-ups are over
    before = {role: wakeups(pid) for role, pid in pids.items()}
    t0 = time.monotonic()
    time.sleep(WINDOW)
    rates = {role: (wakeups(pid) - before[role]) / (time.monotonic() - t0) for role, pid in pids.items()}
    assert all(rate < MAX_WAKEUPS for rate in rates.values()), rates
    # And the link still works.
    host.send_data(b"AT+CIPSEND=0,4", b"ping")
    assert host.read_ipd() == (0, b"ping")
    host.close()


def test_a_supervisor_waiting_on_a_stuck_worker_sleeps_then_restarts_the_session(make_daemon):
    """The front dies while a worker is stopped: the new front waits for that
    worker's end (liveness kills it after 3 missed 0.5 s heartbeats), the
    supervisor sleeping meanwhile, not spinning on the dead front's channel;
    then the session comes back (ready, AT answered)."""
    daemon = make_daemon("[watchdog]\nheartbeat_ms = 500\nmissed_heartbeats = 3\n")
    daemon.expected_errors |= {"child_died", "child_unresponsive"}
    host = daemon.host()
    host.boot()
    pids = processes(daemon)
    supervisor = pids["supervisor"]
    os.kill(pids["link 2"], signal.SIGSTOP)
    os.kill(pids["front"], signal.SIGKILL)
    daemon.wait_event("child_died", role="front")
    cpu, t0 = cpu_seconds(supervisor), time.monotonic()
    time.sleep(0.8)  # the stopped worker is not killed before 1.5 s
    assert not daemon.events("child_unresponsive")
    busy = (cpu_seconds(supervisor) - cpu) / (time.monotonic() - t0)
    assert busy < 0.2, f"the supervisor was on the CPU {busy:.0%} of the time"
    daemon.wait_event("child_unresponsive", role="link", link_id=2)
    host.expect(b"\r\nready\r\n", timeout=20)
    assert host.ask(b"AT").endswith(b"\r\nOK\r\n")
    host.close()
