"""Launching ``bridged run`` as a child process, and cleaning up after one.

For the tools that run devices by the dozen (``bridged fleet``, the Locust
users): each device is a session of its own (a terminal's Ctrl-C reaches the
tool, which stops its devices in order, not every device at once) that dies
with the tool (``PR_SET_PDEATHSIG``: SIGTERM when the tool's thread that
spawned it ends, even through SIGKILL).  That is the spawning *thread*, so a
spawn asked for from another thread than the main one (a test starting
devices in parallel) is made by one thread kept for the process's life: the
device must not die when the thread that asked ends.

``subprocess.Popen`` is looked up at call time, so under gevent's monkey
patching (Locust) the spawn is gevent's and does not block other greenlets.

Cleaning up after a device that exited (`finish`): SIGKILL to the rest of its
session, its leaks removed, and only then the reaping.  Until it is reaped
the exited device still holds its pid, and so its process group's id: a
signal to the group cannot reach another program that took the number
(`exit_status` looks without reaping; ``Popen.poll`` and ``send_signal``
would reap).
"""

from __future__ import annotations

import ctypes
import glob
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["daemon_argv", "exit_status", "finish", "kill_group", "remove_leaks", "spawn"]

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_lasting: ThreadPoolExecutor | None = None  # the thread that spawns for the others (see the docstring)
_lasting_lock = threading.Lock()


def daemon_argv(pty: Path, state_dir: Path, config: str | None = None,
                profile: str | None = None, baud: int | None = None) -> list[str]:
    """``python -m bridged run --pty PTY --state-dir DIR [--config] [--profile] [--baud]``."""
    argv = [sys.executable, "-m", "bridged", "run", "--pty", str(pty), "--state-dir", str(state_dir)]
    for option, value in (("--config", config), ("--profile", profile), ("--baud", baud)):
        if value is not None:
            argv += [option, str(value)]
    return argv


def spawn(argv: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start ``argv`` in a new session, output appended to ``log_path``, dying with us."""
    if _libc.gettid() == os.getpid():  # the main OS thread (also every greenlet under gevent)
        return _spawn(argv, log_path, env)
    global _lasting
    with _lasting_lock:
        if _lasting is None:
            _lasting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridged-spawn")
    return _lasting.submit(_spawn, argv, log_path, env).result()


def _spawn(argv: list[str], log_path: Path, env: Mapping[str, str] | None) -> subprocess.Popen:
    parent = os.getpid()

    def die_with_parent() -> None:  # in the child, between fork and exec
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # we died before the prctl
            os._exit(1)

    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=None if env is None else dict(env), start_new_session=True,
                                preexec_fn=die_with_parent)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a device's whole session (its pid is its process group's id)."""
    if pgid <= 0:  # killpg(0) is our own group: never a device's
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def exit_status(proc: subprocess.Popen) -> int | None:
    """``proc``'s exit status as ``Popen.returncode`` gives it (-N: killed by
    signal N), or None while it runs; it is not reaped (see the module's docstring)."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped by someone else: Popen will say 0
        return proc.wait()
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def finish(proc: subprocess.Popen, pty_link: Path, timeout: float = 5.0) -> int:
    """Wait up to ``timeout`` s for ``proc`` (a device spawned by `spawn`) to exit, SIGKILL
    the rest of its session, remove its leaks unless it exited 0, then reap it.

    Returns:
        Its exit status.

    Raises:
        subprocess.TimeoutExpired: it did not exit in time (it is not signalled).
    """
    deadline = time.monotonic() + timeout
    while (code := exit_status(proc)) is None:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.01)
    if proc.returncode is None:  # not reaped yet: its pid is still its group's
        kill_group(proc.pid)
        if code != 0:
            remove_leaks(proc.pid, pty_link)
    return proc.wait()


def remove_leaks(pid: int, pty_link: Path) -> None:
    """Remove what a supervisor killed with SIGKILL could not: its rings in
    /dev/shm, if any (named bridged-<pid>-..., see bridged.ipc.rings) and its pty
    symlink. The link goes whatever it points at: the pty may outlive the
    supervisor for a moment (its children are still dying), and its number
    may later be another program's."""
    for path in glob.glob(f"/dev/shm/bridged-{pid}-*"):
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        if pty_link.is_symlink():
            pty_link.unlink()
    except OSError:
        pass
