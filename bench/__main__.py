"""``python -m bench [--runs N] [--quick] [--only NAMES]``: run every benchmark.

Prints per-run figures, then the medians over the runs and the targets.
Exits 1 if any hash check failed, 2 if the daemon or the baseline misbehaved
otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from . import (
    at_latency,
    cipsend_throughput,
    cipsendl_throughput,
    downlink,
    five_links,
    line_rate,
    passive_read,
    passthrough,
)
from . import transcript as transcript_bench
from . import ssl as ssl_bench
from .common import BRIDGED, REPO, SOCAT, BenchError, HashMismatch, median

TARGET_AT_P99_MS = 1.0
TARGET_THROUGHPUT_RATIO = 0.25  # AT+CIPSEND=8192 (the first benchmark's target)
TARGET_STREAM_RATIO = 0.50  # AT+CIPSENDL uplink, +IPD downlink
TARGET_PASSTHROUGH_RATIO = 0.70
TARGET_CPU_RATIO = 3.0  # CPU per MB and CPU at line rate, bridged / socat
TARGET_LINE_PASSTHROUGH = 2.5  # CPU at line rate on one passthrough link (issue #14)
TARGET_ECHO_P99_MS = 2.0

MiB = 1024 * 1024


def _fmt(v: float, unit: str = "") -> str:
    if v != v:  # nan
        return "n/a"
    if v == float("inf"):
        return "inf"
    return f"{v:.3f}{unit}" if abs(v) < 10 else f"{v:.2f}{unit}"


@dataclass
class Bench:
    name: str
    label: str
    run: Callable[[], dict[str, float]]
    line: Callable[[dict[str, float]], str]
    runs: int
    results: list[dict[str, float]] = field(default_factory=list)
    hash_failures: int = 0
    failures: int = 0
    seconds: float = 0.0

    def med(self, key: str) -> float:
        return median(r[key] for r in self.results)


def _lines_cipsend(r):
    return (f"bridged {r['bridged_mb_s']:.2f} MB/s {r['bridged_cpu_s_per_mb'] * 1000:.1f} ms CPU/MB"
            f" | socat {r['socat_mb_s']:.2f} MB/s {r['socat_cpu_s_per_mb'] * 1000:.1f} ms CPU/MB"
            f" | ratio {r['throughput_ratio']:.3f}, CPU/MB {r['cpu_ratio']:.1f}x (hashes match)")


def _lines_at(r):
    return (f"bridged p50 {r['at_p50_ms']:.3f} ms p99 {r['at_p99_ms']:.3f} ms "
            f"(max {r['at_max_ms']:.3f}) | socat p50 {r['socat_p50_ms']:.3f} ms "
            f"p99 {r['socat_p99_ms']:.3f} ms | ratio p50 {r['p50_ratio']:.2f}x "
            f"p99 {r['p99_ratio']:.2f}x")


def _lines_pt(r):
    out = []
    for d in ("up", "down"):
        out.append(f"{d} bridged {r[f'{d}_bridged_mb_s']:.2f} MB/s "
                   f"{r[f'{d}_bridged_cpu_ms_per_mb']:.1f} ms CPU/MB | socat "
                   f"{r[f'{d}_socat_mb_s']:.2f} MB/s {r[f'{d}_socat_cpu_ms_per_mb']:.1f} ms CPU/MB"
                   f" | ratio {r[f'{d}_ratio']:.3f}")
    out.append(f"1-byte echo bridged p50 {r['echo_bridged_p50_ms']:.3f} p99 "
               f"{r['echo_bridged_p99_ms']:.3f} max {r['echo_bridged_max_ms']:.3f} ms "
               f"(TRANSINTVL=0) | socat p50 {r['echo_socat_p50_ms']:.3f} p99 "
               f"{r['echo_socat_p99_ms']:.3f} ms"
               + (f" | at TRANSINTVL=20: p50 {r['echo_bridged_intvl20_p50_ms']:.2f} ms"
                  if "echo_bridged_intvl20_p50_ms" in r else ""))
    return "\n        ".join(out) + "  (hashes match)"


def _lines_ratio(r):
    return (f"bridged {r['bridged_mb_s']:.2f} MB/s {r['bridged_cpu_ms_per_mb']:.1f} ms CPU/MB"
            f" | socat {r['socat_mb_s']:.2f} MB/s {r['socat_cpu_ms_per_mb']:.1f} ms CPU/MB"
            f" | ratio {r['ratio']:.3f}, CPU/MB {r['cpu_ratio']:.1f}x (hashes match)")


def _lines_line_rate(r):
    out = []
    for k, label in (("pt", "passthrough"), ("five", "5 links"), ("socat", "socat")):
        out.append(f"{label} {r[f'{k}_cores']:.3f} cores (up {r[f'{k}_up_mb_s']:.3f} "
                   f"down {r[f'{k}_down_mb_s']:.3f} MB/s)")
    return (" | ".join(out) + f" | ratio passthrough {r['pt_ratio']:.1f}x, "
            f"5 links {r['five_ratio']:.1f}x (hashes match)")


def _lines_five(r):
    return (f"bridged {r['bridged_mb_s']:.2f} MB/s aggregate (up done {r['bridged_up_seconds']:.2f} s,"
            f" down {r['bridged_down_seconds']:.2f} s) {r['bridged_cpu_ms_per_mb']:.1f} ms CPU/MB"
            f" | socat {r['socat_mb_s']:.2f} MB/s {r['socat_cpu_ms_per_mb']:.1f} ms CPU/MB"
            f" | ratio {r['ratio']:.3f} (all 10 hashes intact); one CIPSEND p50 "
            f"{r['send_p50_ms']:.2f} p90 {r['send_p90_ms']:.2f} ms")


NAMES = ("at", "cipsend", "passthrough", "cipsendl", "downlink", "five_links", "line_rate",
         "ssl", "passive", "transcript")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=None,
                    help="repetitions of each benchmark (default 5, or 1 with --quick)")
    ap.add_argument("--line-runs", type=int, default=None,
                    help="repetitions of the ~45 s line-rate benchmark (default: as --runs)")
    ap.add_argument("--quick", action="store_true",
                    help="small workloads (300 round trips, 4 MiB, 2 s at line rate), smoke test")
    ap.add_argument("--only", default=None,
                    help="comma-separated subset of: " + ", ".join(NAMES))
    ap.add_argument("--at-count", type=int, default=None,
                    help="AT round trips per run (default 2000)")
    ap.add_argument("--mib", type=float, default=None,
                    help="MiB uploaded with AT+CIPSEND=8192 per run and per side (default 64)")
    ap.add_argument("--stream-mib", type=float, default=None,
                    help="MiB per transfer for passthrough, CIPSENDL and +IPD (default 32)")
    ap.add_argument("--echo-count", type=int, default=None,
                    help="one-byte passthrough echoes per run (default 1000)")
    ap.add_argument("--line-seconds", type=float, default=None,
                    help="seconds at line rate per case (default 10)")
    ap.add_argument("--link-mib", type=float, default=None,
                    help="MiB each way per link with five links (default 4)")
    ap.add_argument("--ssl-mib", type=float, default=None,
                    help="MiB each way through the SSL link in passthrough (default 32)")
    ap.add_argument("--ssl-handshakes", type=int, default=None,
                    help="AT+CIPSTART=\"SSL\" handshakes per run (default 200)")
    ap.add_argument("--passive-mib", type=float, default=None,
                    help="MiB read with AT+CIPRECVDATA per piece size and gap (default 1)")
    ap.add_argument("--transcript-mib", type=float, default=None,
                    help="MiB uploaded with AT+CIPSEND=8192 with the transcript off and on (default 16)")
    ap.add_argument("--daemon-commit", metavar="REF", default=None,
                    help="run the daemon's code as of this commit (git archive REF bridged, "
                         "put first on the daemon's PYTHONPATH) instead of the work tree's, "
                         "e.g. while others have uncommitted changes in it")
    args = ap.parse_args(argv)
    snapshot = None
    if args.daemon_commit:
        try:
            snapshot = _export_daemon(args.daemon_commit)
        except (OSError, subprocess.SubprocessError, BenchError) as exc:
            print(f"bench: could not export the daemon at {args.daemon_commit}: {exc}",
                  file=sys.stderr)
            return 2
    try:
        return _main(ap, args, snapshot)
    finally:
        if snapshot is not None:
            shutil.rmtree(snapshot[0], ignore_errors=True)


def _export_daemon(ref: str) -> tuple[str, str]:
    """``git archive REF bridged`` into a temporary directory; prepend it to PYTHONPATH."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", ref + "^{commit}"],
                            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    tmp = tempfile.mkdtemp(prefix="bench-daemon-src-")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "bridged"],
                             capture_output=True, timeout=60, check=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, timeout=60, check=True)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = tmp + (os.pathsep + old if old else "")
    where = subprocess.run([str(BRIDGED.parent / "python"), "-c",
                            "import bridged; print(bridged.__file__)"],
                           capture_output=True, text=True, timeout=30, cwd="/").stdout.strip()
    if not where.startswith(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        raise BenchError(f"the daemon would still import bridged from {where!r}")
    return tmp, commit


def _main(ap, args, snapshot) -> int:

    q = args.quick
    runs = args.runs if args.runs is not None else (1 if q else 5)
    # As many as the others: at line rate one run can flip a 3x target either way.
    line_runs = args.line_runs if args.line_runs is not None else runs
    at_count = args.at_count or (300 if q else 2000)
    nbytes = int((args.mib or (4 if q else 64)) * MiB)
    stream = int((args.stream_mib or (4 if q else 32)) * MiB)
    echo_count = args.echo_count or (200 if q else 1000)
    line_s = args.line_seconds or (2.0 if q else 10.0)
    link_bytes = int((args.link_mib or (1 if q else 4)) * MiB)
    ssl_bytes = int((args.ssl_mib or (4 if q else 32)) * MiB)
    ssl_handshakes = args.ssl_handshakes or (50 if q else 200)
    passive_bytes = int((args.passive_mib or (0.25 if q else 1)) * MiB)
    transcript_bytes = int((args.transcript_mib or (2 if q else 16)) * MiB)
    only = set(NAMES) if args.only is None else {s.strip() for s in args.only.split(",") if s.strip()}
    if only - set(NAMES):
        ap.error(f"--only: unknown {sorted(only - set(NAMES))}; choose from {', '.join(NAMES)}")
    if min(runs, line_runs, at_count, nbytes, stream, echo_count, link_bytes, ssl_bytes,
           ssl_handshakes, passive_bytes, transcript_bytes) < 1 or line_s <= 0:
        ap.error("counts, sizes and durations must be positive")
    if not BRIDGED.exists():
        print(f"bench: {BRIDGED} not found (the project's virtualenv)", file=sys.stderr)
        return 2
    if not os.path.exists(SOCAT):
        print("bench: socat not found (apt-get install -y socat)", file=sys.stderr)
        return 2

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "bridged"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "?", ""
    if snapshot is not None:
        daemon_code = f"daemon code: commit {snapshot[1][:12]} (exported to {snapshot[0]})"
    else:
        daemon_code = ("daemon code: work tree at HEAD " + (commit or "?")
                       + (" with uncommitted changes under bridged/" if dirty else ""))
    started = time.monotonic()
    print(f"bench: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  "
          f"nproc {os.cpu_count()}  Python {platform.python_version()}  "
          f"{platform.machine()}  HEAD {commit or '?'}")
    print(f"bench: {daemon_code}")
    print(f"bench: {runs} run(s) ({line_runs} at line rate); {at_count} AT round trips; "
          f"{nbytes / MiB:g} MiB with AT+CIPSEND=8192; {stream / MiB:g} MiB per streamed "
          f"transfer; {echo_count} echoes; {line_s:g} s at line rate; five links x "
          f"{link_bytes / MiB:g} MiB each way; SSL {ssl_bytes / MiB:g} MiB each way and "
          f"{ssl_handshakes} handshakes; passive reads {passive_bytes / MiB:g} MiB per "
          f"piece size and gap; {transcript_bytes / MiB:g} MiB with the transcript "
          f"off and on\n")

    benches = [
        Bench("at", "AT round trip ", lambda: at_latency.run(at_count), _lines_at, runs),
        Bench("cipsend", "CIPSEND upload", lambda: cipsend_throughput.run(nbytes),
              _lines_cipsend, runs),
        Bench("passthrough", "passthrough   ", lambda: passthrough.run(stream, echo_count),
              _lines_pt, runs),
        Bench("cipsendl", "CIPSENDL upload", lambda: cipsendl_throughput.run(stream),
              _lines_ratio, runs),
        Bench("downlink", "+IPD downlink ", lambda: downlink.run(stream), _lines_ratio, runs),
        Bench("five_links", "five links    ", lambda: five_links.run(link_bytes), _lines_five,
              runs),
        Bench("line_rate", "line rate     ", lambda: line_rate.run(line_s), _lines_line_rate,
              line_runs),
        Bench("ssl", "SSL link      ", lambda: ssl_bench.run(ssl_bytes, ssl_handshakes),
              ssl_bench.lines, runs),
        Bench("passive", "passive reads ", lambda: passive_read.run(passive_bytes),
              passive_read.lines, runs),
        Bench("transcript", "transcript    ",
              lambda: transcript_bench.run(transcript_bytes, at_count, line_s),
              transcript_bench.lines, runs),
    ]
    benches = [b for b in benches if b.name in only]
    by = {b.name: b for b in benches}

    for i in range(1, max(b.runs for b in benches) + 1):
        for b in benches:
            if i > b.runs:
                continue
            t0 = time.monotonic()
            try:
                r = b.run()
                b.results.append(r)
                print(f"run {i}  {b.label}  {b.line(r)}", flush=True)
            except HashMismatch as exc:
                b.hash_failures += 1
                print(f"run {i}  {b.label}  HASH CHECK FAILED: {exc}", flush=True)
            except BenchError as exc:
                b.failures += 1
                print(f"run {i}  {b.label}  FAILED: {exc}", flush=True)
            except Exception:
                b.failures += 1
                print(f"run {i}  {b.label}  FAILED with an exception:", flush=True)
                traceback.print_exc()
            b.seconds += time.monotonic() - t0

    # ---------------------------------------------------------------- medians
    rows = [("metric", "bridged", "socat", "ratio")]

    def row(label: str, b: Bench, bkey: str, skey: str, scale: float = 1.0,
            ratio_unit: str = "") -> None:
        bv, sv = b.med(bkey) * scale, b.med(skey) * scale
        rows.append((label, _fmt(bv), _fmt(sv), _fmt(bv / sv if sv else float("inf"), ratio_unit)))

    if (b := by.get("at")) and b.results:
        row("AT round trip p50 (ms)", b, "at_p50_ms", "socat_p50_ms", ratio_unit="x")
        row("AT round trip p99 (ms)", b, "at_p99_ms", "socat_p99_ms", ratio_unit="x")
    if (b := by.get("cipsend")) and b.results:
        row("CIPSEND=8192 upload (MB/s)", b, "bridged_mb_s", "socat_mb_s")
        row("  CPU per MB (ms)", b, "bridged_cpu_s_per_mb", "socat_cpu_s_per_mb", 1000, "x")
    if (b := by.get("passthrough")) and b.results:
        row("passthrough uplink (MB/s)", b, "up_bridged_mb_s", "up_socat_mb_s")
        row("  CPU per MB (ms)", b, "up_bridged_cpu_ms_per_mb", "up_socat_cpu_ms_per_mb",
            ratio_unit="x")
        row("passthrough downlink (MB/s)", b, "down_bridged_mb_s", "down_socat_mb_s")
        row("  CPU per MB (ms)", b, "down_bridged_cpu_ms_per_mb", "down_socat_cpu_ms_per_mb",
            ratio_unit="x")
        row("passthrough 1-byte echo p50 (ms)", b, "echo_bridged_p50_ms", "echo_socat_p50_ms",
            ratio_unit="x")
        row("passthrough 1-byte echo p99 (ms)", b, "echo_bridged_p99_ms", "echo_socat_p99_ms",
            ratio_unit="x")
    if (b := by.get("cipsendl")) and b.results:
        row("CIPSENDL upload (MB/s)", b, "bridged_mb_s", "socat_mb_s")
        row("  CPU per MB (ms)", b, "bridged_cpu_ms_per_mb", "socat_cpu_ms_per_mb",
            ratio_unit="x")
    if (b := by.get("downlink")) and b.results:
        row("+IPD downlink (MB/s)", b, "bridged_mb_s", "socat_mb_s")
        row("  CPU per MB (ms)", b, "bridged_cpu_ms_per_mb", "socat_cpu_ms_per_mb",
            ratio_unit="x")
    if (b := by.get("five_links")) and b.results:
        row("five links, aggregate (MB/s)", b, "bridged_mb_s", "socat_mb_s")
        row("  CPU per MB (ms)", b, "bridged_cpu_ms_per_mb", "socat_cpu_ms_per_mb",
            ratio_unit="x")
    if (b := by.get("line_rate")) and b.results:
        row("line rate, passthrough (cores)", b, "pt_cores", "socat_cores", ratio_unit="x")
        row("line rate, five links (cores)", b, "five_cores", "socat_cores", ratio_unit="x")
    if (b := by.get("ssl")) and b.results:
        row("SSL passthrough uplink (MB/s)", b, "up_bridged_mb_s", "up_socat_mb_s")
        row("  CPU per MB (ms)", b, "up_bridged_cpu_ms_per_mb", "up_socat_cpu_ms_per_mb",
            ratio_unit="x")
        row("SSL passthrough downlink (MB/s)", b, "down_bridged_mb_s", "down_socat_mb_s")
        row("  CPU per MB (ms)", b, "down_bridged_cpu_ms_per_mb", "down_socat_cpu_ms_per_mb",
            ratio_unit="x")
        row("SSL handshake p50 (ms) vs Python", b, "hs_bridged_p50_ms", "hs_python_p50_ms",
            ratio_unit="x")
        row("SSL handshake p99 (ms) vs Python", b, "hs_bridged_p99_ms", "hs_python_p99_ms",
            ratio_unit="x")
    if (b := by.get("passive")) and b.results:
        for gap in passive_read.GAPS_MS:
            for piece in passive_read.PIECES:
                row(f"passive reads of {piece}, gap {gap:g} ms (MB/s)", b,
                    f"{passive_read.key(piece, gap)}_mb_s", "socat_mb_s")

    if (b := by.get("transcript")) and b.results:
        row("CIPSEND=8192, transcript off (MB/s)", b, "off_mb_s", "socat_mb_s")
        row("  CPU per MB (ms)", b, "off_cpu_ms_per_mb", "socat_cpu_ms_per_mb", ratio_unit="x")
        row("CIPSEND=8192, transcript on (MB/s)", b, "on_mb_s", "socat_mb_s")
        row("  CPU per MB (ms)", b, "on_cpu_ms_per_mb", "socat_cpu_ms_per_mb", ratio_unit="x")
        row("line rate, passthrough, transcript off (cores)", b, "line_off_cores",
            "line_socat_cores", ratio_unit="x")
        row("line rate, passthrough, transcript on (cores)", b, "line_on_cores",
            "line_socat_cores", ratio_unit="x")

    counts = ", ".join(f"{b.name} {len(b.results)}" for b in benches)
    print(f"\nMedians (runs passed: {counts}; ratio = bridged / socat, from the medians):\n")
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for j, r in enumerate(rows):
        print("| " + " | ".join(r[c].ljust(widths[c]) if c == 0 else r[c].rjust(widths[c])
                                for c in range(4)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    if (b := by.get("passthrough")) and b.results and "echo_bridged_intvl20_p50_ms" in b.results[0]:
        print(f"\n(passthrough 1-byte echo at the default AT+TRANSINTVL=20, for the record: "
              f"p50 {b.med('echo_bridged_intvl20_p50_ms'):.2f} ms, "
              f"p99 {b.med('echo_bridged_intvl20_p99_ms'):.2f} ms)")
    if (b := by.get("five_links")) and b.results:
        print(f"(five links: one AT+CIPSEND=<id>,8192, command to SEND OK, while the downlink "
              f"runs: p50 {b.med('send_p50_ms'):.2f} ms, p90 {b.med('send_p90_ms'):.2f} ms)")
    if (b := by.get("line_rate")) and b.results:
        print(f"(line rate achieved, MB/s up/down: passthrough {b.med('pt_up_mb_s'):.3f}/"
              f"{b.med('pt_down_mb_s'):.3f}, five links {b.med('five_up_mb_s'):.3f}/"
              f"{b.med('five_down_mb_s'):.3f}, socat {b.med('socat_up_mb_s'):.3f}/"
              f"{b.med('socat_down_mb_s'):.3f}; CPU per MB moved, ms: passthrough "
              f"{b.med('pt_cpu_ms_per_mb'):.1f}, five links {b.med('five_cpu_ms_per_mb'):.1f}, "
              f"socat {b.med('socat_cpu_ms_per_mb'):.1f}; wake-ups per s (CPU us per wake-up): "
              f"passthrough {b.med('pt_wakeups_s'):.0f} ({b.med('pt_us_per_wakeup'):.0f}), "
              f"five links {b.med('five_wakeups_s'):.0f} ({b.med('five_us_per_wakeup'):.0f}), "
              f"socat {b.med('socat_wakeups_s'):.0f} ({b.med('socat_us_per_wakeup'):.0f}))")
    if (b := by.get("transcript")) and b.results:
        print(f"(transcript, on / off: CIPSEND=8192 {b.med('on_mb_s') / b.med('off_mb_s'):.3f}x "
              f"the throughput, {b.med('on_cpu_ms_per_mb') / b.med('off_cpu_ms_per_mb'):.2f}x "
              f"the CPU per MB, {b.med('file_bytes_per_payload_byte'):.1f} file bytes per payload "
              f"byte; AT round trip p50 {b.med('at_off_p50_ms'):.3f} -> {b.med('at_on_p50_ms'):.3f} "
              f"ms, p99 {b.med('at_off_p99_ms'):.3f} -> {b.med('at_on_p99_ms'):.3f} ms)")
    if (b := by.get("ssl")) and b.results:
        suites = sorted({r["suite"] for r in b.results})
        print(f"(SSL: baseline for throughput is socat PTY <-> OPENSSL:...,verify=0, for the "
              f"handshake (AT+CIPSTART=\"SSL\" to OK) a Python ssl client's connect + "
              f"do_handshake; negotiated: {', '.join(suites)}; no targets set for SSL)")
    if (b := by.get("passive")) and b.results:
        cells = []
        for gap in passive_read.GAPS_MS:
            for piece in passive_read.PIECES:
                k = passive_read.key(piece, gap)
                cells.append(f"{piece}/{gap:g}: p50 {b.med(f'{k}_rtt_p50_ms'):.2f} p99 "
                             f"{b.med(f'{k}_rtt_p99_ms'):.2f} ms, waiting for notices "
                             f"{b.med(f'{k}_idle_share'):.0%}, CPU "
                             f"{b.med(f'{k}_cpu_us_per_read'):.0f} us per read")
        print("(passive reads, piece/gap: AT+CIPRECVDATA round trip; share of the time the "
              "driver knew of nothing unread: " + "; ".join(cells) + "; socat: raw reads, "
              "no AT)")

    # ---------------------------------------------------------------- targets
    print("\nTargets:")
    verdicts: list[bool] = []

    def target(text: str, ok: bool, value: str) -> None:
        verdicts.append(ok)
        print(f"  {'MET    ' if ok else 'NOT MET'}  {text}: {value}")

    def ratio_target(text, b, bkey, skey, limit, higher=True, pct=True):
        bv, sv = b.med(bkey), b.med(skey)
        r = bv / sv if sv else float("inf")
        ok = r >= limit if higher else r <= limit
        target(text, ok, f"{r:.1%}" if pct else f"{r:.2f}x")

    if (b := by.get("at")) and b.results:
        p99 = b.med("at_p99_ms")
        target(f"AT round trip p99 < {TARGET_AT_P99_MS} ms", p99 < TARGET_AT_P99_MS,
               f"{p99:.3f} ms")
    if (b := by.get("cipsend")) and b.results:
        ratio_target(f"CIPSEND=8192 upload >= {TARGET_THROUGHPUT_RATIO:.0%} of socat", b,
                     "bridged_mb_s", "socat_mb_s", TARGET_THROUGHPUT_RATIO)
        ratio_target(f"CIPSEND=8192 CPU per MB <= {TARGET_CPU_RATIO:g}x socat", b,
                     "bridged_cpu_s_per_mb", "socat_cpu_s_per_mb", TARGET_CPU_RATIO, False, False)
    if (b := by.get("passthrough")) and b.results:
        for d, name in (("up", "uplink"), ("down", "downlink")):
            ratio_target(f"passthrough {name} >= {TARGET_PASSTHROUGH_RATIO:.0%} of socat", b,
                         f"{d}_bridged_mb_s", f"{d}_socat_mb_s", TARGET_PASSTHROUGH_RATIO)
            ratio_target(f"passthrough {name} CPU per MB <= {TARGET_CPU_RATIO:g}x socat", b,
                         f"{d}_bridged_cpu_ms_per_mb", f"{d}_socat_cpu_ms_per_mb",
                         TARGET_CPU_RATIO, False, False)
        p99 = b.med("echo_bridged_p99_ms")
        target(f"passthrough 1-byte echo p99 < {TARGET_ECHO_P99_MS} ms (TRANSINTVL=0)",
               p99 < TARGET_ECHO_P99_MS, f"{p99:.3f} ms")
    for name, text in (("cipsendl", "CIPSENDL upload"), ("downlink", "+IPD downlink")):
        if (b := by.get(name)) and b.results:
            ratio_target(f"{text} >= {TARGET_STREAM_RATIO:.0%} of socat", b,
                         "bridged_mb_s", "socat_mb_s", TARGET_STREAM_RATIO)
            ratio_target(f"{text} CPU per MB <= {TARGET_CPU_RATIO:g}x socat", b,
                         "bridged_cpu_ms_per_mb", "socat_cpu_ms_per_mb", TARGET_CPU_RATIO,
                         False, False)
    if (b := by.get("five_links")):
        intact = bool(b.results) and b.hash_failures == 0 and b.failures == 0
        target("five links at once, every hash intact", intact,
               f"{len(b.results)} of {b.runs} runs passed, {b.hash_failures} hash failure(s)")
        if b.results:
            ratio_target(f"five links CPU per MB <= {TARGET_CPU_RATIO:g}x socat", b,
                         "bridged_cpu_ms_per_mb", "socat_cpu_ms_per_mb", TARGET_CPU_RATIO,
                         False, False)
    if (b := by.get("line_rate")) and b.results:
        ratio_target(f"line rate passthrough CPU <= {TARGET_LINE_PASSTHROUGH:g}x socat", b,
                     "pt_cores", "socat_cores", TARGET_LINE_PASSTHROUGH, False, False)
        ratio_target(f"line rate five links CPU <= {TARGET_CPU_RATIO:g}x socat", b,
                     "five_cores", "socat_cores", TARGET_CPU_RATIO, False, False)
    if (b := by.get("passive")) and b.results:
        errors, stale = sum(r["errors"] for r in b.results), sum(r["stale"] for r in b.results)
        target("passive reads: no ERROR, no stale notice", errors == stale == 0,
               f"{errors:.0f} ERROR(s), {stale:.0f} stale notice(s) in {len(b.results)} run(s)")
    print(f"  {sum(verdicts)} of {len(verdicts)} targets met")

    took = time.monotonic() - started
    print(f"\nbench: took {took:.0f} s (" + ", ".join(f"{b.name} {b.seconds:.0f} s"
                                               for b in benches) + ")")
    hash_failures = sum(b.hash_failures for b in benches)
    other_failures = sum(b.failures for b in benches)
    if hash_failures:
        print(f"bench: {hash_failures} hash check(s) FAILED", file=sys.stderr)
        return 1
    if other_failures:
        print(f"bench: {other_failures} benchmark run(s) failed", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
