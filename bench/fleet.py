"""Many devices (``bridged fleet``): memory per device, start time, and the
largest fleet this machine holds with every device answering AT within 10 ms.

    python -m bench.fleet [--runs 3] [--start-count 50] [--start-concurrency 2,4,8]
                          [--sizes 10,25,50,75,100,150,200,300] [--within-ms 10]
                          [--budget-s 900] [--mem-gib 8] [--skip memory,start,search]

- Memory: a fleet of ``--mem-count`` (10) devices per profile (``esp32``: five
  link workers, ``fleet``: one); once all are ready and 3 s have passed, the
  proportional set size (Pss of /proc/PID/smaps_rollup) of each device's
  process tree (supervisor and every descendant) is summed; the median over
  devices is reported, with the processes per device.
- Start time: ``bridged fleet --count 50`` from its spawn until the summary
  line (every device sent READY=1), then until every device has answered
  ``AT`` with OK (probed in turn); medians of ``--runs``.
- Largest N: fleets of growing size (``--sizes``, profile ``fleet``); once
  ready and settled (5 s), every device is probed three times in turn and its
  median AT round trip taken; N holds when the slowest device's median is at
  most ``--within-ms``. The search stops at the first N that does not hold,
  and before an N whose projected memory (N x the measured Pss) exceeds
  ``--mem-gib`` or half of MemAvailable, or once ``--budget-s`` is spent.

Only ptys are used; nothing goes over the network. Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bridged.atclient import AtClient, AtTimeout

from .common import REPO, BenchError, median

CONFIG = '[wifi]\nstation_interface = "lo"\n'


@dataclass
class FleetProc:
    """``python -m bridged fleet`` in a temporary directory."""

    directory: Path
    proc: subprocess.Popen
    began: float

    @classmethod
    def start(cls, count: int, profile: str, concurrency: int | None = None) -> FleetProc:
        directory = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
        (directory / "bridged.toml").write_text(CONFIG)
        argv = [sys.executable, "-m", "bridged", "fleet", "--count", str(count), "--dir",
                str(directory / "f"), "--config", str(directory / "bridged.toml"), "--profile", profile]
        if concurrency is not None:
            argv += ["--concurrency", str(concurrency)]
        began = time.perf_counter()
        with open(directory / "fleet.out", "wb") as out:
            proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        return cls(directory, proc, began)

    def out(self) -> str:
        return (self.directory / "fleet.out").read_text(errors="replace")

    def wait_ready(self, count: int, timeout: float) -> float:
        """Seconds from spawn to the summary line."""
        deadline = time.monotonic() + timeout
        while "devices ready in" not in self.out():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"fleet of {count} not ready in {timeout:.0f} s: {self.out()[-1500:]}")
            time.sleep(0.05)
        took = time.perf_counter() - self.began
        if f"{count} of {count} devices ready" not in self.out():
            raise BenchError(f"not every device started: {self.out()[-1500:]}")
        return took

    def devices(self) -> list[dict]:
        return json.loads((self.directory / "f" / "fleet.json").read_text())["devices"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            for p in [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]:
                p.kill()
            raise BenchError("the fleet ignored SIGTERM") from None
        if code != 0:
            raise BenchError(f"the fleet stopped with {code}: {self.out()[-1500:]}")
        subprocess.run(["rm", "-rf", str(self.directory)], timeout=60, check=False)


def tree_pss_kib(pid: int) -> tuple[int, int]:
    """(Pss in KiB summed over ``pid`` and its descendants, number of processes)."""
    root = psutil.Process(pid)
    total, count = 0, 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            with open(f"/proc/{proc.pid}/smaps_rollup") as file:
                for line in file:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        count += 1
                        break
        except OSError:
            continue
    return total, count


def probe(ptys: list[str], rounds: int = 3, timeout: float = 2.0) -> list[float]:
    """Each device's median AT round trip in ms (inf when it gave no OK)."""
    out = []
    for pty in ptys:
        try:
            with AtClient(pty, timeout=timeout) as client:
                client.flush_input()
                out.append(statistics.median(client.round_trip(timeout) for _ in range(rounds)) * 1000)
        except (AtTimeout, OSError):
            out.append(float("inf"))
    return out


def memory(profile: str, count: int) -> dict[str, float]:
    fleet = FleetProc.start(count, profile)
    try:
        fleet.wait_ready(count, 30 + 5 * count)
        time.sleep(3)
        sizes = [tree_pss_kib(d["pid"]) for d in fleet.devices()]
        manager, _ = tree_pss_kib(fleet.proc.pid)
        manager_own = manager - sum(kib for kib, _ in sizes)
    finally:
        fleet.stop()
    return {"pss_mib": median(k for k, _ in sizes) / 1024, "pss_max_mib": max(k for k, _ in sizes) / 1024,
            "procs": median(n for _, n in sizes), "manager_mib": manager_own / 1024}


def start_time(count: int, profile: str, concurrency: int | None) -> dict[str, float]:
    fleet = FleetProc.start(count, profile, concurrency)
    try:
        ready = fleet.wait_ready(count, 60 + 10 * count)
        slow = [ms for ms in probe([d["pty"] for d in fleet.devices()], rounds=1) if ms == float("inf")]
        answered = time.perf_counter() - fleet.began
        if slow:
            raise BenchError(f"{len(slow)} devices gave no OK")
    finally:
        fleet.stop()
    return {"ready_s": ready, "at_s": answered}


