"""A long soak: the churn a host driver causes, for minutes, with every
daemon process's footprint printed as it goes.

A tool, not a comparison with socat (as ``bench.idle``): the same cycles
as tests/integration/test_soak.py (tests/soakcycles.py), driven as a host
driver drives a chip (exact bytes, the next command the instant OK arrives,
64-byte reads), in turn: links opened, used and closed over five links
(TCP, UDP, SSL to a TLS echo server), peers that close or reset first,
failed connects and handshakes, a flooding peer cut off, `bridged status`
requests, control-socket clients that vanish mid-request, a
CIPSERVER with clients that come and vanish, passive reads, passthrough
entered and left with +++, AT+RST.  Each scenario runs ``--phase`` seconds,
then an AT+RST and the next scenario's settings.  After a warm-up round of
every scenario the daemon's processes are sampled (tests/soakprobe.py:
descriptors, threads, mappings, named mappings, RSS, /dev/shm entries) and
again every ``--every`` seconds, printed as the change since the warm-up.

Exit status: 0 when no process holds more descriptors, threads, named
mappings or /dev/shm entries at the end than after the warm-up, none has
8 MiB more anonymous memory (`ANON_LIMIT_KIB`) and none was restarted; 1
otherwise; 2 if a cycle failed (wrong bytes, timeout).

Run: ``.venv/bin/python -m bench.soak --minutes 10`` (from the repository root:
the daemon is the work tree's code, ``python -m bridged`` started anew).
Only 127.0.0.1 is addressed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.harness import Daemon, Demux, free_port
from tests.integration.test_tls import TlsServer, _issue
from tests.soakcycles import (DriverHost, Peers, control_cycle, failure_cycle, link_cycle, passive_cycle,
                              passthrough_cycle, peer_first_cycle, reset_cycle, server_cycle)
from tests.soakprobe import growth, processes, sample, table


# A process's anonymous memory grows by 0.2-3 MiB after the warm-up, then levels
# off (bench/RESULTS.md, "Soak"); a leak of 16 KiB per AT+CIPCLOSE planted in
# the front added 160 MiB in ten minutes.
ANON_LIMIT_KIB = 8 * 1024


def scenarios(host: DriverHost, peers: Peers, server_port: int, control: str):
    """(name, settings after a reset, cycle) for each scenario, in the order they run."""
    demux = Demux(host)
    return [
        # (a reset ends with AT+CIPMUX=1: tests/soakcycles.reset_cycle)
        ("links", [b"AT+CIPMUX=1"], lambda i: link_cycle(demux, peers, i)),
        ("peer first", [b"AT+CIPMUX=1"], lambda i: peer_first_cycle(host, peers, i)),
        ("failures", [b"AT+CIPMUX=1"], lambda i: failure_cycle(demux, peers, i, control)),
        ("control", [], lambda i: control_cycle(control, i)),
        ("server", [b"AT+CIPMUX=1", b"AT+CIPSERVER=1,%d" % server_port],
         lambda i: server_cycle(host, server_port, i)),
        ("passive", [b"AT+CIPMUX=1", b"AT+CIPRECVTYPE=5,1"], lambda i: passive_cycle(host, peers, i)),
        ("passthrough", [b"AT+CIPMUX=0", b"AT+SYSMSG=1", b"AT+CIPMODE=1"], lambda i: passthrough_cycle(host, peers, i)),
        ("reset", [b"AT+CIPMUX=1"], lambda i: reset_cycle(host, peers, i)),
    ]


def run_phase(host: DriverHost, peers: Peers, settings: list[bytes], cycle, seconds: float) -> int:
    """A reset, the scenario's settings, then its cycle for ``seconds``; the cycles run."""
    reset_cycle(host, peers, 1)  # odd: no link opened first
    for line in settings:
        host.command(line)
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        cycle(done)
        done += 1
    return done


def soak(minutes: float, phase: float, every: float, work: Path) -> int:
    os.environ["BRIDGED_TEST_FORKSERVER"] = "0"  # a daemon of its own, as a service starts it
    tls = TlsServer(_issue(work, "server", "localhost")[0])
    peers = Peers(tls=tls)
    (work / "d").mkdir()
    daemon = Daemon(work / "d").start()
    try:
        host = DriverHost(daemon.link)
        host.boot()
        table_of = scenarios(host, peers, free_port(), str(daemon.state_dir / "control.sock"))
        roles = processes(daemon)
        for _name, settings, cycle in table_of:  # the warm-up
            run_phase(host, peers, settings, cycle, min(phase, 3.0))
        first = sample(roles)
        print(f"after warm-up (pids {roles}):\n{table(first)}", flush=True)
        counts = {name: 0 for name, _, _ in table_of}
        start = last = time.monotonic()
        while time.monotonic() - start < minutes * 60:
            for name, settings, cycle in table_of:
                counts[name] += run_phase(host, peers, settings, cycle, phase)
            if time.monotonic() - last >= every:
                last = time.monotonic()
                _print(start, counts, first, sample(roles))
        final = sample(roles)
        _print(start, counts, first, final)
        return _verdict(daemon, roles, first, final)
    finally:
        daemon.stop()
        peers.close()


def _print(start: float, counts: dict[str, int], first, now) -> None:
    print(f"\n{(time.monotonic() - start) / 60:.1f} min, cycles: "
          + ", ".join(f"{name} {n}" for name, n in counts.items()))
    print(table(now))
    print("change since warm-up: " + "; ".join(
        f"{role} " + " ".join(f"{k} {v:+d}" for k, v in g.items() if v) for role, g in growth(first, now).items()
        if any(g.values())), flush=True)


def _verdict(daemon: Daemon, roles: dict[str, int], first, final) -> int:
    if processes(daemon) != roles:
        print("FAIL: a process was restarted")
        return 1
    grown = {role: g for role, g in growth(first, final).items()
             if max(g["fds"], g["threads"], g["named"], g["shm"]) > 0 or g["anon_kib"] > ANON_LIMIT_KIB}
    if grown:
        print(f"FAIL: held more than after the warm-up: {grown}")
        return 1
    print("OK: no descriptor, thread, named mapping or /dev/shm entry more than after the warm-up, "
          f"and no process's anonymous memory {ANON_LIMIT_KIB // 1024} MiB more")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to soak (default 10)")
    parser.add_argument("--phase", type=float, default=10.0, help="seconds per scenario in turn (default 10)")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between samples printed (default 60)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bridged-soak-") as work:
        try:
            return soak(args.minutes, args.phase, args.every, Path(work))
        except AssertionError as exc:
            traceback.print_exc()
            print(f"FAIL: a cycle went wrong: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
