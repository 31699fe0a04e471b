"""Where the CPU goes at line rate over five links: per process, per direction.

Not a comparison with socat (``line_rate`` is): a tool for finding what to
make cheaper.  Five TCP links to peers on 127.0.0.1, for ``seconds`` each
case:

* ``up``: ``AT+CIPSEND=<id>,<chunk>`` sends paced to 0.1 MB/s per link
  (one command at a time on the serial line), peers send nothing;
* ``down``: each peer sends 1 KiB pieces paced to 0.1 MB/s, arriving as
  ``+IPD,<id>,<len>:`` frames; no uplink;
* ``both``: both at once (the line-rate case).

Printed per process of the daemon (front, link workers): CPU milliseconds per
second (schedstat) and voluntary context switches (wake-ups) per second.
Every byte is hash-checked both ways, as in the other benchmarks.

Run: ``.venv/bin/python -m bench.breakdown [seconds] [chunk]`` (defaults 8, 2048).
"""

from __future__ import annotations

import contextlib
import sys

import psutil

from .common import _threads_runtime, now
from .streams import check_downlinks, daemon_with_peers, make_payload, paced_cipsends, wait_both_ways

LINKS = 5
RATE = 100_000  # bytes/s per link each way: 0.5 MB/s over five links
PIECE = 1024
STEP_TIMEOUT = 10.0


def _sample(pids: list[int]) -> dict[int, tuple[float, int]]:
    out = {}
    for pid in pids:
        runtime = _threads_runtime(pid) or {}
        try:
            switches = psutil.Process(pid).num_ctx_switches().voluntary
        except psutil.Error:
            continue
        out[pid] = (sum(runtime.values()) / 1e9, switches)
    return out


def run_case(mode: str, seconds: float, chunk: int) -> list[tuple[str, float, float]]:
    """[(process, CPU ms per s, wake-ups per s)] for one case; total last."""
    up, down = mode in ("up", "both"), mode in ("down", "both")
    n = int(RATE * seconds)
    ups = [make_payload(n if up else 0) for _ in range(LINKS)]
    downs = [make_payload(n if down else 0) for _ in range(LINKS)]
    limit = seconds * 3 + 10
    with contextlib.ExitStack() as stack:
        peers, d, demux = daemon_with_peers(stack, [dn[0] for dn in downs], limit, rate=RATE, piece=PIECE)
        root = psutil.Process(d.pid)
        procs = [p for p in root.children(recursive=True)
                 if "resource_tracker" not in " ".join(p.cmdline())]
        names = {p.pid: ("front" if i == 0 else f"worker {i - 1}") for i, p in enumerate(procs)}
        names[root.pid] = "supervisor"
        before = _sample(list(names))
        t0 = now()
        for p in peers:
            p.go.set()
        paced_cipsends(demux, [u[0] for u in ups], RATE, chunk, t0 + limit, f"breakdown {mode}",
                       STEP_TIMEOUT)
        wait_both_ways(demux, peers, ups, downs, f"breakdown {mode}", max(t0 + limit - now(), 10.0))
        elapsed = now() - t0
        after = _sample(list(names))
        check_downlinks(demux, downs, f"breakdown {mode}")
    rows = []
    total = 0.0
    for pid, name in names.items():
        if pid in before and pid in after:
            cpu = after[pid][0] - before[pid][0]
            total += cpu
            rows.append((name, cpu * 1000 / elapsed, (after[pid][1] - before[pid][1]) / elapsed))
    rows.append(("all", total * 1000 / elapsed, 0.0))
    return rows


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 8.0
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    for mode in ("up", "down", "both"):
        rows = run_case(mode, seconds, chunk)
        print(f"{mode} (AT+CIPSEND=<id>,{chunk}; 1 KiB pieces; 0.1 MB/s per link each way), hashes match:")
        for name, ms, wakes in rows:
            wake = f"  {wakes:5.0f} wake-ups/s" if name != "all" else ""
            print(f"  {name:10s} {ms:6.1f} ms CPU/s{wake}")


if __name__ == "__main__":
    main()
