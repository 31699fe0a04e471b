"""The serial side: a real UART through pyserial, or a pseudo-terminal.

A pty stands in for the UART in tests and in ``make run``.  It is created by
the supervisor so that it outlives a restarted front, its slave end is put in
raw mode at once (no echo, ever), and the daemon keeps a slave descriptor open
so that a host closing and reopening the port never leaves the master without
a peer (which would make reads fail with EIO).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios
import tty
from dataclasses import dataclass
from pathlib import Path

import structlog

from bridged.commands.context import UartSettings

__all__ = ["Pty", "open_pty", "SerialPort", "open_serial", "apply_termios", "drain", "FLOW_NAMES", "PARITY_NAMES"]

log = structlog.get_logger()

FLOW_NAMES = {"none": 0, "rts": 1, "cts": 2, "rtscts": 3}
PARITY_NAMES = {"none": 0, "odd": 1, "even": 2}


@dataclass
class Pty:
    master: int
    slave: int
    path: str  # /dev/pts/N
    link: str | None  # the symlink we made, if any

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.link:
            try:
                if os.path.islink(self.link) and os.readlink(self.link) == self.path:
                    os.unlink(self.link)
            except OSError:
                pass


def open_pty(link: str | None) -> Pty:
    """Create a raw pty; symlink its slave at ``link`` (replacing a stale link)."""
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    path = os.ttyname(slave)
    if link:
        target = Path(link)
        if target.is_symlink() or target.exists():
            if not target.is_symlink():
                os.close(master)
                os.close(slave)
                raise FileExistsError(f"{link} exists and is not a symlink; not replacing it")
            target.unlink()
        target.symlink_to(path)
    os.set_blocking(master, False)
    return Pty(master, slave, path, link)


def apply_termios(fd: int, settings: UartSettings) -> None:
    """Put AT+UART_CUR's settings on a tty (a pty has no wires, but keeps them).

    Raises:
        ValueError: a speed termios does not know.
    """
    speed = getattr(termios, f"B{settings.baud}", None)
    if speed is None:
        raise ValueError(f"{settings.baud} baud is not a termios speed")
    attrs = termios.tcgetattr(fd)
    cflag = attrs[2] & ~(termios.CSIZE | termios.CSTOPB | termios.PARENB | termios.PARODD | termios.CRTSCTS)
    cflag |= {5: termios.CS5, 6: termios.CS6, 7: termios.CS7, 8: termios.CS8}[settings.data_bits]
    if settings.stop_bits != 1:  # 1.5 has no POSIX form: two, as pyserial does
        cflag |= termios.CSTOPB
    if settings.parity:
        cflag |= termios.PARENB | (termios.PARODD if settings.parity == 1 else 0)
    if settings.flow:
        cflag |= termios.CRTSCTS
    attrs[2] = cflag
    attrs[4] = attrs[5] = speed
    termios.tcsetattr(fd, termios.TCSADRAIN, attrs)


def _out_queue(fd: int) -> int:
    """Bytes written to the tty that its driver has not sent yet (0 on a pty)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0


async def drain(fd: int, deadline: float) -> bool:
    """Wait until the port has sent what was written to it, at most until ``deadline``.

    The kernel's queue is polled rather than waited on with tcdrain: with flow
    control the MCU may hold CTS low for ever, and the loop must go on.  Once
    it is empty tcdrain only waits for the UART's FIFO (serial_core bounds that
    wait; a USB adapter's driver may not, if CTS stays low with bytes in it).
    What is still queued at ``deadline`` (the event loop's clock) is discarded,
    as a restarting chip's UART loses it.  A pty has no queue.

    Returns:
        False when output was discarded or the port failed.
    """
    loop = asyncio.get_running_loop()
    try:
        while _out_queue(fd):
            if loop.time() >= deadline:
                termios.tcflush(fd, termios.TCOFLUSH)
                return False
            await asyncio.sleep(0.002)
        termios.tcdrain(fd)
    except (termios.error, OSError):  # the device went away: nothing left to send
        return False
    return True


_STOP_BITS = {1: 1, 2: 1.5, 3: 2}
_PARITY = {0: "N", 1: "O", 2: "E"}


class SerialPort:
    """A real UART opened with pyserial; its fd is then driven by the loop."""

    def __init__(self, device: str, settings: UartSettings) -> None:
        import serial  # imported here: a pty-only run never needs it

        self._serial = serial.Serial()
        self._serial.port = device
        self._configure(settings)
        self._serial.exclusive = True
        self._serial.open()
        self.fd = self._serial.fileno()
        os.set_blocking(self.fd, False)

    def _configure(self, settings: UartSettings) -> None:
        s = self._serial
        s.baudrate = settings.baud
        s.bytesize = settings.data_bits
        s.stopbits = _STOP_BITS[settings.stop_bits]
        s.parity = _PARITY[settings.parity]
        # ESP-AT flow 1 = RTS (we hold the MCU off), 2 = CTS (it holds us off).
        # termios has one switch for both directions, so any of them enables it.
        s.rtscts = settings.flow != 0

    def apply(self, settings: UartSettings) -> None:
        termios.tcdrain(self.fd)
        self._configure(settings)

    def close(self) -> None:
        self._serial.close()


def open_serial(device: str, settings: UartSettings) -> SerialPort:
    return SerialPort(device, settings)
