"""What each of a daemon's processes holds, read from /proc: for the soak
tests (tests/integration/test_soak.py) and ``python -m bench.soak``.

A process that runs for years must hold as much after a million link
cycles as after the first few: descriptors, threads and memory mappings are
counted exactly; resident memory is read too, but an allocator keeps freed
memory and grows in steps, so it is compared against a bound.  The rings
are memfd blocks (bridged.ipc.memblock) with no name in /dev/shm; a
/dev/shm entry any daemon process holds or maps (a POSIX semaphore or
shared_memory block someone adds later) is counted per process as well.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

__all__ = ["Footprint", "footprint", "processes", "sample", "growth", "table"]

@dataclass(frozen=True)
class Footprint:
    """One process at one moment."""

    fds: int
    threads: int
    maps: int  # lines of /proc/<pid>/maps
    named: int  # of those, mappings of a file, memfd or /dev/shm entry (a path, not [heap] or anonymous)
    rss_kib: int  # resident: anonymous (the heap) + file + shared memory (the rings' pages)
    anon_kib: int  # RssAnon: what a leak of Python objects or buffers grows
    shm: frozenset[str]  # /dev/shm entries it holds open or maps


def footprint(pid: int) -> Footprint:
    """``pid``'s footprint now (FileNotFoundError if it is gone)."""
    shm: set[str] = set()
    with open(f"/proc/{pid}/maps") as f:
        maps = named = 0
        for line in f:
            maps += 1
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                named += 1
                if fields[5].startswith("/dev/shm/"):
                    shm.add(fields[5].strip())
    fds = os.listdir(f"/proc/{pid}/fd")
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
        if target.startswith("/dev/shm/"):
            shm.add(target)
    with open(f"/proc/{pid}/status") as f:
        status = {k: v.split()[0] for k, _, v in (line.partition(":") for line in f) if v.strip()}
    return Footprint(len(fds), int(status["Threads"]), maps, named, int(status["VmRSS"]), int(status["RssAnon"]),
                     frozenset(shm))


def processes(daemon, links: int = 5) -> dict[str, int]:
    """role -> pid of a tests.harness.Daemon's processes now: supervisor, front, link0..."""
    roles = {"supervisor": daemon.proc.pid, "front": daemon.front_pid()}
    roles.update({f"link{k}": daemon.worker_pid(k) for k in range(links)})
    return roles


def sample(roles: dict[str, int], settle: float = 0.3, timeout: float = 5.0) -> dict[str, Footprint]:
    """Every process's footprint, once their descriptor counts hold still for ``settle`` s.

    A link closed the instant before still has its socket's last close, or a
    worker's stats answer, in flight; a stable count is what the process
    holds, not a moment inside a cycle.
    """
    deadline = time.monotonic() + timeout
    last = {role: footprint(pid) for role, pid in roles.items()}
    while True:
        time.sleep(settle)
        now = {role: footprint(pid) for role, pid in roles.items()}
        same = all((now[r].fds, now[r].threads, now[r].shm) == (last[r].fds, last[r].threads, last[r].shm)
                   for r in roles)
        if same or time.monotonic() > deadline:
            return now
        last = now


def growth(before: dict[str, Footprint], after: dict[str, Footprint]) -> dict[str, dict[str, int]]:
    """role -> {fds, threads, maps, named, rss_kib, anon_kib, shm}: what ``after`` holds more than ``before``."""
    out = {}
    for role, b in before.items():
        a = after[role]
        out[role] = {"fds": a.fds - b.fds, "threads": a.threads - b.threads, "maps": a.maps - b.maps,
                     "named": a.named - b.named,
                     "rss_kib": a.rss_kib - b.rss_kib, "anon_kib": a.anon_kib - b.anon_kib,
                     "shm": len(a.shm - b.shm)}
    return out


def table(samples: dict[str, Footprint]) -> str:
    """One line per process: role, fds, threads, mappings (all, named), RSS (all, anonymous), /dev/shm entries."""
    lines = [f"{'process':<11}{'fds':>5}{'threads':>8}{'maps':>6}{'named':>6}{'RSS KiB':>9}{'anon KiB':>9}{'shm':>5}"]
    for role, f in samples.items():
        lines.append(f"{role:<11}{f.fds:>5}{f.threads:>8}{f.maps:>6}{f.named:>6}{f.rss_kib:>9}{f.anon_kib:>9}"
                     f"{len(f.shm):>5}")
    return "\n".join(lines)
