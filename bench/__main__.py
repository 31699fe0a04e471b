"""``python -m bench [--runs N] [--quick]``: run every benchmark N times.

Prints per-run figures, then the medians over the runs.  Exits 1 if any
hash check failed, 2 if the daemon or the baseline misbehaved otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import traceback

from . import at_latency, cipsend_throughput
from .common import BRIDGED, SOCAT, BenchError, HashMismatch, median

TARGET_AT_P99_MS = 1.0
TARGET_THROUGHPUT_RATIO = 0.25


def _fmt(v: float, unit: str = "") -> str:
    if v != v:  # nan
        return "n/a"
    return f"{v:.3f}{unit}" if abs(v) < 10 else f"{v:.2f}{unit}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=None,
                    help="repetitions of each benchmark (default 5, or 1 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="small workload (300 round trips, 4 MiB), for a smoke test")
    ap.add_argument("--at-count", type=int, default=None,
                    help="AT round trips per run (default 2000)")
    ap.add_argument("--mib", type=float, default=None,
                    help="MiB uploaded per run and per side (default 64)")
    args = ap.parse_args(argv)

    runs = args.runs if args.runs is not None else (1 if args.quick else 5)
    at_count = args.at_count or (300 if args.quick else 2000)
    nbytes = int((args.mib or (4 if args.quick else 64)) * 1024 * 1024)
    if runs < 1 or at_count < 1 or nbytes < 1:
        ap.error("--runs, --at-count and --mib must be positive")
    if not BRIDGED.exists():
        print(f"bench: {BRIDGED} not found (the project's virtualenv)", file=sys.stderr)
        return 2
    if not os.path.exists(SOCAT):
        print("bench: socat not found (apt-get install -y socat)", file=sys.stderr)
        return 2

    print(f"bench: {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"nproc {os.cpu_count()}  Python {platform.python_version()}  "
          f"{platform.machine()}")
    print(f"bench: {runs} run(s); {at_count} AT round trips; "
          f"{nbytes / 1024 / 1024:g} MiB uploaded per side with 8192-byte sends\n")

    hash_failures = 0
    other_failures = 0
    lat_runs: list[dict[str, float]] = []
    thr_runs: list[dict[str, float]] = []
    for i in range(1, runs + 1):
        try:
            r = at_latency.run(at_count)
            lat_runs.append(r)
            print(f"run {i}  AT round trip   bridged p50 {r['at_p50_ms']:.3f} ms "
                  f"p99 {r['at_p99_ms']:.3f} ms (max {r['at_max_ms']:.3f}) | "
                  f"socat p50 {r['socat_p50_ms']:.3f} ms p99 {r['socat_p99_ms']:.3f} ms | "
                  f"ratio p50 {r['p50_ratio']:.2f}x p99 {r['p99_ratio']:.2f}x", flush=True)
        except BenchError as exc:
            other_failures += 1
            print(f"run {i}  AT round trip   FAILED: {exc}", flush=True)
        try:
            r = cipsend_throughput.run(nbytes)
            thr_runs.append(r)
            print(f"run {i}  CIPSEND upload  bridged {r['bridged_mb_s']:.2f} MB/s "
                  f"{r['bridged_cpu_s_per_mb'] * 1000:.1f} ms CPU/MB | "
                  f"socat {r['socat_mb_s']:.2f} MB/s "
                  f"{r['socat_cpu_s_per_mb'] * 1000:.1f} ms CPU/MB | "
                  f"throughput ratio {r['throughput_ratio']:.3f}, "
                  f"CPU/MB ratio {r['cpu_ratio']:.1f}x  (hashes match)", flush=True)
        except HashMismatch as exc:
            hash_failures += 1
            print(f"run {i}  CIPSEND upload  HASH CHECK FAILED: {exc}", flush=True)
        except BenchError as exc:
            other_failures += 1
            print(f"run {i}  CIPSEND upload  FAILED: {exc}", flush=True)
        except Exception:
            other_failures += 1
            traceback.print_exc()

    def med(rows: list[dict[str, float]], key: str) -> float:
        return median(r[key] for r in rows)

    print(f"\nMedians over {len(lat_runs)} latency run(s) and {len(thr_runs)} "
          f"throughput run(s) (ratio = bridged / socat, from the medians):\n")
    rows = [("metric", "bridged", "socat", "ratio")]
    if lat_runs:
        for name, b, s in (("AT round trip p50 (ms)", "at_p50_ms", "socat_p50_ms"),
                           ("AT round trip p99 (ms)", "at_p99_ms", "socat_p99_ms")):
            bv, sv = med(lat_runs, b), med(lat_runs, s)
            rows.append((name, _fmt(bv), _fmt(sv), _fmt(bv / sv, "x")))
    if thr_runs:
        bv, sv = med(thr_runs, "bridged_mb_s"), med(thr_runs, "socat_mb_s")
        rows.append(("upload throughput (MB/s)", _fmt(bv), _fmt(sv), _fmt(bv / sv)))
        bv = med(thr_runs, "bridged_cpu_s_per_mb") * 1000
        sv = med(thr_runs, "socat_cpu_s_per_mb") * 1000
        rows.append(("CPU per MB (ms)", _fmt(bv), _fmt(sv), _fmt(bv / sv, "x")))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for j, r in enumerate(rows):
        print("| " + " | ".join(r[c].ljust(widths[c]) if c == 0 else r[c].rjust(widths[c])
                                for c in range(4)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")

    print()
    if lat_runs:
        p99 = med(lat_runs, "at_p99_ms")
        ok = p99 < TARGET_AT_P99_MS
        print(f"target AT round trip p99 < {TARGET_AT_P99_MS} ms: "
              f"{'MET' if ok else 'NOT MET'} ({p99:.3f} ms)")
    if thr_runs:
        ratio = med(thr_runs, "bridged_mb_s") / med(thr_runs, "socat_mb_s")
        ok = ratio >= TARGET_THROUGHPUT_RATIO
        print(f"target CIPSEND throughput >= {TARGET_THROUGHPUT_RATIO:.0%} of socat: "
              f"{'MET' if ok else 'NOT MET'} ({ratio:.1%})")
    if hash_failures:
        print(f"bench: {hash_failures} hash check(s) FAILED", file=sys.stderr)
        return 1
    if other_failures:
        print(f"bench: {other_failures} benchmark run(s) failed", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
