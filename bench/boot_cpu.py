"""``python -m bench.boot_cpu [--runs N] [--exec] [--links N] [--boot-ms MS]``: the CPU
one daemon's boot and stop cost, the whole process tree's.

Each run starts ``bridged run --pty`` with the default profile and the test
suite's timing (tests/harness.py's ``with_test_timing``: no boot silence, an
unpaced pty, no association time), opens the pty as the MCU does, waits for
``ready``, sends SIGTERM and waits for the exit.  By default the daemon is
forked from this process after it imported bridged and froze its heap, as the
tests' fork server does (tests/forkserver.py); ``--exec`` starts a new
``python -m bridged`` instead (a service's start on a board).

What is measured, per run:

- at ``ready``: each process's CPU so far (``/proc/PID/schedstat``'s time on
  a CPU, in ns): the supervisor, the front, the link workers summed;
- after the exit: the whole tree's (``os.wait4``'s rusage of the supervisor,
  which includes the children it reaped), and the supervisor's own (read from
  its zombie before it is reaped); "stop" is what came after ``ready``.

Medians over the runs are printed; ``--json`` prints each run's figures too.
Only the pty and loopback are touched; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import select
import signal
import statistics
import sys
import tempfile
import termios
import time
import tty
from pathlib import Path

CONFIG = """\
[wifi]
station_interface = "lo"
connect_delay_ms = 0
[firmware]
boot_ms = {boot_ms}
[uart]
pace = false
[links]
count = {links}
"""
DEADLINE = 20.0


def _cpu_ns(pid: int) -> int:
    """The CPU time of ``pid``'s main thread so far (ns; 0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _tree_cpu_ns(pid: int) -> int:
    """The CPU of every thread of ``pid`` (a child may run a thread or two)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def _faults(pid: int) -> int:
    """Minor page faults of ``pid`` so far (copy-on-write copies among them)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, ValueError, IndexError):
        return 0


def _children(log_path: Path) -> dict[int, str]:
    """pid -> role ("front" or "link") from the daemon's child_started events."""
    roles = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = re.match(r"<\d>(\{.*\})$", line)
        if m:
            event = json.loads(m.group(1))
            if event.get("event") == "child_started":
                roles[event["pid"]] = event["role"]
    return roles


def _fork_daemon(args: list[str], log_path: Path) -> int:
    """``python -m bridged ARGS`` forked from this process (tests/forkserver.py's way)."""
    import runpy

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.closerange(3, 1024)
        sys.argv = ["-m", *args]
        del sys.modules["bridged.__main__"]
        runpy.run_module("bridged", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        sys.stdout.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    finally:
        os._exit(1)


def _exec_daemon(args: list[str], log_path: Path) -> int:
    import subprocess

    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bridged", *args], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    proc.returncode = 0  # we reap it ourselves (wait4), not Popen
    return proc.pid


def _wait_ready(link: Path, pid: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while not link.exists():
        if time.monotonic() > deadline or os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            raise RuntimeError("the daemon made no pty")
        time.sleep(0.002)
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        tty.setraw(fd, termios.TCSANOW)
        buf = b""
        while b"\r\nready\r\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no ready: {buf!r}")
            if select.select([fd], [], [], min(left, 0.5))[0]:
                try:
                    buf += os.read(fd, 4096)
                except BlockingIOError:
                    pass
    finally:
        os.close(fd)


def one_run(tmp: Path, execute: bool) -> dict[str, float]:
    """Boot one daemon to ready, stop it; its CPU figures in ms."""
    link, log_path = tmp / "tty", tmp / "bridged.log"
    log_path.unlink(missing_ok=True)
    args = ["run", "--config", str(tmp / "bridged.toml"), "--pty", str(link), "--state-dir", str(tmp / "state")]
    started = time.monotonic()
    pid = (_exec_daemon if execute else _fork_daemon)(args, log_path)
    try:
        _wait_ready(link, pid)
        ready_wall = time.monotonic() - started
        roles = _children(log_path)
        at_ready = {"supervisor": _cpu_ns(pid), "front": 0, "workers": 0}
        faults = {"supervisor": _faults(pid), "front": 0, "workers": 0}
        for child, role in roles.items():
            at_ready["front" if role == "front" else "workers"] += _tree_cpu_ns(child)
            faults["front" if role == "front" else "workers"] += _faults(child)
        stop_at = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DEADLINE
        while not os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not stop")
            time.sleep(0.001)
        stop_wall = time.monotonic() - stop_at
        sup_total = _cpu_ns(pid)  # the zombie's own, its children's not included
        _, status, usage = os.wait4(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"exit status {os.waitstatus_to_exitcode(status)}:\n{log_path.read_text()[-3000:]}")
    total = (usage.ru_utime + usage.ru_stime) * 1000
    boot = sum(at_ready.values()) / 1e6
    return {"total": total, "boot": boot, "stop": total - boot,
            "boot_supervisor": at_ready["supervisor"] / 1e6, "boot_front": at_ready["front"] / 1e6,
            "boot_workers": at_ready["workers"] / 1e6,
            "stop_supervisor": (sup_total - at_ready["supervisor"]) / 1e6,
            **{f"faults_{role}": n for role, n in faults.items()},
            "ready_wall": ready_wall * 1000, "stop_wall": stop_wall * 1000,
            "children": len(roles)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.boot_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--exec", dest="execute", action="store_true",
                        help="a new python -m bridged per run instead of a fork of this process")
    parser.add_argument("--links", type=int, default=5)
    parser.add_argument("--boot-ms", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="each run's figures too")
    args = parser.parse_args(argv)
    # As under the tests (tests/conftest.py): bytecode kept, not compiled by each daemon.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False
    if not args.execute:
        import bridged.__main__  # noqa: F401 - as the tests' fork server: imported once
        import bridged.supervisor  # noqa: F401

        gc.freeze()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as scratch:
        tmp = Path(scratch)
        (tmp / "bridged.toml").write_text(CONFIG.format(boot_ms=args.boot_ms, links=args.links))
        for _ in range(args.runs):
            figures = one_run(tmp, args.execute)
            runs.append(figures)
            if args.json:
                print(json.dumps({k: round(v, 2) for k, v in figures.items()}), flush=True)
    keys = [k for k in runs[0] if k != "children"]
    print(f"{'exec' if args.execute else 'forked'}, {args.links} links, {args.runs} runs, "
          f"medians in ms of CPU (_wall: elapsed; faults_: minor page faults at ready):")
    for key in keys:
        values = [r[key] for r in runs]
        print(f"  {key:18s} {statistics.median(values):8.1f}   (min {min(values):.1f}, max {max(values):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
