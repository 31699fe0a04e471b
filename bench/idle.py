"""What an idle daemon costs: wake-ups and CPU per process, doing nothing.

A daemon on a Raspberry Pi runs for years, mostly idle: every wake-up it
makes with nothing to do is CPU, power and cache spent for nothing.  Not a
comparison with socat: a tool, like ``bench.breakdown``, to see which
process wakes and how often.

``bridged run`` on a pty with the default profile (a Wi-Fi station on ``lo``
so that links can open), started with ``python -m bridged`` from the
repository root (the work tree's code).  After boot and a settling pause, two
windows of ``seconds`` each:

* ``no links``: the MCU sent ``AT`` and waits;
* ``5 links``: ``AT+CWJAP``, ``AT+CIPMUX=1`` and five TCP links to listeners
  on 127.0.0.1 that send nothing; nothing moves.

Printed per process (supervisor, front, link workers): wake-ups per second
(voluntary context switches of all its threads) and CPU milliseconds per
second (schedstat run time of all its threads).

Run: ``.venv/bin/python -m bench.idle [seconds]`` (default 10).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from .common import REPO, BenchError, PtyClient, SinkServer, _stop_process, _threads_runtime, now

LINKS = 5
SETTLE = 1.5  # seconds after the last command before a window starts
START_TIMEOUT = 20.0
OK = b"\r\nOK\r\n"
CONFIG = '[wifi]\nstation_interface = "lo"\n'


def switches(pid: int) -> int | None:
    """Voluntary context switches of every thread of ``pid`` (None if it is gone)."""
    total = 0
    try:
        tids = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tids:
        try:
            text = (task / "status").read_text()
        except OSError:
            continue  # a thread that ended meanwhile
        total += next(int(line.split()[1]) for line in text.splitlines()
                      if line.startswith("voluntary_ctxt_switches"))
    return total


def sample(pids: list[int]) -> dict[int, tuple[float, int]]:
    """pid -> (CPU seconds, voluntary context switches)."""
    out = {}
    for pid in pids:
        runtime, n = _threads_runtime(pid), switches(pid)
        if runtime is not None and n is not None:
            out[pid] = (sum(runtime.values()) / 1e9, n)
    return out


def processes(root_pid: int) -> dict[int, str]:
    """The daemon's processes by role: the front is forked first, then the workers in order."""
    root = psutil.Process(root_pid)
    kids = sorted(root.children(), key=lambda p: (p.create_time(), p.pid))
    names = {root_pid: "supervisor"}
    names.update({p.pid: ("front" if i == 0 else f"worker {i - 1}") for i, p in enumerate(kids)})
    return names


def measure(names: dict[int, str], seconds: float) -> list[tuple[str, float, float]]:
    """[(process, wake-ups per s, CPU ms per s)] over ``seconds`` of nothing; the total last."""
    before = sample(list(names))
    t0 = now()
    time.sleep(seconds)
    after = sample(list(names))
    elapsed = now() - t0
    rows = []
    for pid, name in names.items():
        if pid in before and pid in after:
            rows.append((name, (after[pid][1] - before[pid][1]) / elapsed,
                         (after[pid][0] - before[pid][0]) * 1000 / elapsed))
    rows.append(("all", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    return rows


class IdleDaemon:
    """``python -m bridged run`` (the work tree's code) on a pty, default profile."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-idle-"))
        self.link = str(self.tmp / "tty")
        self.log = self.tmp / "bridged.log"
        self.popen: subprocess.Popen | None = None
        self.client: PtyClient | None = None

    def __enter__(self) -> "IdleDaemon":
        config = self.tmp / "bridged.toml"
        config.write_text(CONFIG)
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "bridged", "run", "--config", str(config), "--pty", self.link,
                 "--state-dir", str(self.tmp / "state")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
        try:
            self.client = PtyClient(self.link, timeout=START_TIMEOUT)
            self._until_ok(now() + START_TIMEOUT)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _until_ok(self, deadline: float) -> None:
        """AT until OK: the default profile's boot takes a while."""
        assert self.client is not None and self.popen is not None
        while now() < deadline and self.popen.poll() is None:
            self.client.drain(quiet=0.05, timeout=0.5)
            self.client.write(b"AT\r\n")
            with contextlib.suppress(BenchError):
                if self.client.read_until((OK, b"ERROR\r\n"), timeout=1.0).endswith(OK):
                    return
        raise BenchError(f"bridged never answered AT; its log is {self.log}")

    def command(self, line: bytes, reply: bytes = OK, timeout: float = 20.0) -> None:
        assert self.client is not None
        self.client.write(line + b"\r\n")
        got = self.client.read_until((reply, b"ERROR\r\n", b"FAIL\r\n"), timeout)
        if not got.endswith(reply):
            raise BenchError(f"{line!r}: expected {reply!r}, got {got!r}")

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.popen is not None:
            kids = psutil.Process(self.popen.pid).children(recursive=True) if self.popen.poll() is None else []
            _stop_process(self.popen, "bridged", 10.0, kids)
        shutil.rmtree(self.tmp, ignore_errors=True)


def run(seconds: float) -> dict[str, list[tuple[str, float, float]]]:
    """The two windows' rows: ``no links``, then ``5 links``."""
    results = {}
    with IdleDaemon() as d, contextlib.ExitStack() as stack:
        assert d.popen is not None
        time.sleep(SETTLE)
        results["no links"] = measure(processes(d.popen.pid), seconds)
        peers = [stack.enter_context(SinkServer()) for _ in range(LINKS)]
        d.command(b'AT+CWJAP="bridged","x"')
        d.command(b"AT+CIPMUX=1")
        for link, peer in enumerate(peers):
            d.command(b'AT+CIPSTART=%d,"TCP","127.0.0.1",%d' % (link, peer.port))
        time.sleep(SETTLE)
        results[f"{LINKS} links"] = measure(processes(d.popen.pid), seconds)
    return results


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    for case, rows in run(seconds).items():
        print(f"idle, {case} ({seconds:g} s):")
        for name, wakes, ms in rows:
            print(f"  {name:10s} {wakes:7.1f} wake-ups/s {ms:7.2f} ms CPU/s")


if __name__ == "__main__":
    main()
