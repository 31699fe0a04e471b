"""The supervisor's children: forking one, what it keeps of its parent, and
when a dead one is forked again.

Theory of operation (gunicorn's arbiter forks the same way): the supervisor
runs no event loop and no thread, so a fork copies one consistent process,
and the child builds its own loop afterwards.  What must not cross the fork:

- the supervisor's signal handling.  Its handlers only put the signal's
  number into a wake-up pipe (``signal.set_wakeup_fd``); run in a child, that
  byte would reach the supervisor: a SIGTERM meant for a new worker read as
  the supervisor's own stop.  So the signals stay blocked across the fork;
  the child drops the wake-up fd, closes both ends of the pipe, resets the
  handlers (SIGTERM to its default; SIGINT and SIGHUP ignored, the supervisor
  acts on those for the whole group), and only then unblocks them (a signal
  sent meanwhile is delivered then, to the child's own disposition);
- descriptors and mappings that are not the child's: ``target`` closes
  those before anything else (see ``Supervisor._keep_only``).

A child dies with the supervisor (PR_SET_PDEATHSIG), even after a SIGKILL,
and leaves with ``os._exit`` and ``target``'s status; an exception that
escapes ``target`` is logged and makes the status 1.

Restart policy (`Child.schedule_restart`): at once after the first death,
then with a backoff doubling from 0.25 s up to 5 s while the child keeps dying
within 10 s of its start.  Stopping (`terminate`): SIGTERM, then SIGKILL at a
deadline.

A child and the rings it needs cost descriptors, memory and a process; a
limit reached there ends the daemon (`limit_error`: the one line to print).
"""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

import structlog

from bridged.config import LogConfig
from bridged.log import setup_logging

__all__ = ["SIGNALS", "Child", "StartError", "fork", "kill", "limit_error", "read_wakeup", "terminate"]

log = structlog.get_logger()

#: The signals the supervisor handles (through its wake-up pipe).
SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded once, not in each child
_FAST_DEATH = 10.0
_MAX_BACKOFF = 5.0
# errno -> (what ran out, what to do), for an OSError while making rings or forking.
_LIMITS = {
    errno.EMFILE: ("too many open files", "raise LimitNOFILE= (ulimit -n) or lower links.count"),
    errno.ENFILE: ("too many open files in the system", "raise fs.file-max or lower links.count"),
    errno.ENOMEM: ("out of memory", "lower links.ring_size or links.count"),
    errno.EAGAIN: ("no more processes", "raise TasksMax= or LimitNPROC= (ulimit -u) or lower links.count"),
}


class StartError(Exception):
    """bridged cannot serve (any more); str() is the cause and the remedy, one line."""


def limit_error(exc: OSError, links: int) -> StartError:
    """The StartError for an OSError while making rings or forking; an
    unexpected errno is logged with its traceback (our bug, most likely)."""
    what = f"cannot run {links} links: "
    if exc.errno in _LIMITS:
        problem, remedy = _LIMITS[exc.errno]
        return StartError(f"{what}{problem}; {remedy}")
    log.exception("supervisor_failed")
    return StartError(f"{what}{exc.strerror or exc}; the log has the details")


@dataclass
class Child:
    """One child of the supervisor and its restart state."""

    role: str  # "front" or "link"
    link_id: int | None = None
    pid: int = 0
    started: float = 0.0
    failures: int = 0  # consecutive deaths soon after start
    restart_at: float | None = None  # when to fork again
    restarts: int = 0  # forked again after a death of its own (for `bridged status`)
    # Heartbeats (bridged.liveness): the last ping sent, the last answered,
    # pings missed in a row, when a stuck one gets SIGKILL.
    seq: int = 0
    answered: int = 0
    missed: int = 0
    kill_at: float | None = None

    def ident(self) -> dict[str, int]:
        """Log fields naming the child: link_id for a link worker only."""
        return {} if self.link_id is None else {"link_id": self.link_id}

    def schedule_restart(self, now: float) -> None:
        """It died at ``now``: count the failure and set ``restart_at``."""
        self.failures = self.failures + 1 if now - self.started < _FAST_DEATH else 1
        self.restarts += 1
        delay = 0.0 if self.failures <= 1 else min(_MAX_BACKOFF, 0.25 * 2 ** (self.failures - 2))
        self.restart_at = now + delay


def fork(target: Callable[[], int], role: str, link_id: int | None, log_config: LogConfig,
         wakeup: tuple[int, int]) -> int:
    """Fork a child that runs ``target()`` and exits with its status.

    Args:
        role, link_id: the child's identity in its log events.
        wakeup: the supervisor's wake-up pipe (read end, write end), closed in the child.

    Returns:
        The child's pid (in the supervisor; the child never returns).
    """
    parent = os.getpid()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            _run_child(target, role, link_id, log_config, wakeup, mask, parent)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return pid


def _run_child(target: Callable[[], int], role: str, link_id: int | None, log_config: LogConfig,
               wakeup: tuple[int, int], mask: set[signal.Signals], parent: int) -> None:
    code = 1
    try:
        _leave_supervisor_signals(wakeup, mask)
        # Die with the supervisor, even if it is killed with SIGKILL.
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # It died before the prctl.  Compare with its pid, not with 1: under a
        # subreaper (a user's systemd, a container's init) an orphan's new
        # parent is that process.
        if os.getppid() != parent:
            os._exit(1)
        setup_logging(log_config.level, log_config.format, role, link_id)
        # A stuck child gets SIGABRT from the supervisor (bridged.liveness):
        # its Python stack goes to stderr, the log, before it dies.
        faulthandler.enable()
        code = target()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("child_crashed", role=role)
    finally:
        os._exit(code)


def _leave_supervisor_signals(wakeup: tuple[int, int], mask: set[signal.Signals]) -> None:
    signal.set_wakeup_fd(-1)
    for fd in wakeup:
        os.close(fd)
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C in a terminal, and a hang-up or `pkill -HUP bridged`, reach every
    # process of the group at once; only the supervisor acts on them, stopping
    # the front before the workers (a worker that left on its own would read
    # as a crash) or reloading.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # what came meanwhile is delivered now


def kill(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``; one already gone is no error."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def terminate(children: list[Child], deadline: float, reap: Callable[[], None]) -> None:
    """SIGTERM the living ``children``; SIGKILL those still there at ``deadline``.

    Args:
        reap: collects exits, setting a reaped child's pid to 0.
    """
    children = [c for c in children if c.pid]
    for child in children:
        kill(child.pid, signal.SIGTERM)
    while any(c.pid for c in children) and time.monotonic() < deadline:
        reap()
        time.sleep(0.005)
    for child in children:
        if child.pid:
            log.warning("child_killed", role=child.role, **child.ident())
            kill(child.pid, signal.SIGKILL)
    reap()


def read_wakeup(fd: int) -> bytes:
    """Everything waiting in a signal wake-up pipe (non-blocking): one byte per signal."""
    data = b""
    while fd >= 0:
        try:
            chunk = os.read(fd, 64)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data
