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

``--refs A,B``: each run starts the daemon from ``git archive REF bridged``
on its PYTHONPATH (``.`` is the work tree as it stands), the refs in turn
within each round, so both see the same minutes of a noisy machine; the
medians per ref close the output.

``--strace``: one more run of the first ref with ``strace -f -c`` attached to
the front for the measured window; its per-syscall counts per send.

Run: ``.venv/bin/python -m bench.front_split [--sends N] [--runs R] [--refs main,.] [--strace]``
"""

from __future__ import annotations

import argparse
import contextlib
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
WARM = 200
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


def one_run(sends: int, strace: bool = False) -> dict[str, object]:
    data, digest = make_payload((sends + WARM) * CHUNK)
    view = memoryview(data)
    with SinkServer() as sink, Daemon() as d:
        c = d.client
        d.join_wifi()
        c.expect(b"AT+CIPMUX=1\r\n", b"\r\nOK\r\n")
        c.write(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d\r\n' % sink.port)
        got = c.read_until((b"\r\nOK\r\n", b"ERROR\r\n"), STEP_TIMEOUT)
        if not got.endswith(b"\r\nOK\r\n"):
            raise BenchError(f"AT+CIPSTART: {got!r}")
        roles = _roles(d)
        for i in range(WARM):
            _send(c, view, i * CHUNK, CHUNK, i)
        tracer = None
        if strace:
            out = tempfile.mktemp(prefix="front-strace-")
            tracer = subprocess.Popen(["strace", "-f", "-c", "-o", out, "-p", str(roles["front"])],
                                      stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # strace says nothing once attached: give it a moment
        before = {role: _stat(pid) for role, pid in roles.items()}
        switches = {role: psutil.Process(pid).num_ctx_switches().voluntary for role, pid in roles.items()}
        t0 = now()
        for i in range(WARM, WARM + sends):
            _send(c, view, i * CHUNK, CHUNK, i)
        elapsed = now() - t0
        after = {role: _stat(pid) for role, pid in roles.items()}
        wakes = {role: psutil.Process(pid).num_ctx_switches().voluntary - switches[role]
                 for role, pid in roles.items()}
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(10)
        if not sink.wait_bytes(len(data), 30.0) or sink.digest() != digest:
            raise HashMismatch(f"sink holds {sink.nbytes} bytes, not the {len(data)} sent")
    result: dict[str, object] = {"seconds": elapsed}
    for role in roles:
        u = (after[role][0] - before[role][0]) / sends * 1e6
        s = (after[role][1] - before[role][1]) / sends * 1e6
        r = (after[role][2] - before[role][2]) / sends * 1e6
        result[role] = (u, s, r, wakes[role] / sends)
    if tracer is not None:
        with open(out) as f:
            result["strace"] = f.read()
        os.unlink(out)
    return result


@contextlib.contextmanager
def daemon_code(ref: str):
    """The daemon imports bridged from ``ref`` (``.``: the work tree) while inside."""
    if ref == ".":
        yield
        return
    tmp = tempfile.mkdtemp(prefix="front-split-src-")
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
        shutil.rmtree(tmp, ignore_errors=True)


def _row(ref: str, r: dict) -> str:
    f = r["front"]
    w = r.get("worker0", (0, 0, 0, 0))
    return (f"{ref:>10}  front user {f[0]:6.1f} sys {f[1]:6.1f} run {f[2]:6.1f} wake {f[3]:4.2f}"
            f"  | worker0 user {w[0]:5.1f} sys {w[1]:5.1f} run {w[2]:5.1f}  | {r['seconds']:.2f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.front_split", description=__doc__.split("\n")[0])
    ap.add_argument("--sends", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--refs", default=".", help="comma-separated git refs; '.' is the work tree")
    ap.add_argument("--strace", action="store_true")
    args = ap.parse_args(argv)
    refs = [r.strip() for r in args.refs.split(",") if r.strip()]
    print(f"us per AT+CIPSEND=0,{CHUNK} (user, sys from 10 ms ticks; run from schedstat), "
          f"{args.sends} sends a run")
    results: dict[str, list[dict]] = {ref: [] for ref in refs}
    for _ in range(args.runs):
        for ref in refs:
            with daemon_code(ref):
                r = one_run(args.sends)
            results[ref].append(r)
            print(_row(ref, r), flush=True)
    print("medians:")
    for ref, rs in results.items():
        med = {"seconds": median(r["seconds"] for r in rs)}
        for role in ("front", "worker0"):
            med[role] = tuple(median(r[role][k] for r in rs) for k in range(4))
        print(_row(ref, med))
    if args.strace:
        with daemon_code(refs[0]):
            r = one_run(args.sends, strace=True)
        print(f"strace -f -c of the front ({refs[0]}), {args.sends} sends:")
        print(r["strace"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
