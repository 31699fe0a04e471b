"""Python calls per AT+CIPSEND in the front, and per second at line rate.

A tool, not a comparison.  The daemon runs with a ``sitecustomize`` (a
temporary directory put first on its PYTHONPATH) that installs a SIGUSR1
handler in every process: the first SIGUSR1 starts counting ``sys.setprofile``
events (``call``: a Python function, ``c_call``: a C function called from
Python), the second stops and writes the counts to a JSON file per process.
The counts do not depend on the profiler's own slowness; timings here mean
nothing.  Five TCP links as in ``bench.breakdown``, each case for
``seconds``:

* ``up``: ``AT+CIPSEND=<id>,<chunk>`` paced to 0.1 MB/s per link; calls per
  send = the front's calls / sends;
* ``both``: the same plus 1 KiB +IPD pieces at 0.1 MB/s per link (the
  line-rate case): calls per second;
* ``passive``: one link in passive mode (AT+CIPRECVMODE=1) read as
  ``bench.passive_read``'s driver does, in ``chunk``-byte AT+CIPRECVDATA
  pieces, 64 KiB per second of ``seconds``: calls per read (per "send");
* ``passthrough``: one link in passthrough at line rate, as ``bench.breakdown``'s
  passthrough case (1 KiB pieces at 0.5 MB/s each way): calls per wake-up of
  the front (its voluntary context switches; per "send"), about one a
  coalescing tick.

Run: ``PYTHONPATH=$PWD .venv/bin/python -m bench.calls [seconds] [chunk] [top] [cases]``
(defaults 4, 2048, 25, ``up,both``): prints the totals and the ``top``
functions of the front by count (a C function with the function calling it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from .common import BenchError, Daemon, now
from .streams import (OK, DuplexPeer, check_downlinks, daemon_with_peers, make_payload, paced_cipsends,
                      wait_both_ways)

LINKS = 5
_UNIT = {"passive": "AT+CIPRECVDATA", "passthrough": "front wake-up"}  # what a "send" is
RATE = 100_000
PIECE = 1024

_SITECUSTOMIZE = '''
import collections, json, os, signal, sys
_out = os.environ.get("BRIDGED_CALLS")
if _out:
    _counts = collections.Counter()
    _on = [False]

    def _prof(frame, event, arg):
        if event == "call":
            c = frame.f_code
            _counts["%s:%d %s" % (c.co_filename.rsplit("/bridged/", 1)[-1], c.co_firstlineno, c.co_name)] += 1
        elif event == "c_call":
            _counts["<c> %s in %s" % (getattr(arg, "__qualname__", repr(arg)), frame.f_code.co_name)] += 1

    def _toggle(signum, frame):
        if not _on[0]:
            _counts.clear()
            _on[0] = True
            sys.setprofile(_prof)
            return
        sys.setprofile(None)
        _on[0] = False
        with open("%s.%d" % (_out, os.getpid()), "w") as f:
            json.dump(dict(_counts), f)

    signal.signal(signal.SIGUSR1, _toggle)
'''


def _daemon_processes(root_pid: int) -> tuple[list[psutil.Process], dict[int, str]]:
    """The daemon's children (front first, then the link workers) and their names."""
    procs = [p for p in psutil.Process(root_pid).children(recursive=True)
             if "resource_tracker" not in " ".join(p.cmdline())]
    return procs, {p.pid: ("front" if i == 0 else f"worker {i - 1}") for i, p in enumerate(procs)}


def _toggle(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)


def run_case(mode: str, seconds: float, chunk: int, out: str) -> tuple[dict[str, Counter], float, int]:
    """({process: counts}, elapsed, sends) for one case."""
    up, down = True, mode == "both"
    n = int(RATE * seconds)
    ups = [make_payload(n) for _ in range(LINKS)]
    downs = [make_payload(n if down else 0) for _ in range(LINKS)]
    limit = seconds * 3 + 10
    with contextlib.ExitStack() as stack:
        peers, d, demux = daemon_with_peers(stack, [dn[0] for dn in downs], limit, rate=RATE, piece=PIECE)
        procs, names = _daemon_processes(d.pid)
        _toggle(list(names))
        time.sleep(0.05)
        t0 = now()
        for p in peers:
            p.go.set()
        sends = paced_cipsends(demux, [u[0] for u in ups], RATE, chunk, t0 + limit, f"calls {mode}", 10.0)
        wait_both_ways(demux, peers, ups, downs, f"calls {mode}", max(t0 + limit - now(), 10.0))
        elapsed = now() - t0
        _toggle(list(names))
        counts = _collect(names, out)
        check_downlinks(demux, downs, f"calls {mode}")
    return counts, elapsed, len(sends)


