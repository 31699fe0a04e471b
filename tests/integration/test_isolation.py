"""Each process holds only its own: a link worker maps its own two rings and
no other, holds its own doorbells, control socket and heartbeat channel, and
nothing of the other links, the pty, the control socket (`bridged status`)
or the supervisor; also when it is forked again."""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass

from tests.harness import Daemon

LINKS = 5
_RING = re.compile(r"/memfd:(bridged-link\d+-(?:up|down))(?: \(deleted\))?$")


@dataclass(frozen=True)
class Held:
    """What one process can reach: shared mappings and descriptors, by identity."""

    rings: dict[str, int]  # ring label -> inode of its shared mapping (/proc/<pid>/maps)
    ring_fds: frozenset[str]  # ring labels among the fds
    eventfds: frozenset[int]  # eventfd-id of every eventfd (doorbells and loop internals)
    sockets: frozenset[int]  # socket inodes
    pipes: frozenset[int]  # pipe inodes
    ttys: frozenset[str]  # /dev/ptmx, /dev/pts/N


def held(pid: int) -> Held:
    rings: dict[str, int] = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and (m := _RING.match(fields[5].strip())):
                assert fields[1][3] == "s", line  # shared, not a private copy
                rings[m.group(1)] = int(fields[4])
    ring_fds, eventfds, sockets, pipes, ttys = set(), set(), set(), set(), set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = open(f"/proc/{pid}/fdinfo/{fd}").read() if target == "anon_inode:[eventfd]" else ""
        except FileNotFoundError:
            continue  # closed meanwhile
        if m := _RING.match(target):
            ring_fds.add(m.group(1))
        elif m := re.fullmatch(r"(socket|pipe):\[(\d+)\]", target):
            (sockets if m.group(1) == "socket" else pipes).add(int(m.group(2)))
        elif target == "/dev/ptmx" or target.startswith("/dev/pts/"):
            ttys.add(target)
        elif info:
            found = re.search(r"eventfd-id:\s*(\d+)", info)
            eventfds.add(int(found.group(1)) if found else -int(fd))  # old kernels: fd number, never shared
    return Held(rings, frozenset(ring_fds), frozenset(eventfds), frozenset(sockets), frozenset(pipes),
                frozenset(ttys))


def own_rings(link_id: int) -> set[str]:
    return {f"bridged-link{link_id}-up", f"bridged-link{link_id}-down"}


def listener_inode(path: str) -> int:
    """The socket inode of the AF_UNIX socket listening at ``path`` (/proc/net/unix)."""
    with open("/proc/net/unix") as f:
        for line in f:
            fields = line.split()
            if len(fields) == 8 and fields[7] == path and fields[5] == "01":
                return int(fields[6])
    raise AssertionError(f"nobody listens at {path}")


def check_isolation(daemon: Daemon) -> None:
    """Every worker holds its own link's objects only; the front holds every
    ring and, of the supervisor's sockets, only the control socket's listener
    (not a worker's heartbeat channel)."""
    supervisor = held(daemon.proc.pid)
    front = held(daemon.wait_event("child_started", role="front")[-1]["pid"])
    workers = [held(daemon.worker_pid(k)) for k in range(LINKS)]
    everything = set().union(*(own_rings(k) for k in range(LINKS)))
    assert set(front.rings) == everything
    assert front.ttys, "the front holds the pty"
    assert not front.pipes & supervisor.pipes, "the front holds the supervisor's wake-up pipe"
    assert front.sockets & supervisor.sockets == {listener_inode(str(daemon.state_dir / "control.sock"))}
    for k, worker in enumerate(workers):
        assert set(worker.rings) == own_rings(k), (k, worker.rings)
        assert all(worker.rings[label] == front.rings[label] for label in worker.rings)  # the same blocks
        assert worker.ring_fds <= own_rings(k), (k, worker.ring_fds)
        doorbells = worker.eventfds & front.eventfds
        assert len(doorbells) == 4, (k, worker.eventfds, front.eventfds)  # two rings, two doorbells each
        assert worker.eventfds & supervisor.eventfds == doorbells
        assert not worker.ttys, (k, worker.ttys)
        assert not worker.pipes & supervisor.pipes, k
        # Its control socket's and heartbeat channel's other ends are other
        # inodes: nothing shared with the front or the supervisor, so no
        # other worker's channel and not the control socket's listener.
        assert not worker.sockets & (front.sockets | supervisor.sockets), k
        for j, other in enumerate(workers):
            if j != k:
                assert not worker.eventfds & other.eventfds, (k, j)
                assert not worker.sockets & other.sockets, (k, j)


