"""Five links at full speed: the floor of bridged's design (issue #14's "CPU per MB at
most 3x socat's").

bench.five_links's client (``five_links.bridged_five``: ``AT+CIPMUX=1``, five TCP
links, ``AT+CIPSEND=<id>,8192`` in turn with every reply checked byte for byte,
each peer streaming its downlink, the +IPD frames parsed by length, all ten
payloads hash-checked) runs against five systems in the same run, on the same
payloads (``per_link`` bytes each way per link):

* ``floor (a)``: ``bench.floor_rings one``, one uvloop process answering just
  what the client needs, the sockets in it (``bench.floor_parts``);
* ``floor (b)``: ``bench.floor_rings split``, the same front with each link's
  socket in a forked worker, the bytes through bridged's own rings: the least
  the fixed design (a front, a worker per link, SPSC rings) needs;
* ``floor (b) polled``: ``bench.floor_rings polled``, floor (b) with the uplink
  ring polled as bridged's workers poll a bulk upload (``links.bulkpoll``: the
  front's commits ring past half a ring, a 4 ms one-shot tick takes the rest);
* ``bridged``: the real daemon, the code of the commit this tree's HEAD names
  (exported as ``python -m bench --daemon-commit`` does; the stand-ins import
  this tree's ``bridged`` package, run from the repository root);
* ``socat``: five_links's baseline, one socat PTY <-> TCP moving the same total.

Measured as five_links measures (``TreeCpu``: schedstat run time of every process
of the tree over the window), plus per process: voluntary context switches
(psutil's ``num_ctx_switches``, wake-ups) and read and write system calls
(``syscr``/``syscw`` of ``/proc/PID/io``), per AT+CIPSEND (socat: per 8 KiB of
uplink, the same count), and the share of system time in its CPU (psutil's
clock-tick user and system times: rough, 10 ms ticks).  The order of the five
turns one step each run.

Run: ``.venv/bin/python -m bench.five_floor [runs] [per_link_mib]`` (defaults 5
and 4, as ``python -m bench --only five_links``); medians of the runs.  Exit 1 on
a hash mismatch, 2 on any other misbehaviour (a reply not byte for byte what the
client expects, a timeout).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from . import five_links
from .__main__ import _export_daemon
from .common import (MB, REPO, BenchError, HashMismatch, PtyClient, TreeCpu, _stop_process,
                     _threads_runtime, median, now)
from .streams import make_payload

SYSTEMS = ("floor (a)", "floor (b)", "floor (b) polled", "bridged", "socat")
LAYOUTS = {"floor (a)": "one", "floor (b)": "split", "floor (b) polled": "polled", "bridged": "bridged",
           "socat": "socat"}


class FloorDaemon:
    """The stand-in (``bench.floor_rings MODE``) on a fresh pty, as ``common.Daemon`` runs
    bridged; ``client`` answers ``AT`` with ``OK`` (no echo, ever)."""

    def __init__(self, mode: str, start_timeout: float = 20.0) -> None:
        self.mode = mode
        self.start_timeout = start_timeout
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-floor-{mode}-"))
        self.link = str(self.tmp / "tty")
        self.logfile = self.tmp / "floor.log"
        self.popen: subprocess.Popen | None = None
        self.client: PtyClient | None = None
        self.notes: list[str] = []
        self._descendants: list[psutil.Process] = []

    def __enter__(self) -> "FloorDaemon":
        try:
            self.start()
        except BaseException:
            self.stop(keep=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(keep=exc_type is not None)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        with open(self.logfile, "wb") as log:
            self.popen = subprocess.Popen([sys.executable, "-m", "bench.floor_rings", self.mode, self.link],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=str(REPO))
        deadline = now() + self.start_timeout
        while not os.path.islink(self.link):  # bounded by the deadline
            if self.popen.poll() is not None or now() > deadline:
                raise BenchError(f"floor {self.mode} did not make {self.link}: "
                                 f"{self.logfile.read_text(errors='replace')[-2000:]}")
            time.sleep(0.01)
        self.client = PtyClient(self.link, timeout=max(deadline - now(), 1.0))
        self.client.expect(b"AT\r\n", b"\r\nOK\r\n", timeout=max(deadline - now(), 1.0))
        self._descendants = psutil.Process(self.pid).children(recursive=True)

    def join_wifi(self) -> None:
        assert self.client is not None
        self.client.expect(b'AT+CWJAP="bridged","x"\r\n', b"\r\nOK\r\n", timeout=10.0)

    def stop(self, keep: bool = False) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.popen is not None:
            _, notes = _stop_process(self.popen, f"floor {self.mode}", 10.0, self._descendants)
            self.notes += notes
            self.popen = None
        if keep or self.notes:
            for n in self.notes:
                print(f"  ! {n}", file=sys.stderr)
            print(f"  ! floor {self.mode} log kept in {self.logfile}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _proc_stats(pid: int) -> tuple[float, int, int, int, float] | None:
    """(CPU s from schedstat, voluntary switches, syscr, syscw, system time s in clock ticks)
    of one process."""
    try:
        runtime = _threads_runtime(pid) or {}
        proc = psutil.Process(pid)
        switches = proc.num_ctx_switches().voluntary
        system = proc.cpu_times().system
        with open(f"/proc/{pid}/io") as f:
            io = dict(line.split(": ") for line in f.read().splitlines())
    except (psutil.Error, OSError, ValueError):
        return None
    return sum(runtime.values()) / 1e9, switches, int(io["syscr"]), int(io["syscw"]), system


def _role(layout: str, k: int) -> str:
    """Process ``k`` of a tree (0 the root, then the children by age) by what it does."""
    if layout == "bridged":
        return ("supervisor", "front")[k] if k < 2 else "workers"
    if layout == "socat":
        return "socat"
    return "front" if k == 0 else "workers"


class ProcMeter(TreeCpu):
    """TreeCpu, and per process (by role) its CPU, wake-ups and read and write syscalls."""

    def __init__(self, pid: int, layout: str) -> None:
        super().__init__(pid)
        self.layout = layout
        self.before: dict[int, tuple] = {}
        self.after: dict[int, tuple] = {}

    def _snap(self) -> dict[int, tuple]:
        try:
            kids = sorted(self.root.children(recursive=True), key=lambda p: (p.create_time(), p.pid))
        except psutil.Error:
            kids = []
        out = {}
        for k, p in enumerate([self.root, *kids]):
            stats = _proc_stats(p.pid)
            if stats is not None:
                out[p.pid] = (_role(self.layout, k), *stats)
        return out

    def start(self) -> None:
        super().start()
        self.before = self._snap()

    def stop(self) -> float:
        total = super().stop()
        self.after = self._snap()
        return total

    def by_role(self) -> dict[str, list[float]]:
        """role -> [CPU s, wake-ups, syscr, syscw, system s] over the window (a process born in
        it counts whole)."""
        out: dict[str, list[float]] = {}
        for pid, (role, *stats) in self.after.items():
            base = self.before.get(pid, (role, 0.0, 0, 0, 0, 0.0))[1:]
            acc = out.setdefault(role, [0.0, 0, 0, 0, 0.0])
            for j, (a, b) in enumerate(zip(stats, base)):
                acc[j] += a - b
        return out


def _measure(name: str, ups, downs) -> dict:
    """One system's turn: five_links's own client and checks, with a ProcMeter."""
    meters: list[ProcMeter] = []

    def meter(pid: int) -> ProcMeter:
        meters.append(ProcMeter(pid, LAYOUTS[name]))
        return meters[-1]

    if name == "socat":
        r = five_links.socat_one(ups, downs, meter=meter)
    elif name == "bridged":
        r = five_links.bridged_five(ups, downs, meter=meter)
    else:
        r = five_links.bridged_five(ups, downs, make_daemon=lambda: FloorDaemon(LAYOUTS[name]), meter=meter)
    n = len(ups[0][0])
    sends = five_links.LINKS * -(-n // five_links.CHUNK)
    mb = 2 * five_links.LINKS * n / MB
    roles = meters[-1].by_role()
    totals = [sum(v[j] for v in roles.values()) for j in range(4)]
    return {"cpu": r["x_cpu_s_per_mb"] * 1000, "mb_s": r["mb_s"], "wakes": totals[1] / sends,
            "reads": totals[2] / sends, "writes": totals[3] / sends,
            "roles": {role: v[0] * 1000 / mb for role, v in roles.items()},
            "role_calls": {role: (v[1] / sends, v[2] / sends, v[3] / sends) for role, v in roles.items()},
            "role_sys": {role: v[4] / v[0] if v[0] > 0 else 0.0 for role, v in roles.items()}}


def one_run(k: int, per_link: int) -> dict[str, dict]:
    ups = [make_payload(per_link) for _ in range(five_links.LINKS)]
    downs = [make_payload(per_link) for _ in range(five_links.LINKS)]
    k %= len(SYSTEMS)
    order = SYSTEMS[k:] + SYSTEMS[:k]
    res = {name: _measure(name, ups, downs) for name in order}
    for r in res.values():
        r["ratio"] = r["cpu"] / res["socat"]["cpu"]
    return res


def _calls_text(calls) -> str:
    return "/".join(f"{x:.2f}" for x in calls)


def _roles_text(r: dict) -> str:
    return ", ".join(f"{role} {ms:.2f} ({_calls_text(r['role_calls'][role])}, {r['role_sys'][role]:.0%} sys)"
                     for role, ms in sorted(r["roles"].items()) if role != "supervisor" or ms >= 0.005)


def _print_run(k: int, res: dict[str, dict]) -> None:
    print(f"run {k + 1} (order {', '.join(res)}):")
    for name in SYSTEMS:
        r = res[name]
        print(f"  {name:16s} {r['cpu']:6.2f} ms CPU/MB ({r['ratio']:.2f}x socat), {r['mb_s']:6.2f} MB/s; "
              f"per send {r['wakes']:.2f} wake-ups, {r['reads']:.2f} reads, {r['writes']:.2f} writes; "
              f"by process, ms/MB (wake-ups/reads/writes per send, system time's share): {_roles_text(r)}")


def _print_medians(runs: list[dict[str, dict]]) -> None:
    def med(name: str, key: str) -> float:
        return median(r[name][key] for r in runs)

    print(f"\nmedians of {len(runs)} runs (ratio: the median of each run's ratio to that run's socat):\n")
    print("| system | CPU per MB (ms) | ratio to socat | MB/s | wake-ups per send | reads per send "
          "| writes per send | by process: CPU per MB in ms (wake-ups/reads/writes per send, system time's share) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in SYSTEMS:
        roles = sorted({role for r in runs for role in r[name]["roles"]})
        parts = []
        for role in roles:
            ms = median(r[name]["roles"].get(role, 0.0) for r in runs)
            calls = [median(r[name]["role_calls"].get(role, (0, 0, 0))[j] for r in runs) for j in range(3)]
            sys_share = median(r[name]["role_sys"].get(role, 0.0) for r in runs)
            parts.append(f"{role} {ms:.2f} ({_calls_text(calls)}, {sys_share:.0%} sys)")
        print(f"| {name} | {med(name, 'cpu'):.2f} | {med(name, 'ratio'):.2f}x | {med(name, 'mb_s'):.2f} "
              f"| {med(name, 'wakes'):.2f} | {med(name, 'reads'):.2f} | {med(name, 'writes'):.2f} "
              f"| {', '.join(parts)} |")


def main(argv: list[str]) -> int:
    runs = int(argv[0]) if argv else 5
    per_link = int(float(argv[1]) * 1024 * 1024) if len(argv) > 1 else 4 * 1024 * 1024
    tmp, commit = _export_daemon("HEAD")
    code = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h", commit, "--", "bridged"],
                          capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        print(f"five links at full speed, {per_link / 1024 / 1024:g} MiB each way per link, {runs} runs; "
              f"bridged's code of {code} (HEAD {commit[:7]}); load before: {open('/proc/loadavg').read().strip()}")
        results = []
        for k in range(runs):
            results.append(one_run(k, per_link))
            _print_run(k, results[-1])
        _print_medians(results)
        print(f"\nload after: {open('/proc/loadavg').read().strip()}")
    except HashMismatch as exc:
        print(f"five_floor: HASH MISMATCH: {exc}", file=sys.stderr)
        return 1
    except BenchError as exc:
        print(f"five_floor: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
