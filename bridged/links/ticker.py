"""A periodic timer on the monotonic clock's grid: read batching's ticks (``links.batching``).

Theory of operation.  Read batching reads a stream once per period, on the
multiples of the period (one grid for all workers, so the front wakes once for
all links).  Armed with ``call_at`` for every tick, uvloop builds a timer handle
per tick and closes it once fired, which costs an extra turn of the loop (an
epoll_wait that returns at once) besides the handle: a timer wake-up cost
~30 us more CPU than an fd wake-up (a do-nothing uvloop process woken every
10 ms here).  A ``Ticker`` is one timerfd, watched by the loop for good: armed
once with an interval (absolute ``CLOCK_MONOTONIC``, the clock of
``loop.time()``), it fires on every multiple of the period until disarmed,
and a tick is one fd wake-up and one 8-byte read.

Disarming resets the count of expirations, so a tick that fired before
``disarm()`` and was not yet read is dropped (its read says EAGAIN), as a
cancelled ``call_at`` would be.  A late loop that misses ticks gets one
callback for all of them, as chained ``call_at``s would.

Python 3.13 has ``os.timerfd_create``; 3.11 and 3.12 reach the same system
calls through libc with ctypes.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from typing import Callable

__all__ = ["Ticker"]

_TFD_TIMER_ABSTIME = 1  # linux/timerfd.h
_NS = 1_000_000_000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timespec(seconds: float) -> _Timespec:
    ns = round(seconds * _NS)
    return _Timespec(ns // _NS, ns % _NS)


class _LibcTimerfd:
    """timerfd_create / timerfd_settime through libc (Python before 3.13)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)

    def create(self) -> int:
        fd = self._libc.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        return fd

    def settime(self, fd: int, first: float, interval: float) -> None:
        spec = _Itimerspec(_timespec(interval), _timespec(first))
        if self._libc.timerfd_settime(fd, _TFD_TIMER_ABSTIME if first else 0, ctypes.byref(spec), None) < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))


class _OsTimerfd:
    """The same through ``os`` (Python 3.13 and later)."""

    def create(self) -> int:
        return os.timerfd_create(time.CLOCK_MONOTONIC, flags=os.TFD_NONBLOCK | os.TFD_CLOEXEC)

    def settime(self, fd: int, first: float, interval: float) -> None:
        os.timerfd_settime(fd, flags=os.TFD_TIMER_ABSTIME if first else 0, initial=first, interval=interval)


def _timerfd() -> _OsTimerfd | _LibcTimerfd:
    return _OsTimerfd() if hasattr(os, "timerfd_create") else _LibcTimerfd()


class Ticker:
    """Calls ``callback`` at ``first``, then every ``period`` seconds on, until ``disarm()``.

    Raises:
        OSError: no timerfd (no descriptors left).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._timerfd = _timerfd()
        self._fd = self._timerfd.create()
        self.armed = False
        loop.add_reader(self._fd, self._on_fd)

    def arm(self, first: float, period: float) -> None:
        """Tick at ``first`` (``time.monotonic()``'s clock, as ``loop.time()``) and every ``period`` after.

        Raises:
            OSError: timerfd_settime refused (the caller turns read batching off).
        """
        self._timerfd.settime(self._fd, first, period)
        self.armed = True

    def disarm(self) -> None:
        """No more ticks, not even one that fired and is not yet called back.

        Raises:
            OSError: timerfd_settime refused: it may tick on (the caller closes it).
        """
        if self.armed:
            self._timerfd.settime(self._fd, 0, 0)
            self.armed = False

    def _on_fd(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return  # disarmed since it fired
        self._callback()

    def close(self) -> None:
        if self._fd < 0:
            return
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self.armed = False
