"""``[uart] pace``: the rate a paced pty achieves, both ways, and what it costs.

One link in passthrough (AT+TRANSINTVL=0, so each read goes to the socket at
once), the line set with ``AT+UART_CUR=<baud>,8,1,0,1`` (8N1: 10 bits a
character) before AT+CIPSEND.  Both ways at once, as a UART is full duplex:
the client writes ``n`` random bytes to the pty flat out while the TCP peer on
127.0.0.1 sends ``n`` other random bytes flat out; bridged alone sets the
pace.  Achieved rate each way = ``n`` / (time of the last byte - start), next
to the nominal ``baud / 10`` bytes a second (target: within 2%).  ``n`` is
``seconds`` of line time (2 s at 9600: 1920 bytes).

CPU, at 115200 and 921600 baud: CPU seconds of bridged's front process (the
only one pacing touches) and of the whole daemon tree, per MB moved (both
ways) and per wall second, for three ways of moving the same bytes at the
same rate over the same kind of pty:

* ``paced``: bridged with ``pace = true``, writers flat out (above);
* ``unpaced``: bridged with ``pace = false``, the writers paced by the
  benchmark (token buckets at ``baud / 10`` bytes a second, 5 ms pieces);
* ``socat``: socat PTY <-> TCP, the writers paced the same way.

Every transfer is hash-checked both ways.  Run: ``.venv/bin/python -m
bench.pacing [--runs N] [--seconds S]``; prints every run, then the medians.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import psutil

from .common import MB, BenchError, HashMismatch, _threads_runtime, median, now
from .streams import Bridge, DuplexPeer, PacedWriter, make_payload, read_raw

__all__ = ["run", "BAUDS", "CPU_BAUDS"]

BAUDS = (9600, 115200, 921600, 3_000_000)
CPU_BAUDS = (115200, 921600)
BITS = 10  # 8N1


class _LineBridge(Bridge):
    """Bridge in passthrough with the line set to ``baud`` first (AT+UART_CUR)."""

    def __init__(self, baud: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.baud = baud

    def _open_link(self) -> None:
        self.client.expect(b"AT+UART_CUR=%d,8,1,0,1\r\n" % self.baud, b"\r\nOK\r\n")
        super()._open_link()


class _FrontCpu:
    """CPU seconds of the daemon's front (its supervisor's first child, as bench.breakdown)."""

    def __init__(self, pid: int) -> None:
        children = [p for p in psutil.Process(pid).children()
                    if "resource_tracker" not in " ".join(p.cmdline())]
        self.pid = min(children, key=lambda p: p.create_time()).pid if children else pid
        self._before = 0.0

    def _now(self) -> float:
        return sum((_threads_runtime(self.pid) or {}).values()) / 1e9

    def start(self) -> None:
        self._before = self._now()

    def stop(self) -> float:
        return self._now() - self._before


def one(kind: str, baud: int, seconds: float) -> dict[str, float]:
    """Move ``seconds`` of line time both ways; ``kind``: paced, unpaced or socat."""
    rate = baud / BITS
    n = max(64, int(rate * seconds))
    up, up_digest = make_payload(n)
    down, down_digest = make_payload(n)
    bench_paces = kind != "paced"
    piece = max(16, int(rate * 0.005)) if bench_paces else 4096
    limit = seconds * 3 + 10
    who = f"pacing {kind} {baud}"
    with DuplexPeer(payload=down, rate=rate if bench_paces else None, piece=piece,
                    send_timeout=limit) as peer, \
            _LineBridge(baud, "socat" if kind == "socat" else "bridged", peer.port, transintvl=0,
                        wait_connected=peer.connected.wait, pace=kind == "paced") as b:
        tree = b.cpu()
        front = _FrontCpu(b.pid) if kind != "socat" else None
        writer = PacedWriter(b.client, up, piece, rate if bench_paces else None, limit)
        tree.start()
        if front is not None:
            front.start()
        t0 = now()
        peer.go.set()
        writer.start()
        got, t_down = read_raw(b.client, n, limit, f"{who} downlink")
        writer.join_checked(limit)
        peer.check_rx(f"{who} uplink", n, up_digest, limit)
        t_up = peer.rx_last_at
        elapsed = now() - t0
        tree_s = tree.stop()
        front_s = front.stop() if front is not None else tree_s
        if got != down_digest:
            raise HashMismatch(f"{who} downlink: read {n} bytes sha256 {got}; the peer sent {down_digest}")
        if peer.errors:
            raise BenchError(f"{who}: peer errors {peer.errors}")
    moved = 2 * n / MB
    return {"up": n / (t_up - t0) / rate, "down": n / (t_down - t0) / rate, "bytes": n,
            "front_ms_mb": front_s * 1000 / moved, "front_ms_s": front_s * 1000 / elapsed,
            "tree_ms_mb": tree_s * 1000 / moved, "tree_ms_s": tree_s * 1000 / elapsed}


def run(seconds: float = 3.0) -> dict[str, dict[str, float]]:
    """One run: every baud paced, and the CPU comparisons; keyed "<kind> <baud>"."""
    out: dict[str, dict[str, float]] = {}
    for baud in BAUDS:
        out[f"paced {baud}"] = one("paced", baud, 2.0 if baud < 100_000 else seconds)
    for baud in CPU_BAUDS:
        for kind in ("unpaced", "socat"):
            out[f"{kind} {baud}"] = one(kind, baud, seconds)
    return out


def _table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| case              | bytes each way | up / nominal | down / nominal "
             "| front ms CPU/MB | front ms CPU/s | tree ms CPU/MB | tree ms CPU/s |",
             "|-------------------|----------------|--------------|----------------"
             "|-----------------|----------------|----------------|---------------|"]
    for key, r in rows.items():
        front = ("-", "-") if key.startswith("socat") else (f"{r['front_ms_mb']:.1f}", f"{r['front_ms_s']:.2f}")
        lines.append(f"| {key:17s} | {r['bytes']:14.0f} | {r['up']:12.4f} | {r['down']:14.4f} "
                     f"| {front[0]:>15s} | {front[1]:>14s} | {r['tree_ms_mb']:14.1f} | {r['tree_ms_s']:13.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pacing")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="line time moved each way per case (9600 baud: 2 s)")
    args = parser.parse_args()
    print(f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}  "
          f"nproc {os.cpu_count()}  Python {platform.python_version()}  load {os.getloadavg()[0]:.1f}")
    runs = []
    for i in range(args.runs):
        started = now()
        r = run(args.seconds)
        runs.append(r)
        print(f"run {i + 1} ({now() - started:.0f} s, load {os.getloadavg()[0]:.1f}):")
        print(_table(r))
    medians = {key: {f: median(r[key][f] for r in runs) for f in runs[0][key]} for key in runs[0]}
    print(f"medians of {args.runs} runs (rate / nominal: 1.0000 = baud / 10 bytes a second):")
    print(_table(medians))


if __name__ == "__main__":
    main()