def test_each_worker_holds_only_its_own_link(make_daemon, echo_server):
    """/proc/<pid>/maps and /proc/<pid>/fd of every process: a worker maps and
    holds only its own rings, doorbells and sockets, before and after it is
    killed and forked again while another link has a connection open."""
    daemon = make_daemon()
    host = daemon.host()
    host.boot()  # `ready` comes once every worker said Hello, i.e. has set itself up
    check_isolation(daemon)

    host.command(b"AT+CIPMUX=1")
    assert host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % echo_server.port).endswith(b"OK\r\n")
    old = daemon.worker_pid(2)
    os.kill(old, signal.SIGKILL)
    daemon.expected_errors |= {"child_died", "worker_died"}
    deadline = time.monotonic() + 10
    while daemon.worker_pid(2) == old:
        assert time.monotonic() < deadline, "worker 2 was not forked again"
        time.sleep(0.02)
    # AT+CIPSTART waits for the new worker's Hello: once it answers, the worker is set up.
    assert host.ask(b'AT+CIPSTART=2,"TCP","127.0.0.1",%d' % echo_server.port).endswith(b"OK\r\n")
    check_isolation(daemon)
    host.close()


def _footprint(pid: int) -> tuple[int, int]:
    """(open descriptors, lines of ring mappings) of a process."""
    with open(f"/proc/{pid}/maps") as f:
        mapped = sum(1 for line in f if "/memfd:bridged-" in line)
    return len(os.listdir(f"/proc/{pid}/fd")), mapped


def _wait_ready_worker(daemon: Daemon, link_id: int, old: int) -> int:
    """Wait until link_id's worker is not ``old`` and the front has its Hello; its pid."""
    deadline = time.monotonic() + 20
    while (pid := daemon.worker_pid(link_id)) == old or not any(
            e.get("pid") == pid for e in daemon.events("worker_ready")):
        assert time.monotonic() < deadline, f"worker {link_id} was not forked again and ready"
        time.sleep(0.02)
    return pid


def test_thirty_restarts_leak_no_descriptor_or_mapping(make_daemon):
    """Link workers killed 30 times over (with their restart backoff) and the
    front three times: the supervisor and the front hold as many descriptors
    and ring mappings as at the start, and a new front as many as the first."""
    daemon = make_daemon()
    daemon.expected_errors |= {"child_died", "worker_died"}
    host = daemon.host()
    host.boot()
    supervisor = daemon.proc.pid
    front = daemon.wait_event("child_started", role="front")[-1]["pid"]
    daemon.wait_event("worker_ready", count=LINKS)
    before = {"supervisor": _footprint(supervisor), "front": _footprint(front)}
    for _ in range(6):
        pids = [daemon.worker_pid(k) for k in range(LINKS)]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for k, pid in enumerate(pids):
            _wait_ready_worker(daemon, k, pid)
    assert len(daemon.events("child_died")) == 30
    assert {"supervisor": _footprint(supervisor), "front": _footprint(front)} == before
    for _ in range(3):
        os.kill(front, signal.SIGKILL)
        host.expect(b"\r\nready\r\n", timeout=20)
        front = daemon.wait_event("child_started", role="front")[-1]["pid"]
        assert {"supervisor": _footprint(supervisor), "front": _footprint(front)} == before
    host.close()