def hold(count: int, profile: str, within_ms: float) -> dict[str, float]:
    fleet = FleetProc.start(count, profile)
    try:
        ready = fleet.wait_ready(count, 60 + 10 * count)
        time.sleep(5)
        rtts = probe([d["pty"] for d in fleet.devices()])
        pss = sum(tree_pss_kib(d["pid"])[0] for d in fleet.devices()) / 1024
        load = os.getloadavg()[0]
    finally:
        fleet.stop()
    worst = max(rtts)
    return {"n": count, "ready_s": ready, "p50_ms": median(rtts), "worst_ms": worst,
            "held": float(worst <= within_ms), "pss_mib": pss, "load": load}


def _mem_available_mib() -> float:
    with open("/proc/meminfo") as file:
        for line in file:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _search(args, per_device_mib: float, started: float) -> tuple[int, str]:
    held, why = 0, f"every size up to {args.sizes[-1]} held"
    for n in args.sizes:
        projected = n * per_device_mib
        limit = min(args.mem_gib * 1024, _mem_available_mib() / 2)
        if projected > limit:
            why = f"N={n} would take ~{projected:.0f} MiB, over the {limit:.0f} MiB memory budget"
            break
        if time.monotonic() - started > args.budget_s:
            why = f"time budget ({args.budget_s:.0f} s) spent before N={n}"
            break
        try:
            r = hold(n, "fleet", args.within_ms)
        except BenchError as exc:
            print(f"N={n:<4} FAILED: {exc}", flush=True)
            why = f"N={n} failed to start: {exc}"
            break
        print(f"N={n:<4} ready in {r['ready_s']:.1f} s; AT median over devices {r['p50_ms']:.2f} ms, "
              f"slowest device {r['worst_ms']:.2f} ms; Pss {r['pss_mib']:.0f} MiB; load {r['load']:.1f}"
              f" -> {'holds' if r['held'] else 'does NOT hold'}", flush=True)
        if not r["held"]:
            why = f"N={n}: the slowest device took {r['worst_ms']:.2f} ms"
            break
        held = n
    return held, why


def _start_times(args, profile: str, concurrency: int | None) -> None:
    runs = [start_time(args.start_count, profile, concurrency) for _ in range(args.runs)]
    label = f"{profile:<6} concurrency {concurrency or 'default'}"
    for i, r in enumerate(runs, 1):
        print(f"start   {label} run {i}: {args.start_count} ready in {r['ready_s']:.1f} s, "
              f"all answered AT at {r['at_s']:.1f} s", flush=True)
    print(f"start   {label} median of {args.runs}: ready {median(r['ready_s'] for r in runs):.1f} s, "
          f"answering AT {median(r['at_s'] for r in runs):.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="start-time runs (default 3)")
    ap.add_argument("--start-count", type=int, default=50, help="devices for the start time (50)")
    ap.add_argument("--start-profiles", default="fleet,esp32", help="profiles for the start time")
    ap.add_argument("--start-concurrency", default="",
                    help="comma-separated --concurrency values for the start time (default: the fleet's)")
    ap.add_argument("--mem-count", type=int, default=10, help="devices for the memory figure (10)")
    ap.add_argument("--sizes", default="10,25,50,75,100,150,200,300",
                    help="fleet sizes tried in turn for the largest N")
    ap.add_argument("--within-ms", type=float, default=10.0, help="AT round trip limit (10 ms)")
    ap.add_argument("--budget-s", type=float, default=900.0, help="time for the search (900 s)")
    ap.add_argument("--mem-gib", type=float, default=8.0, help="memory the search may use (8 GiB)")
    ap.add_argument("--pss-mib", type=float, default=41.0,
                    help="Pss per device of the fleet profile for the search's memory projection"
                         " when the memory part is skipped (41, measured on Python 3.11)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: memory,start,search")
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.start_concurrency = [int(c) for c in args.start_concurrency.split(",") if c.strip()] or [None]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, timeout=10).stdout.strip()
    print(f"bench.fleet: nproc {os.cpu_count()}, Python {sys.version.split()[0]}, HEAD {commit}, "
          f"load {os.getloadavg()[0]:.1f}, MemAvailable {_mem_available_mib():.0f} MiB", flush=True)
    per_device = {"fleet": args.pss_mib}
    if "memory" not in skip:
        for profile in ("esp32", "fleet"):
            r = memory(profile, args.mem_count)
            per_device[profile] = r["pss_mib"]
            print(f"memory  {profile:<6} {args.mem_count} devices: Pss per device median {r['pss_mib']:.1f} MiB "
                  f"(max {r['pss_max_mib']:.1f}), {r['procs']:.0f} processes per device; the fleet "
                  f"manager {r['manager_mib']:.1f} MiB", flush=True)
    if "start" not in skip:
        for profile in args.start_profiles.split(","):
            for concurrency in args.start_concurrency:
                _start_times(args, profile, concurrency)
    if "search" not in skip:
        held, why = _search(args, per_device["fleet"], time.monotonic())
        print(f"largest N holding AT <= {args.within_ms:g} ms (profile fleet): {held} ({why})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
