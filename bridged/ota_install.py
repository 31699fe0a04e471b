"""Running ``[ota] install_command`` on a verified image.

The command gets the image's path as its last argument, the image directory as
cwd, a session of its own (so the timer, AT+RST or a stop kill everything it
started), no fd of ours but stdin (/dev/null), stdout and stderr (uvloop's
subprocess ignores close_fds, hence subprocess.Popen), and only the last
_OUTPUT_KEPT bytes of its output are kept.  We wait for its exit, not for the
end of its output: a job it leaves behind (a scheduled restart) may keep the
pipe open.

It runs with less than bridged has: a small trampoline (a fresh Python,
single-threaded, so no preexec_fn after a fork of a threaded process) empties
the capability bounding set where it may, clears the ambient, inheritable,
permitted and effective capabilities and sets no_new_privs before it execs the
command, so neither the service's AmbientCapabilities nor a setuid or
file-capability program give it any capability (not even as root).  Its
environment is a short allow-list (``_ENV_KEPT``) plus ``BRIDGED_OTA_VERSION``,
``BRIDGED_OTA_PARTITION`` and ``BRIDGED_OTA_SHA256``: no token, no
NOTIFY_SOCKET, nothing else of the service's.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import structlog

__all__ = ["InstallFailed", "run_install"]

log = structlog.get_logger()

_OUTPUT_KEPT = 500  # bytes of install_command's output kept for the log
_INSTALL_POLL = 0.05  # seconds between checks whether install_command exited
_CHUNK = 65536
_ENV_KEPT = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# argv: -c PROGRAM ARGV0 ARGS...; any failure exits 126 (cannot drop) or 127 (cannot exec).
_TRAMPOLINE = r"""
import ctypes, os, sys
def fail(status, what, number):
    os.write(2, f"install_command: {what}: {os.strerror(number)}\n".encode())
    os._exit(status)
libc = ctypes.CDLL(None, use_errno=True)
def prctl(option, arg):
    return libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0))
for cap in range(64):
    prctl(24, cap)  # PR_CAPBSET_DROP: EPERM without CAP_SETPCAP, EINVAL past the last capability
if prctl(47, 4) != 0 and ctypes.get_errno() != 22:  # PR_CAP_AMBIENT_CLEAR_ALL (EINVAL: before 4.3)
    fail(126, "cannot clear the ambient capabilities", ctypes.get_errno())
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
nothing = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2): all empty
if libc.capset(ctypes.byref(Header(0x20080522, 0)), nothing) != 0:
    fail(126, "cannot drop the capabilities", ctypes.get_errno())
if prctl(38, 1) != 0:  # PR_SET_NO_NEW_PRIVS
    fail(126, "cannot set no_new_privs", ctypes.get_errno())
try:
    os.execv(sys.argv[1], sys.argv[2:])
except OSError as exc:
    fail(127, f"cannot run {sys.argv[1]!r}", exc.errno or 0)
"""


class InstallFailed(Exception):
    """install_command could not run or did not exit 0; ``why`` is for the log."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _environment(version: str, partition: str, sha256: str) -> dict[str, str]:
    env = {name: os.environ[name] for name in _ENV_KEPT if name in os.environ}
    env.setdefault("PATH", _DEFAULT_PATH)
    env.update(BRIDGED_OTA_VERSION=version, BRIDGED_OTA_PARTITION=partition, BRIDGED_OTA_SHA256=sha256)
    return env


async def run_install(command: str, image: Path, version: str, partition: str, sha256: str) -> None:
    """Run ``command`` on ``image``; it fails the update unless it exits 0.

    Raises:
        InstallFailed: the program is missing, or the command exited non-zero.
    """
    argv = [*shlex.split(command), str(image)]
    env = _environment(version, partition, sha256)
    name = argv[0]
    if os.sep in name and not os.path.isabs(name):  # relative to its cwd, as exec would take it
        name = str(image.parent / name)
    program = shutil.which(name, path=env["PATH"])
    if program is None:
        raise InstallFailed(f"install_command {argv[0]!r}: no such program, or not executable")
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, os.path.abspath(program), *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=image.parent, env=env, close_fds=True, start_new_session=True)
    except OSError as exc:
        raise InstallFailed(f"install_command {argv[0]!r}: {exc.strerror or exc}") from None
    output = _Tail(process.stdout)
    try:
        while process.poll() is None:
            await asyncio.sleep(_INSTALL_POLL)
    except BaseException:  # cancelled (AT+RST, the timer, a stop): nothing of it may outlive us
        _kill_session(process)
        raise
    finally:
        tail = output.close()
    if process.returncode != 0:
        _kill_session(process)  # what a failed install left running must not act later
        raise InstallFailed(f"install_command exited with status {process.returncode}: {tail}")
    log.info("ota_installed", command=argv[0], output=tail)


class _Tail:
    """The last _OUTPUT_KEPT bytes a pipe delivers, read on the running loop."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.kept = b""
        self.loop = asyncio.get_running_loop()
        os.set_blocking(pipe.fileno(), False)
        self.loop.add_reader(pipe.fileno(), self._read)

    def _read(self) -> bool:
        try:
            data = os.read(self.pipe.fileno(), _CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self.pipe.fileno())
            return False
        self.kept = (self.kept + data)[-_OUTPUT_KEPT:]
        return True

    def close(self) -> str:
        """Stop reading (after what is already there); the kept text."""
        self.loop.remove_reader(self.pipe.fileno())
        for _ in range(64):  # what the command wrote just before it exited
            if not self._read():
                break
        self.pipe.close()
        return self.kept.decode("utf-8", "replace").strip()


def _kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the command's session (its children too) and reap the command."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing of it is left
    process.wait()  # at once: SIGKILL, or it had exited
