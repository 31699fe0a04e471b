"""The CPU a Python process under uvloop spends per wake-up, doing nothing.

At a paced rate (a UART's 0.5 MB/s) CPU follows wake-ups, not bytes, so this
floor bounds what any Python design can reach: wake-ups per second times
this figure, before a line of our own code runs.  Not a comparison with
socat (``line_rate`` reports socat's CPU per wake-up in the same run).

Three ways to be woken, each ``COUNT`` times at ``EVERY`` seconds, in a
forked child running uvloop; its CPU is the schedstat run time of its
thread, its wake-ups its voluntary context switches:

* ``eventfd``: a callback registered with ``add_reader`` on an eventfd that
  the parent writes (a doorbell from another process, as the rings ring);
* ``pipe``: the same for a pipe the parent writes one byte into;
* ``timer``: ``call_later`` chained (a timer wake-up: a read window's tick,
  a held URC).

Run: ``.venv/bin/python -m bench.wake_floor [runs]`` (default 3; medians).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

import psutil
import uvloop

from .common import _threads_runtime

COUNT = 1000
EVERY = 0.002
TIMEOUT = 30.0


def _self_usage() -> tuple[int, int]:
    """(nanoseconds on CPU, voluntary context switches) of the calling thread."""
    with open("/proc/thread-self/schedstat", "rb") as f:
        ns = int(f.read().split()[0])
    with open("/proc/thread-self/status", "rb") as f:
        switches = next(int(line.split()[1]) for line in f if line.startswith(b"voluntary_ctxt_switches"))
    return ns, switches


def _child(kind: str, fd: int, report: int) -> None:
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        seen = 0

        def on_ready() -> None:
            nonlocal seen
            # Count events, not reads: two rings that land before the child
            # runs are one read, and counting reads would wait forever.
            if kind == "eventfd":
                seen += os.eventfd_read(fd)
            else:
                seen += len(os.read(fd, 4096))
            if seen >= COUNT:
                finished.set_result(None)

        def on_timer() -> None:
            nonlocal seen
            seen += 1
            if seen >= COUNT:
                finished.set_result(None)
            else:
                loop.call_later(EVERY, on_timer)

        if kind == "timer":
            loop.call_later(EVERY, on_timer)
        else:
            loop.add_reader(fd, on_ready)
        await asyncio.sleep(0.1)  # settle; the parent starts after "ready"
        before = _self_usage()
        os.write(report, b"ready\n")
        await asyncio.wait_for(finished, TIMEOUT)
        after = _self_usage()
        return after[0] - before[0], after[1] - before[1]

    ns, switches = uvloop.run(main())
    os.write(report, f"{ns} {switches}\n".encode())


def one(kind: str) -> tuple[float, float]:
    """(CPU microseconds per wake-up, context switches per event) for one way."""
    if kind == "eventfd":
        fd = wfd = os.eventfd(0, os.EFD_NONBLOCK)
    else:
        fd, wfd = os.pipe()
        os.set_blocking(fd, False)
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the benchmark
        code = 0
        try:
            _child(kind, fd, report_w)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(report_w)  # a child that fails closes the pipe: the reads below end
    try:
        with os.fdopen(os.dup(report_r), "rb") as report:
            if report.readline() != b"ready\n":
                raise RuntimeError("child did not start")
            if kind != "timer":
                start = time.monotonic()
                for i in range(COUNT):
                    time.sleep(max(0.0, start + (i + 1) * EVERY - time.monotonic()))
                    if kind == "eventfd":
                        os.eventfd_write(wfd, 1)
                    else:
                        os.write(wfd, b"x")
            line = report.readline().split()  # the child ends within TIMEOUT
        _, status = os.waitpid(pid, 0)
        if status != 0 or len(line) != 2:
            raise RuntimeError(f"child failed (status {status})")
    finally:
        for f in {fd, wfd, report_r}:
            os.close(f)
    return int(line[0]) / 1e3 / COUNT, int(line[1]) / COUNT


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for kind in ("eventfd", "pipe", "timer"):
        results = [one(kind) for _ in range(runs)]
        us = statistics.median(r[0] for r in results)
        per = statistics.median(r[1] for r in results)
        print(f"{kind:8s} {us:6.1f} us CPU per wake-up (median of {runs}; "
              f"{per:.2f} context switches per event; runs: "
              f"{', '.join(f'{r[0]:.1f}' for r in results)})")


if __name__ == "__main__":
    main()
