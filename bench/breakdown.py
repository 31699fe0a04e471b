"""Where the CPU goes at line rate over five links: per process, per direction.

Not a comparison with socat (``line_rate`` is): a tool for finding what to
make cheaper.  Five TCP links to peers on 127.0.0.1, for ``seconds`` each
case:

* ``up``: ``AT+CIPSEND=<id>,<chunk>`` sends paced to 0.1 MB/s per link
  (one command at a time on the serial line), peers send nothing;
* ``down``: each peer sends 1 KiB pieces paced to 0.1 MB/s, arriving as
  ``+IPD,<id>,<len>:`` frames; no uplink;
* ``both``: both at once (the line-rate case);
* ``passthrough``: one link in passthrough (``AT+CIPMODE=1``), the client
  writing 1 KiB pieces to the pty at 0.5 MB/s while the peer sends 1 KiB
  pieces at 0.5 MB/s (``bench.line_rate``'s passthrough case).

Printed per process of the daemon (front, link workers): CPU milliseconds per
second (schedstat) and voluntary context switches (wake-ups) per second.
Every byte is hash-checked both ways, as in the other benchmarks.

Run: ``.venv/bin/python -m bench.breakdown [seconds] [chunk] [cases]`` (defaults
8, 2048, ``up,down,both,passthrough``).
"""

from __future__ import annotations

import contextlib
import sys

import psutil

from .common import HashMismatch, _threads_runtime, now
from .line_rate import RATE as LINE_RATE
from .streams import (
    Bridge,
    DuplexPeer,
    PacedWriter,
    check_downlinks,
    daemon_with_peers,
    make_payload,
    paced_cipsends,
    read_raw,
    wait_both_ways,
)

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


def _processes(root_pid: int) -> dict[int, str]:
    """The daemon's processes by name: front first, then the workers."""
    root = psutil.Process(root_pid)
    procs = [p for p in root.children(recursive=True)
             if "resource_tracker" not in " ".join(p.cmdline())]
    names = {p.pid: ("front" if i == 0 else f"worker {i - 1}") for i, p in enumerate(procs)}
    names[root.pid] = "supervisor"
    return names


def _rows(names: dict[int, str], before: dict, after: dict, elapsed: float) -> list[tuple[str, float, float]]:
    rows = []
    total = 0.0
    for pid, name in names.items():
        if pid in before and pid in after:
            cpu = after[pid][0] - before[pid][0]
            total += cpu
            rows.append((name, cpu * 1000 / elapsed, (after[pid][1] - before[pid][1]) / elapsed))
    rows.append(("all", total * 1000 / elapsed, 0.0))
    return rows


def run_passthrough(seconds: float) -> list[tuple[str, float, float]]:
    """[(process, CPU ms per s, wake-ups per s)] for one passthrough link at line rate."""
    n = int(LINE_RATE * seconds)
    up, up_digest = make_payload(n)
    down, down_digest = make_payload(n)
    limit = seconds * 3 + 10
    with DuplexPeer(payload=down, rate=LINE_RATE, piece=PIECE, send_timeout=limit) as peer, \
            Bridge("bridged", peer.port, wait_connected=peer.connected.wait) as b:
        names = _processes(b.pid)
        writer = PacedWriter(b.client, up, PIECE, LINE_RATE, limit)
        before = _sample(list(names))
        t0 = now()
        peer.go.set()
        writer.start()
        got, _ = read_raw(b.client, n, limit, "breakdown passthrough downlink")
        writer.join_checked(limit)
        peer.check_rx("breakdown passthrough uplink", n, up_digest, limit)
        elapsed = now() - t0
        after = _sample(list(names))
        if got != down_digest:
            raise HashMismatch(f"breakdown passthrough downlink: sha256 {got}, the peer sent {down_digest}")
    return _rows(names, before, after, elapsed)


def run_case(mode: str, seconds: float, chunk: int) -> list[tuple[str, float, float]]:
    """[(process, CPU ms per s, wake-ups per s)] for one case; total last."""
    up, down = mode in ("up", "both"), mode in ("down", "both")
    n = int(RATE * seconds)
    ups = [make_payload(n if up else 0) for _ in range(LINKS)]
    downs = [make_payload(n if down else 0) for _ in range(LINKS)]
    limit = seconds * 3 + 10
    with contextlib.ExitStack() as stack:
        peers, d, demux = daemon_with_peers(stack, [dn[0] for dn in downs], limit, rate=RATE, piece=PIECE)
        names = _processes(d.pid)
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
    return _rows(names, before, after, elapsed)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 8.0
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    cases = sys.argv[3].split(",") if len(sys.argv) > 3 else ["up", "down", "both", "passthrough"]
    for mode in cases:
        if mode == "passthrough":
            rows = run_passthrough(seconds)
            print("passthrough (one link; 1 KiB pieces at 0.5 MB/s each way), hashes match:")
        else:
            rows = run_case(mode, seconds, chunk)
            print(f"{mode} (AT+CIPSEND=<id>,{chunk}; 1 KiB pieces; 0.1 MB/s per link each way), hashes match:")
        for name, ms, wakes in rows:
            wake = f"  {wakes:5.0f} wake-ups/s" if name != "all" else ""
            print(f"  {name:10s} {ms:6.1f} ms CPU/s{wake}")


if __name__ == "__main__":
    main()
