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


class _Server:
    """The daemons' parent: ``python -m bench.boot_cpu --serve``, which forks each
    daemon as tests/forkserver.py does (imports done and frozen first; the child
    runs ``bridged`` with ``runpy`` at the top level, so its exit is a whole
    interpreter's) or, with ``--exec``, forks and execs ``python -m bridged``.
    It reaps each and reports its CPU (``wait4``: the daemon and the children it
    reaped) and the supervisor's own (read from its zombie)."""

    def __init__(self, execute: bool) -> None:
        import subprocess

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # As under the tests (tests/conftest.py): bytecode kept, not compiled by each daemon.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        argv = [sys.executable, "-m", "bench.boot_cpu", "--serve", *(["--exec"] if execute else [])]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=Path(__file__).resolve().parent.parent, env=env)

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], DEADLINE)[0]:
            raise RuntimeError("the bench's server did not answer")
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(DEADLINE)


def _serve(execute: bool) -> list[str] | None:
    """The server's loop (see `_Server`); returns the daemon's arguments in a forked daemon."""
    if not execute:
        import bridged.__main__  # noqa: F401 - as the tests' fork server: imported once
        import bridged.supervisor  # noqa: F401

        gc.freeze()
    requests, replies = os.dup(0), os.dup(1)
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = os.read(requests, 4096)
            if not chunk:
                return None
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        request = json.loads(line)
        if "args" in request:
            pid = os.fork()
            if pid == 0:
                fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.closerange(3, 1024)
                if execute:
                    os.execv(sys.executable, [sys.executable, "-m", "bridged", *request["args"]])
                return request["args"]
            answer = {"pid": pid}
        else:
            pid = request["wait"]
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            own = _cpu_ns(pid)  # the zombie's own CPU, its children's not included
            _, status, usage = os.wait4(pid, 0)
            answer = {"code": os.waitstatus_to_exitcode(status), "own_ns": own,
                      "total_ms": (usage.ru_utime + usage.ru_stime) * 1000}
        os.write(replies, json.dumps(answer).encode() + b"\n")


def _gone(pid: int) -> bool:
    """``pid`` has exited (a zombie, or reaped): not our child, so /proc says."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _wait_ready(link: Path, pid: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while not link.exists():
        if time.monotonic() > deadline or _gone(pid):
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


def one_run(server: _Server, tmp: Path) -> dict[str, float]:
    """Boot one daemon to ready, stop it; its CPU figures in ms."""
    link, log_path = tmp / "tty", tmp / "bridged.log"
    log_path.unlink(missing_ok=True)
    args = ["run", "--config", str(tmp / "bridged.toml"), "--pty", str(link), "--state-dir", str(tmp / "state")]
    started = time.monotonic()
    pid = server.ask({"args": args, "log": str(log_path)})["pid"]
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
        while not _gone(pid):
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not stop")
            time.sleep(0.001)
        stop_wall = time.monotonic() - stop_at
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        end = server.ask({"wait": pid})
    if end["code"] != 0:
        raise RuntimeError(f"exit status {end['code']}:\n{log_path.read_text()[-3000:]}")
    total = end["total_ms"]
    boot = sum(at_ready.values()) / 1e6
    return {"total": total, "boot": boot, "stop": total - boot,
            "boot_supervisor": at_ready["supervisor"] / 1e6, "boot_front": at_ready["front"] / 1e6,
            "boot_workers": at_ready["workers"] / 1e6,
            "stop_supervisor": (end["own_ns"] - at_ready["supervisor"]) / 1e6,
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
    runs = []
    server = _Server(args.execute)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-boot-") as scratch:
            tmp = Path(scratch)
            (tmp / "bridged.toml").write_text(CONFIG.format(boot_ms=args.boot_ms, links=args.links))
            for _ in range(args.runs):
                figures = one_run(server, tmp)
                runs.append(figures)
                if args.json:
                    print(json.dumps({k: round(v, 2) for k, v in figures.items()}), flush=True)
    finally:
        server.close()
    keys = [k for k in runs[0] if k != "children"]
    print(f"{'exec' if args.execute else 'forked'}, {args.links} links, {args.runs} runs, "
          f"medians in ms of CPU (_wall: elapsed; faults_: minor page faults at ready):")
    for key in keys:
        values = [r[key] for r in runs]
        print(f"  {key:18s} {statistics.median(values):8.1f}   (min {min(values):.1f}, max {max(values):.1f})")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        daemon_args = _serve("--exec" in sys.argv)
        if daemon_args is None:
            sys.exit(0)
        # A forked daemon: `python -m bridged ARGS` from here, as tests/forkserver.py runs it.
        import runpy

        sys.argv = ["-m", *daemon_args]
        del sys.modules["bridged.__main__"]
        runpy.run_module("bridged", run_name="__main__", alter_sys=True)
    else:
        sys.exit(main())