def run_passive(seconds: float, piece: int, out: str) -> tuple[dict[str, Counter], float, int]:
    """({process: counts}, elapsed, reads) for the passive case."""
    from .passive_read import WRITE, _Driver

    data, _ = make_payload(int(65536 * seconds))
    with DuplexPeer(payload=data, piece=WRITE) as peer, Daemon() as d:
        d.join_wifi()
        d.client.expect(b"AT+CIPRECVMODE=1\r\n", OK)
        d.tcp_connect(peer.port)
        if not peer.connected.wait(5.0):
            raise BenchError("calls passive: the peer never saw the TCP connection")
        procs, names = _daemon_processes(d.pid)
        _toggle(list(names))
        time.sleep(0.05)
        driver = _Driver(d.client, piece)
        t0 = now()
        peer.go.set()
        driver.read(len(data), seconds * 10 + 30)
        elapsed = now() - t0
        _toggle(list(names))
        counts = _collect(names, out)
    return counts, elapsed, len(driver.rtts)


def run_passthrough(seconds: float, chunk: int, out: str) -> tuple[dict[str, Counter], float, int]:
    """({process: counts}, elapsed, the front's wake-ups) for one passthrough link at line rate."""
    from .line_rate import RATE as LINE_RATE
    from .streams import Bridge, PacedWriter, read_raw

    n = int(LINE_RATE * seconds)
    up, up_digest = make_payload(n)
    down, down_digest = make_payload(n)
    limit = seconds * 3 + 10
    with DuplexPeer(payload=down, rate=LINE_RATE, piece=PIECE, send_timeout=limit) as peer, \
            Bridge("bridged", peer.port, wait_connected=peer.connected.wait) as b:
        procs, names = _daemon_processes(b.pid)
        writer = PacedWriter(b.client, up, PIECE, LINE_RATE, limit)
        result: list = []
        reader = threading.Thread(target=lambda: result.append(
            read_raw(b.client, n, limit, "calls passthrough downlink")), daemon=True)
        peer.go.set()
        writer.start()
        reader.start()
        time.sleep(min(1.0, seconds / 4))  # the stream under way: its ticks, not its start
        front = procs[0]
        _toggle(list(names))
        wakes, t1 = front.num_ctx_switches().voluntary, now()
        time.sleep(seconds / 2)
        _toggle(list(names))
        wakes, elapsed = front.num_ctx_switches().voluntary - wakes, now() - t1
        reader.join(limit)
        writer.join_checked(limit)
        if not result:
            raise BenchError("calls passthrough: the downlink never all came")
        got = result[0][0]
        peer.check_rx("calls passthrough uplink", n, up_digest, limit)
        counts = _collect(names, out)
        if got != down_digest:
            raise BenchError(f"calls passthrough downlink: sha256 {got}, the peer sent {down_digest}")
    return counts, elapsed, wakes


def _collect(names: dict[int, str], out: str) -> dict[str, Counter]:
    counts: dict[str, Counter] = {}
    for pid, name in names.items():
        path = Path(f"{out}.{pid}")
        for _ in range(200):
            if path.exists() and path.stat().st_size:
                break
            time.sleep(0.01)
        time.sleep(0.05)
        counts[name] = Counter(json.loads(path.read_text()))
    return counts


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    cases = sys.argv[4].split(",") if len(sys.argv) > 4 else ["up", "both"]
    tmp = tempfile.mkdtemp(prefix="bench-calls-")
    Path(tmp, "sitecustomize.py").write_text(_SITECUSTOMIZE)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = tmp + (os.pathsep + old if old else "")
    os.environ["BRIDGED_CALLS"] = str(Path(tmp, "counts"))
    for mode in cases:
        run = {"passive": run_passive, "passthrough": run_passthrough}.get(mode) or functools.partial(run_case, mode)
        counts, elapsed, sends = run(seconds, chunk, os.environ["BRIDGED_CALLS"])
        front = counts["front"]
        total = sum(front.values())
        workers = sum(sum(c.values()) for name, c in counts.items() if name != "front")
        print(f"{mode}: {sends} sends of {chunk} in {elapsed:.1f} s; front {total} calls "
              f"({total / sends:.0f} per {_UNIT.get(mode, 'AT+CIPSEND')}, "
              f"{total / elapsed:.0f}/s), "
              f"workers {workers / elapsed:.0f}/s ({workers / sends:.0f} per send)")
        for key, count in front.most_common(top):
            print(f"  {count / sends:7.2f} per send  {key}")


if __name__ == "__main__":
    main()
