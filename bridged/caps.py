"""Least privilege inside the process tree: capabilities and dumpability.

Theory of operation.  The unit starts bridged with two ambient capabilities
(``AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_NET_RAW``); a root run has
them all.  Each process keeps only what it needs, decided once, right after
it starts (`limit`):

- the supervisor keeps both in its permitted set only (effective empty): it
  opens no socket itself, but the children it forks (again after a crash or
  a reload) take theirs from it (a root run: CAP_SETPCAP too, so that they
  can cut their bounding sets);
- the front keeps CAP_NET_BIND_SERVICE for AT+CIPSERVER (ESP-AT's default
  server port is 333; `[links] local_ports` does not bound the listener),
  and CAP_NET_RAW only when it cannot open an unprivileged ICMP socket
  (net.ipv4.ping_group_range leaves its group out), for AT+PING's raw one;
- a link worker keeps CAP_NET_BIND_SERVICE only when ``[links]
  local_ports`` holds a port below 1024 (a UDP link may bind it any time),
  and never CAP_NET_RAW;
- install_command gets none (bridged.ota_install).

Ports below net.ipv4.ip_unprivileged_port_start (1024 unless an admin
lowered it) are the ones that need CAP_NET_BIND_SERVICE.  A root run keeps
the same and no other capability (uid 0 still owns root's files).

A child cannot know in advance when the MCU asks for a low port or a ping,
so what it keeps it keeps for its life; a reload forks new children, which
decide again.  Capabilities are per thread: `limit` runs before the process
has any other thread, and threads made later inherit the result.

Every set is cut: effective and permitted to what is kept, inheritable and
ambient emptied (nothing bridged executes may inherit anything), and the
bounding set to what is kept where the process may change it (CAP_SETPCAP:
a root run; the unit's CapabilityBoundingSet= and NoNewPrivileges= cover
the service).  Dropping a capability never makes a process dumpable again.

Dumpability: every bridged process holds secrets (the configuration's
Wi-Fi password and OTA token in all of them, copied at fork; TLS private
keys and PSKs in the workers; the rings' memory in the front, and on Python
3.11 an mmap's duplicate of each ring's memfd).  `bridged run` makes itself
non-dumpable before it reads the configuration (PR_SET_DUMPABLE=0, kept
across fork): no core file, and /proc/<pid>/{fd,mem,maps,environ} and
ptrace are closed to another process of the same uid; only a process with
CAP_SYS_PTRACE (root) can look inside.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
from collections.abc import Iterable

import structlog

__all__ = ["Cap", "front_keeps", "limit", "make_undumpable", "worker_keeps"]

log = structlog.get_logger()

_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_SETPCAP = 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_UNPRIVILEGED_PORT_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"


class Cap(enum.IntEnum):
    """The capabilities bridged may use (linux/capability.h numbers)."""

    NET_BIND_SERVICE = 10
    NET_RAW = 13


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                       ctypes.c_ulong(0), ctypes.c_ulong(0))


def _read_int(path: str, default: int) -> int:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


def _last_cap() -> int:
    return _read_int("/proc/sys/kernel/cap_last_cap", 63)


def _first_free_port() -> int:
    """The lowest port a process may bind without CAP_NET_BIND_SERVICE (Linux 4.11+; 1024 before)."""
    return _read_int(_UNPRIVILEGED_PORT_START, 1024)


def _mask(caps: Iterable[int]) -> int:
    return sum(1 << int(cap) for cap in set(caps))


def _capget() -> tuple[int, int, int]:
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(_Header(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"capget: {os.strerror(number)}")
    effective, permitted, inheritable = (getattr(data[0], name) | getattr(data[1], name) << 32
                                         for name in ("effective", "permitted", "inheritable"))
    return effective, permitted, inheritable


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    data = (_Data * 2)()
    for i in (0, 1):
        data[i].effective = effective >> 32 * i & 0xFFFFFFFF
        data[i].permitted = permitted >> 32 * i & 0xFFFFFFFF
        data[i].inheritable = inheritable >> 32 * i & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(_Header(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"capset: {os.strerror(number)}")


def limit(keep: Iterable[Cap], effective: bool = True, hand_down: bool = False) -> frozenset[Cap]:
    """Keep only ``keep`` of the calling thread's capabilities (call it before any thread starts).

    Args:
        keep: what this process needs; one it does not have is not gained.
        effective: False keeps them permitted only (to hand down at fork).
        hand_down: keep CAP_SETPCAP too, permitted only, if the thread has it
            (a root run), so that children can cut their own bounding sets.

    Returns:
        What is kept of ``keep``: less what the thread did not have.

    Raises:
        OSError: the kernel refused to lower a set (never expected).
    """
    now_effective, permitted, _ = _capget()
    kept = frozenset(cap for cap in keep if permitted >> cap & 1)
    mask = _mask(kept)
    if permitted >> _CAP_SETPCAP & 1:
        if hand_down:
            mask |= 1 << _CAP_SETPCAP
        _capset(now_effective | 1 << _CAP_SETPCAP, permitted, 0)  # PR_CAPBSET_DROP needs it effective
        for cap in range(_last_cap() + 1):
            if not mask >> cap & 1:
                _prctl(_PR_CAPBSET_DROP, cap)
    if _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL) != 0 and ctypes.get_errno() != errno.EINVAL:
        number = ctypes.get_errno()  # EINVAL: a kernel before 4.3, which has no ambient set
        raise OSError(number, f"cannot clear the ambient capabilities: {os.strerror(number)}")
    _capset(_mask(kept) if effective else 0, mask, 0)
    log.debug("capabilities_kept", kept=sorted(cap.name for cap in kept), effective=effective)
    return kept


def make_undumpable() -> None:
    """No core file, and /proc/<pid> and ptrace closed to other processes of our uid."""
    if _prctl(_PR_SET_DUMPABLE, 0) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"PR_SET_DUMPABLE: {os.strerror(number)}")


def front_keeps(ping_socket_allowed: bool) -> frozenset[Cap]:
    """The front's: CIPSERVER's low ports (any port); raw ICMP when no ping socket is allowed."""
    keep = set() if ping_socket_allowed else {Cap.NET_RAW}
    if _first_free_port() > 1:
        keep.add(Cap.NET_BIND_SERVICE)
    return frozenset(keep)


def worker_keeps(local_ports: Iterable[tuple[int, int]]) -> frozenset[Cap]:
    """A link worker's: low local ports when ``[links] local_ports`` (parsed) allows one."""
    first_free = _first_free_port()
    return frozenset({Cap.NET_BIND_SERVICE} if any(low < first_free for low, _ in local_ports) else ())
