"""Datagrams to a device's notify socket ($NOTIFY_SOCKET) from outside, as systemd's
sd_notify sends them, by this user or by another (nobody, through setpriv)."""

from __future__ import annotations

import subprocess
import sys

import pytest

__all__ = ["notify", "proc_environ", "skip_unless_nobody_runs_python"]

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")

# Sends argv[2] to the socket named as $NOTIFY_SOCKET names it (argv[1]).
_SEND = """
import socket, sys
name = sys.argv[1]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.sendto(sys.argv[2].encode(), "\\0" + name[1:] if name.startswith("@") else name)
"""


def skip_unless_nobody_runs_python() -> None:
    """Skips the test where nobody cannot run this interpreter (3.13's libpython is private to root)."""
    if subprocess.run([*NOBODY, sys.executable, "-c", ""], capture_output=True, timeout=30).returncode:
        pytest.skip(f"nobody cannot run {sys.executable} (its files are private to root)")


def proc_environ(pid: int) -> dict[str, str]:
    """The environment process `pid` was started with; OSError if it is gone or not ours to read."""
    with open(f"/proc/{pid}/environ", "rb") as file:
        return dict(v.split("=", 1) for v in file.read().decode().split("\0") if "=" in v)


def notify(name: str, message: str, *, as_nobody: bool) -> subprocess.CompletedProcess:
    """`message` sent to the notify socket `name` by a process of ours, or of nobody's."""
    return subprocess.run([*(NOBODY if as_nobody else ()), sys.executable, "-c", _SEND, name, message],
                          capture_output=True, text=True, timeout=30)
