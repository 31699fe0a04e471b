"""``[uart] pace``: a pty that keeps a real UART's time, both ways.

A pty moves bytes as fast as both ends can: an MCU (or its host-side test
build) on one never meets the timing it meets on a wire.  With ``pace`` the
front writes to it (bridged.uart.output) and reads from it no faster than
the line in force: AT+UART_CUR's speed and framing (`line_of`), changed at
run time when the after-action of AT+UART_CUR / AT+UART_DEF applies them.

Reading: `PacedInput` asks the pacer how much may be read now, and once a
read took all of that, holds the front's read gate (hold ``"pace"``) until
the line has room again.  The MCU's further bytes wait in the pty's kernel
buffer and, once it is full, its write waits: with flow control rts this is
RTS holding the MCU back; without, it is a line that takes as long to carry
the bytes as a wire would.  Nothing is dropped either way (an input overrun
is a fault of its own, not pacing's).  The front's read coalescing is off
meanwhile: the pacer batches reads itself, at its own granularity.

A real serial port keeps its own time: there ``pace`` changes nothing
(`wanted` says so once in the log).  A pty given as ``--port`` (an emulated
MCU's, e.g. Zephyr native_sim's) is paced as bridged's own pty is.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat
import struct
import termios

import structlog

from bridged.commands.context import UartSettings
from bridged.readgate import ReadGate
from bridged.uart.pacer import CATCH_UP, Pacer, char_bits2

__all__ = ["PacedInput", "is_pty", "line_of", "wanted", "PACE"]

log = structlog.get_logger()

PACE = "pace"  # the read gate's hold while input is ahead of the line
_PTY_SLAVE_MAJORS = (136, 143)  # Linux's UNIX98_PTY_SLAVE_MAJOR and its 7 successors
FLIP = 0.02  # seconds made up after a read that emptied the pty: the MCU's next bytes may be on their way


def line_of(settings: UartSettings) -> tuple[int, int]:
    """(baud, half-bits per character) of AT+UART_CUR's settings."""
    return settings.baud, char_bits2(settings.data_bits, settings.stop_bits, settings.parity)


def is_pty(fd: int) -> bool:
    """Whether ``fd`` is a pty's slave end (Unix98: majors 136 to 143), which keeps no line rate."""
    try:
        info = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(info.st_mode) and _PTY_SLAVE_MAJORS[0] <= os.major(info.st_rdev) <= _PTY_SLAVE_MAJORS[1]


def wanted(pace: bool, port_name: str, fd: int, serial: bool) -> bool:
    """Whether to pace: asked for, and on a pty: bridged's own, or one given as ``--port`` (an
    emulator's, such as Zephyr native_sim's or socat's).  A real port is said to ignore it, once."""
    real = serial and not is_pty(fd)
    if pace and real:
        log.info("uart_pace_ignored", port=port_name, why="a serial port keeps its own line rate")
    return pace and not real


def _waiting(fd: int) -> int:
    """Bytes the pty holds for us to read."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


class PacedInput:
    """The front's reads from the pty at the line rate: the input pacer, the gate's hold, one timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, gate: ReadGate, settings: UartSettings) -> None:
        self._loop = loop
        self._gate = gate
        self.pacer = Pacer(*line_of(settings), loop.time())
        self._timer: asyncio.TimerHandle | None = None
        self._woken_at = 0.0  # the deadline the timer last fired for

    def _now(self) -> float:
        # uvloop's timers may fire a hair before their deadline (whole ms).
        return max(self._loop.time(), self._woken_at)

    def budget(self) -> int:
        """Bytes that may be read now; 0: none (the gate is held until there is room)."""
        n = self.pacer.allowance(self._now())
        if not n:
            self._hold()
        return n

    def took(self, fd: int, asked: int, got: int) -> None:
        """A read of at most ``asked`` bytes from ``fd`` gave ``got``."""
        # How late a wake-up may be made up: bytes wait for certain, or may wait
        # in the pty's flip buffer (a kernel worker moves them on, late under load).
        credit = CATCH_UP if got >= asked and _waiting(fd) > 0 else FLIP
        self.pacer.charge(got, self._now(), credit)
        if got >= asked:
            self._hold()

    def set_line(self, settings: UartSettings) -> None:
        """AT+UART_CUR's settings apply from now on."""
        self.pacer.set_line(*line_of(settings), self._loop.time())
        if self._timer is not None:  # the deadline was the old speed's
            self._timer.cancel()
            self._timer = None
            self._hold()

    def _hold(self) -> None:
        if self._timer is not None:
            return
        self._gate.hold(PACE)
        deadline = self.pacer.deadline(1 << 30)
        self._timer = self._loop.call_at(deadline, self._room, deadline)

    def _room(self, deadline: float) -> None:
        self._timer = None
        self._woken_at = deadline
        self._gate.release(PACE)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
