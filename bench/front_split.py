"""CPU per AT+CIPSEND=<id>,8192 of each daemon process, user and system apart.

A tool, not a comparison with socat: where a bulk upload's CPU goes, per
send, so a change to the front's hot path can be measured A/B.  One TCP link
(AT+CIPMUX=1, link 0) to a hashing sink on 127.0.0.1; ``sends`` times
``AT+CIPSEND=0,8192``, each waiting for its ``>`` and its
``Recv 8192 bytes`` / ``SEND OK`` as a driver does; the sink must hold
exactly the bytes sent.  Per process (front, link 0's worker, the rest),
from ``/proc/PID/task/*/stat`` (user and system, 10 ms ticks: enough over
thousands of sends) and ``schedstat`` (the total, to the ns), over the
measured window only (a warm-up of ``WARM`` sends first).

``--refs A,B``: one daemon per ref, all at once (each imports ``git archive
REF bridged`` first on its PYTHONPATH; ``.`` is a copy of the work tree as
it stands), one send to each in turn: every ref sees the same moments of a
noisy machine.  ``windows`` windows of ``sends`` sends each; per window the
front's run time of each ref against the first's.  A daemon's own placement
(CPU, memory layout) biases all its windows alike, by up to 15% either way
here: ``runs`` repeats it all with fresh daemons, started in rotated order,
and the median of the runs' ratios is the figure to quote.

``--strace``: ``strace -f -c`` attached to the first ref's front for all
windows (it slows that one: read its counts, not its times).

Run: ``.venv/bin/python -m bench.front_split [--sends N] [--windows W] [--runs R] [--refs main,.] [--strace]``
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil

from .common import REPO, BenchError, Daemon, HashMismatch, SinkServer, median, now
from .cipsend_throughput import make_payload

CHUNK = 8192
WARM = 100
STEP_TIMEOUT = 10.0
_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[float, float, float]:
    """(user s, system s, run time s) of a process, all its threads."""
    user = system = run = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                run += int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
        user += int(fields[11]) / _TICK  # utime, stime: fields 14 and 15 of stat
        system += int(fields[12]) / _TICK
    return user, system, run


def _roles(d: Daemon) -> dict[str, int]:
    """front, worker0 (the first link worker: link 0's), others: by their command lines."""
    root = psutil.Process(d.pid)
    procs = [p for p in root.children(recursive=True)
             if "resource_tracker" not in " ".join(p.cmdline())]
    roles = {"supervisor": root.pid}
    for i, p in enumerate(procs):
        roles["front" if i == 0 else f"worker{i - 1}"] = p.pid
    return roles


def _send(c, view, off: int, n: int, i: int) -> None:
    c.write(b"AT+CIPSEND=0,%d\r\n" % n, STEP_TIMEOUT)
    got = c.read_until((b">", b"ERROR\r\n"), STEP_TIMEOUT)
    if got != b"\r\nOK\r\n\r\n>":
        raise BenchError(f"send #{i}: prompt {got!r}")
    c.write(view[off:off + n], STEP_TIMEOUT)
    got = c.read_until((b"SEND OK\r\n", b"SEND FAIL\r\n", b"ERROR\r\n"), STEP_TIMEOUT)
    if got != b"\r\nRecv %d bytes\r\n\r\nSEND OK\r\n" % n:
        raise BenchError(f"send #{i}: after the payload {got!r}")


class Subject:
    """One daemon (the code of one ref) with one TCP link to its own sink."""

    def __init__(self, stack: contextlib.ExitStack, ref: str, label: str, nbytes: int) -> None:
        self.ref = label
        self.data, self.digest = make_payload(nbytes)
        self.view = memoryview(self.data)
        self.sent = 0
        self.sink = stack.enter_context(SinkServer())
        with daemon_code(stack, ref):  # the daemon imports bridged at its start, from ref
            self.daemon = stack.enter_context(Daemon())
        c = self.client = self.daemon.client
        self.daemon.join_wifi()
        c.expect(b"AT+CIPMUX=1\r\n", b"\r\nOK\r\n")
        c.write(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d\r\n' % self.sink.port)
        got = c.read_until((b"\r\nOK\r\n", b"ERROR\r\n"), STEP_TIMEOUT)
        if not got.endswith(b"\r\nOK\r\n"):
            raise BenchError(f"{ref}: AT+CIPSTART: {got!r}")
        self.roles = _roles(self.daemon)

    def send(self) -> None:
        _send(self.client, self.view, self.sent * CHUNK, CHUNK, self.sent)
        self.sent += 1

    def sample(self) -> dict[str, tuple]:
        return {role: _stat(pid) + (psutil.Process(pid).num_ctx_switches().voluntary,)
                for role, pid in self.roles.items()}

    def check(self) -> None:
        n = self.sent * CHUNK
        if not self.sink.wait_bytes(n, 30.0) or self.sink.digest() != hashlib.sha256(self.data[:n]).hexdigest():
            raise HashMismatch(f"{self.ref}: the sink holds {self.sink.nbytes} bytes, not the {n} sent")


def _per_send(before: dict, after: dict, sends: int) -> dict[str, tuple]:
    """us per send (user, sys, run) and wake-ups per send, by role."""
    return {role: tuple((after[role][k] - before[role][k]) / sends * (1e6 if k < 3 else 1) for k in range(4))
            for role in before}


def measure(refs: list[str], sends: int, windows: int, strace: bool) -> dict[str, list[dict]]:
    """Every ref's daemon at once, one send to each in turn: the same minutes for all.
    ``windows`` windows of ``sends`` sends each; per window and ref, us per send."""
    labels = [ref if refs.count(ref) == 1 else f"{ref}#{i}" for i, ref in enumerate(refs)]
    out: dict[str, list[dict]] = {label: [] for label in labels}
    with contextlib.ExitStack() as stack:
        subjects = [Subject(stack, ref, label, (WARM + sends * windows) * CHUNK)
                    for ref, label in zip(refs, labels)]
        for _ in range(WARM):
            for s in subjects:
                s.send()
        tracer = None
        if strace:
            trace_out = tempfile.mktemp(prefix="front-strace-")
            tracer = subprocess.Popen(["strace", "-f", "-c", "-o", trace_out, "-p",
                                       str(subjects[0].roles["front"])], stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # strace says nothing once attached: give it a moment
        for w in range(windows):
            before = [s.sample() for s in subjects]
            t0 = now()
            for _ in range(sends):
                for s in subjects:
                    s.send()
            elapsed = now() - t0
            for s, b in zip(subjects, before):
                r = _per_send(b, s.sample(), sends)
                r["seconds"] = elapsed
                out[s.ref].append(r)
                print(_row(s.ref, r), flush=True)
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(10)
            with open(trace_out) as f:
                print(f"strace -f -c of the front ({labels[0]}), {sends * windows} sends:\n{f.read()}")
            os.unlink(trace_out)
        for s in subjects:
            s.check()
    return out


@contextlib.contextmanager
def daemon_code(stack: contextlib.ExitStack, ref: str):
    """While inside, a daemon started imports bridged from ``ref`` (``.``: the work
    tree as it is now, copied: edits made meanwhile do not reach it)."""
    tmp = tempfile.mkdtemp(prefix="front-split-src-")
    stack.callback(shutil.rmtree, tmp, True)
    if ref == "." or os.path.isdir(os.path.join(ref, "bridged")):  # a tree, not a ref
        shutil.copytree(os.path.join(REPO if ref == "." else ref, "bridged"), os.path.join(tmp, "bridged"),
                        ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "bridged"],
                                 capture_output=True, timeout=60, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, timeout=60, check=True)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = tmp + (os.pathsep + old if old else "")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _row(ref: str, r: dict) -> str:
    f = r["front"]
    w = r.get("worker0", (0, 0, 0, 0))
    return (f"{ref:>10}  front user {f[0]:6.1f} sys {f[1]:6.1f} run {f[2]:6.1f} wake {f[3]:4.2f}"
            f"  | worker0 user {w[0]:5.1f} sys {w[1]:5.1f} run {w[2]:5.1f}  | {r['seconds']:.2f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.front_split", description=__doc__.split("\n")[0])
    ap.add_argument("--sends", type=int, default=2000, help="sends to each daemon per window")
    ap.add_argument("--windows", type=int, default=4, help="windows per run")
    ap.add_argument("--runs", type=int, default=1,
                    help="runs, each with fresh daemons (a daemon's own placement biases it: "
                         "compare across runs), the refs started in rotated order")
    ap.add_argument("--refs", default=".", help="comma-separated git refs; '.' is the work tree")
    ap.add_argument("--strace", action="store_true")
    args = ap.parse_args(argv)
    refs = [r.strip() for r in args.refs.split(",") if r.strip()]
    print(f"us per AT+CIPSEND=0,{CHUNK} (user, sys from 10 ms ticks; run from schedstat), "
          f"{args.sends} sends to each of {len(refs)} daemons per window, in turn")
    results: dict[str, list[dict]] = {}
    per_run: dict[str, list[float]] = {}
    for run in range(args.runs):
        order = refs[run % len(refs):] + refs[:run % len(refs)]
        got = measure(order, args.sends, args.windows, args.strace and run == 0)
        for label, rs in got.items():
            results.setdefault(label, []).extend(rs)
        labels = [label for label in results if label in got]
        for label in labels[1:]:
            ratio = median(r["front"][2] / b["front"][2] for r, b in zip(got[label], got[labels[0]]))
            per_run.setdefault(label, []).append(ratio)
            print(f"run {run + 1}: front run time {label} / {labels[0]}: {ratio:.3f}", flush=True)
    print("medians over all windows:")
    for ref, rs in results.items():
        med = {"seconds": median(r["seconds"] for r in rs)}
        for role in ("front", "worker0"):
            med[role] = tuple(median(r[role][k] for r in rs) for k in range(4))
        print(_row(ref, med))
    first = list(results)[0]
    for label, ratios in per_run.items():
        print(f"front run time {label} / {first}: median of runs {median(ratios):.3f} "
              f"(runs: {', '.join(f'{x:.3f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
