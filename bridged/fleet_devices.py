"""The devices of a fleet (``bridged.fleet``): what the fleet was asked for,
where each device keeps its things, its state and its line in the manifest;
and the notify socket through which a device says ``READY=1``.

Device ``i`` of a fleet in directory ``D`` has its pty at ``D/ttyESPi``, its
state in ``D/state/i``, its runtime directory (control socket) in ``D/run/i``
and its log in ``D/logs/i.log``. The kernel attaches the sender's pid to
each notification (``SO_PASSCRED``), which says which device it is from.
"""

from __future__ import annotations

import enum
import os
import socket
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Device", "DevicePaths", "DeviceState", "FleetSpec", "bind_notify", "device_paths",
           "sender_pid"]


class DeviceState(enum.Enum):
    STARTING = "starting"  # spawned, no READY=1 yet
    READY = "ready"
    BACKOFF = "backoff"  # died; waiting to be started again
    FAILED = "failed"  # died too often in a row; left stopped
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """What ``bridged fleet`` was asked for, validated by the command line."""

    count: int
    directory: Path
    config: str | None = None
    profile: str | None = None
    baud: int | None = None
    concurrency: int = 4  # devices starting (or stopping) at once
    start_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class DevicePaths:
    pty: Path
    state_dir: Path
    run_dir: Path
    log: Path


def device_paths(directory: Path, index: int) -> DevicePaths:
    """Where device ``index`` of the fleet in ``directory`` keeps its things."""
    return DevicePaths(directory / f"ttyESP{index}", directory / "state" / str(index),
                       directory / "run" / str(index), directory / "logs" / f"{index}.log")


@dataclass
class Device:
    index: int
    paths: DevicePaths
    state: DeviceState = DeviceState.STOPPED
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ready_at: float | None = None
    failures: int = 0  # deaths in a row before or soon after READY
    restarts: int = 0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def entry(self) -> dict[str, object]:
        """Its line in the manifest."""
        return {"index": self.index, "pid": self.pid, "state": self.state.value,
                "restarts": self.restarts, "pty": str(self.paths.pty),
                "state_dir": str(self.paths.state_dir), "run_dir": str(self.paths.run_dir),
                "log": str(self.paths.log)}


def bind_notify(name: str) -> socket.socket:
    """The fleet's notify socket, with senders' pids: ``@name`` abstract, else a path
    (one a dead fleet left is replaced)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # 1000 READY=1 at once
    if name.startswith("@"):
        sock.bind("\0" + name[1:])
    else:
        unlink_quietly(name)  # (no other fleet runs in D: bridged.fleet_cli checked)
        sock.bind(name)
    return sock


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sender_pid(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The pid the kernel attached to a notification (SCM_CREDENTIALS); 0 when none."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= 12:
            return struct.unpack("3i", data[:12])[0]
    return 0
