"""Hardware flow control: what each [uart] flow_control / AT+UART_CUR <flow> value does.

ESP-AT's values (AT+UART_CUR's fifth parameter; the factory default is 1,
Kconfig AT_UART_DEFAULT_FLOW_CONTROL): 0 none; 1 RTS: the ESP drops its RTS
when its receive FIFO passes 122 bytes, so it can stop the MCU; 2 CTS: the
ESP sends only while its CTS is asserted, so the MCU can stop it; 3 both.

Linux has one switch for both directions (CRTSCTS: the driver, or a USB
adapter's chip, waits for CTS and drops RTS when its input buffer fills), so:

* none (0): CRTSCTS off; RTS stays asserted, CTS is ignored.
* rts (1): CRTSCTS off, and bridged drives RTS itself (TIOCMBIS/TIOCMBIC):
  deasserted while the front holds input back (its read gate shut for
  back-pressure: a full uplink ring, a port being reopened) or while the
  kernel's input queue is past ``QUEUE_HIGH`` bytes after a read; asserted
  otherwise.  CTS is ignored, so a line without a CTS wire never stalls
  bridged's output.
* cts (2) and rtscts (3): CRTSCTS on.  bridged does not touch RTS, but the
  kernel drops it when its input buffer fills: Linux cannot honour CTS
  without that, so cts behaves as rtscts.  (Polling CTS from user space
  would not do: bytes already in the driver's queue, several KiB, go out
  whatever CTS says.)

A pty has no modem lines (TIOCMBIS fails with ENOTTY): the first failure is
logged once and RTS is left alone from then on.
"""

from __future__ import annotations

import errno
import fcntl
import struct
import termios
from enum import IntEnum
from typing import Callable, Protocol

import structlog

__all__ = ["Flow", "ModemLines", "TtyModemLines", "RtsControl", "crtscts", "QUEUE_HIGH"]

log = structlog.get_logger()

# Bytes in the kernel's input queue (FIONREAD) after a read that mean the MCU
# outruns the front: half the tty's 4 KiB line-discipline buffer.
QUEUE_HIGH = 2048


class Flow(IntEnum):
    """AT+UART_CUR's <flow>."""

    NONE = 0
    RTS = 1
    CTS = 2
    RTSCTS = 3


def crtscts(flow: int) -> bool:
    """Whether the kernel's CRTSCTS is on for ``flow`` (CTS is honoured)."""
    return flow in (Flow.CTS, Flow.RTSCTS)


class ModemLines(Protocol):
    def set_rts(self, asserted: bool) -> None:
        """Assert (True) or deassert (False) RTS; never raises."""


class TtyModemLines:
    """RTS of a real tty through TIOCMBIS/TIOCMBIC."""

    def __init__(self, fd: int, name: str, said: bool = False) -> None:
        self.fd = fd
        self.name = name
        self.usable = True
        self._said = said  # the device at this path had none before: said already

    def set_rts(self, asserted: bool) -> None:
        if not self.usable:
            return
        request = termios.TIOCMBIS if asserted else termios.TIOCMBIC
        try:
            fcntl.ioctl(self.fd, request, struct.pack("I", termios.TIOCM_RTS))
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                self.usable = False  # a pty, or a driver without modem lines: say so once
                if not self._said:
                    log.warning("rts_not_driven", port=self.name,
                                why=f"the port has no modem lines ({exc.strerror})")
            # Anything else (EIO): the device is going away; its read or write says so.


class RtsControl:
    """Drives RTS from the front's back-pressure when the flow is ``rts``; idle otherwise.

    The front tells it when its read gate starts and stops holding input
    (``input_held``) and how much each read returned (``after_read``); the
    port tells it the lines and the flow in force (``attach``).
    """

    def __init__(self, queued: Callable[[], int]) -> None:
        self._queued = queued  # bytes in the kernel's input queue now
        self._lines: ModemLines | None = None
        self._flow = Flow.NONE
        self._held = False
        self._queue_full = False
        self._rts: bool | None = None  # what we last set; None: not ours to know

    def attach(self, lines: ModemLines, flow: int, fresh: bool = False) -> None:
        """Use ``lines`` with ``flow`` (a port just opened: ``fresh``, RTS asserted by the open)."""
        if fresh or lines is not self._lines:
            self._lines, self._rts = lines, True
        self._flow = Flow(flow)
        if self._flow is Flow.RTS:
            # Set at once, whatever the line was: the kernel may have left it
            # dropped (CRTSCTS), and a port without modem lines shows at start.
            self._set(not (self._held or self._queue_full))
        elif self._rts is False:
            # Leaving rts with RTS dropped: give the line back asserted (none),
            # or to the kernel (CRTSCTS) in the state it expects.
            self._set(True)

    def input_held(self, held: bool) -> None:
        self._held = held
        if not held:
            self._queue_full = False  # measured again at the next big read
        self._update()

    def after_read(self, size: int) -> None:
        """A read returned ``size`` bytes: a big one may mean the kernel's queue is filling."""
        if self._flow is not Flow.RTS or (size < QUEUE_HIGH and not self._queue_full):
            return
        self._queue_full = self._queued() >= QUEUE_HIGH
        self._update()

    def _update(self) -> None:
        if self._flow is Flow.RTS and self._lines is not None:
            want = not (self._held or self._queue_full)
            if want != self._rts:
                self._set(want)

    def _set(self, asserted: bool) -> None:
        self._rts = asserted
        self._lines.set_rts(asserted)
