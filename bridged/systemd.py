"""sd_notify(3) and the service watchdog, with no dependency.

Only the supervisor talks to systemd (the unit says NotifyAccess=main): it
sends READY=1 once its children are up, WATCHDOG=1 every `watchdog_interval()`
seconds while every child answers, STOPPING=1 on SIGTERM and RELOADING=1 on
SIGHUP. Outside systemd ($NOTIFY_SOCKET unset) every call is a cheap no-op
returning False, so callers never need to check.

The protocol: one datagram of newline-separated ``KEY=VALUE`` assignments to
the AF_UNIX socket named by $NOTIFY_SOCKET; a name starting with "@" is in the
abstract namespace (the "@" stands for a leading NUL byte).
"""

from __future__ import annotations

import os
import socket
import time

__all__ = [
    "stderr_is_journal",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog_interval",
    "watchdog_ping",
]


def _address() -> str | None:
    name = os.environ.get("NOTIFY_SOCKET", "")
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None  # unset, or a transport we do not speak (vsock:...)


def stderr_is_journal() -> bool:
    """Whether stderr is the journal: $JOURNAL_STREAM names its device:inode (systemd.exec(5))."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


_SEND_TIMEOUT = 1.0  # seconds a notification may wait for room in the manager's queue


def notify(state: str) -> bool:
    """Send one sd_notify message, e.g. ``"READY=1"`` or ``"STATUS=...\\nREADY=1"``.

    Returns:
        True when the datagram was sent, False when not run under systemd
        ($NOTIFY_SOCKET unset or unusable) or the send failed.
    """
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Bounded: a manager that stopped reading (its queue full) must not hold the
            # supervisor, which keeps the children alive; a lost WATCHDOG=1 is sent again.
            sock.settimeout(_SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        # systemd gone or socket not ours to reach: the service goes on,
        # and the caller learns it through the return value.
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Tell systemd start-up is complete (Type=notify)."""
    return notify(_with_status("READY=1", status_text))


def reloading() -> bool:
    """Tell systemd a configuration reload started; send `ready()` when done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    """Tell systemd an orderly stop started."""
    return notify("STOPPING=1")


def watchdog_ping() -> bool:
    """Keep the service watchdog (WatchdogSec=) from firing."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Set the one-line status shown by ``systemctl status``."""
    return notify(_with_status(None, text))


def _with_status(state: str | None, text: str | None) -> str:
    parts = [state] if state else []
    if text is not None:
        parts.append("STATUS=" + " ".join(text.splitlines()))
    return "\n".join(parts)


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings, or None when no watchdog is armed.

    Half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends; None when
    $WATCHDOG_PID names another process (the variable was inherited).
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000
