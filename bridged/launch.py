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
"""

from __future__ import annotations

import ctypes
import glob
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["daemon_argv", "kill_group", "remove_leaks", "spawn"]

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
