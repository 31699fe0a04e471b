"""The serial side: a real UART through pyserial, or a pseudo-terminal.

A pty stands in for the UART in tests and in ``make run``.  It is created by
the supervisor so that it outlives a restarted front, its slave end is put in
raw mode at once (no echo, ever), and the daemon keeps a slave descriptor open
so that a host closing and reopening the port never leaves the master without
a peer (which would make reads fail with EIO).

A port that cannot be used raises `PortError`, whose text is the one line an
admin reads: what is wrong with which path, then what to do about it.  Such a
failure at start is permanent for this run (the daemon exits 1 and systemd's
Restart=on-failure decides when to try again); a device that vanishes while
serving is waited for and reopened (``SerialPort.reopen``, bridged.uart.replug).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat
import struct
import termios
import tty
from dataclasses import dataclass
from pathlib import Path

import structlog

from bridged.commands.context import UartSettings
from bridged.uart.flow import RtsControl, TtyModemLines, crtscts

__all__ = ["Pty", "PortError", "open_pty", "SerialPort", "open_serial", "apply_termios", "drain",
           "FLOW_NAMES", "PARITY_NAMES"]

log = structlog.get_logger()

FLOW_NAMES = {"none": 0, "rts": 1, "cts": 2, "rtscts": 3}
PARITY_NAMES = {"none": 0, "odd": 1, "even": 2}


class PortError(Exception):
    """The serial port or the pty cannot be used; str() is the cause and the remedy."""


# errno -> (what is wrong with the device, what to do), for a --port that fails to open.
_SERIAL_FAULTS = {
    errno.ENOENT: ("does not exist", "plug the device in or choose another --port"),
    errno.ENXIO: ("has no device behind it (unplugged?)", "plug the device in or choose another --port"),
    errno.ENODEV: ("has no device behind it (unplugged?)", "plug the device in or choose another --port"),
    errno.EACCES: ("cannot be opened (permission denied)",
                   "add bridged's user to the device's group (e.g. dialout) or choose another --port"),
    errno.EPERM: ("cannot be opened (operation not permitted)",
                  "allow bridged the device (systemd: DeviceAllow=) or choose another --port"),
    errno.EWOULDBLOCK: ("is in use by another process (locked)", "stop it or choose another --port"),
    errno.EBUSY: ("is in use by another process (busy)", "stop it or choose another --port"),
    errno.ENOTTY: ("is not a serial port (not a tty)", "choose a serial device with --port"),
    errno.EISDIR: ("is not a serial port (a directory)", "choose a serial device with --port"),
    errno.ENOTDIR: ("does not exist (a part of its path is not a directory)", "choose another --port"),
    errno.ELOOP: ("is a loop of symbolic links", "fix the link or choose another --port"),
    errno.EIO: ("does not answer (input/output error)",
                "re-plug the device, look at `dmesg`, or choose another --port"),
}


def _errno_of(exc: BaseException) -> int | None:
    """The errno behind a pyserial error (it keeps termios's only as the context)."""
    while exc is not None:
        code = getattr(exc, "errno", None)
        if code is None and isinstance(exc, termios.error) and exc.args and isinstance(exc.args[0], int):
            code = exc.args[0]
        if code is not None:
            return code
        exc = exc.__cause__ or exc.__context__
    return None


def serial_error(device: str, exc: BaseException) -> PortError:
    """The one-line PortError for a serial device that failed to open or configure."""
    code = _errno_of(exc)
    fault = _SERIAL_FAULTS.get(code)
    if fault is None:
        # pyserial's text repeats the path and the errno: the system's words are enough.
        why = os.strerror(code).lower() if code is not None else str(exc)
        return PortError(f"{device} cannot be used as a serial port ({why}); choose another --port")
    problem, remedy = fault
    return PortError(f"{device} {problem}; {remedy}")


def _link_error(link: str, exc: OSError) -> PortError:
    parent = os.path.dirname(link) or "."
    if exc.errno in (errno.ENOENT, errno.ENOTDIR) and not os.path.isdir(parent):
        problem = f"{parent} is not a directory" if os.path.exists(parent) else f"{parent} does not exist"
        return PortError(f"cannot make the pty link {link}: {problem}; create it or choose another --pty")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PortError(f"cannot make the pty link {link}: {exc.strerror.lower()}; "
                         "choose a --pty path in a directory bridged may write")
    return PortError(f"cannot make the pty link {link}: {exc.strerror}; choose another --pty")


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
    """Create a raw pty; symlink its slave at ``link`` (replacing a stale link).

    Raises:
        PortError: no pty could be made, or ``link`` cannot be (re)placed.
    """
    try:
        master, slave = os.openpty()
    except OSError as exc:
        raise PortError(f"cannot create a pseudo-terminal: {exc.strerror}; check /dev/ptmx and /dev/pts") from None
    try:
        tty.setraw(slave, termios.TCSANOW)
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        path = os.ttyname(slave)
        if link:
            _place_link(link, path)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    os.set_blocking(master, False)
    return Pty(master, slave, path, link)


def _place_link(link: str, path: str) -> None:
    target = Path(link)
    if target.exists() and not target.is_symlink():
        raise PortError(f"{link} exists and is not a symlink; remove it or choose another --pty")
    try:
        if target.is_symlink():  # a stale link of an instance that was killed
            target.unlink()
        target.symlink_to(path)
    except OSError as exc:
        raise _link_error(link, exc) from None


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
    if crtscts(settings.flow):  # see bridged.uart.flow: CTS honoured (2, 3)
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
    """A real UART opened with pyserial; its fd is then driven by the loop.

    It keeps the settings in force (AT+UART_CUR's), so that a device that
    vanished and returned (``reopen``) is configured as the MCU left it; its
    ``rts`` drives RTS for flow control rts (see bridged.uart.flow).
    """

    def __init__(self, device: str, settings: UartSettings) -> None:
        """Open ``device`` exclusively (flock, as pyserial's exclusive=True) and configure it.

        Raises:
            PortError: it does not exist, is locked or busy, is not a tty,
                may not be opened, or refuses the settings.
        """
        self.device = device
        self.settings = settings
        self.rts = RtsControl(self._queued)
        self._lines: TtyModemLines | None = None
        self._serial, self._lines = self._open()
        self.fd = self._serial.fileno()
        # The driver (a ttyUSB, a ttyAMA, a pty): what returns at the path must be of it.
        self.major = os.major(os.fstat(self.fd).st_rdev)

    def _open(self):
        import serial  # imported here: a pty-only run never needs it

        port = serial.Serial()
        port.port = self.device
        try:
            _configure(port, self.settings)
            port.exclusive = True
            port.open()  # closes what it acquired if it fails
        except (OSError, ValueError) as exc:  # SerialException is an OSError
            raise serial_error(self.device, exc) from None
        fd = port.fileno()
        os.set_blocking(fd, False)
        # Said once per path, not again for each replug of the same adapter.
        lines = TtyModemLines(fd, self.device, said=self._lines is not None and not self._lines.usable)
        self.rts.attach(lines, self.settings.flow, fresh=True)
        return port, lines

    def apply(self, settings: UartSettings) -> None:
        """AT+UART_CUR: drain, then change the line (a failing device keeps them for ``reopen``)."""
        self.settings = settings
        try:
            termios.tcdrain(self.fd)
            _configure(self._serial, settings)
        except (OSError, ValueError, termios.error) as exc:
            log.warning("uart_settings_not_applied", port=self.device, error=str(exc))
            return
        self.rts.attach(self._lines, settings.flow)

    def release(self) -> None:
        """The device hung up: let go of it, keeping its descriptor's number.

        Held open, a vanished USB adapter keeps its node: the kernel frees
        ttyUSB0 only at the last close, so the adapter would return as ttyUSB1
        and a --port /dev/ttyUSB0 (or the unit's DeviceAllow=) never sees it
        again.  /dev/null takes the number's place (dup2 closes the tty), so
        the number is not reused while the loop may still name it; what was
        queued for the cut wire is dropped first, so the close never waits
        on it (closing_wait).
        """
        try:
            termios.tcflush(self.fd, termios.TCOFLUSH)
        except (termios.error, OSError):
            pass  # hung up: nothing left to flush
        try:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # out of descriptors: at least the lock, for the same node
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except OSError:
                pass
            return
        try:
            os.dup2(null, self.fd, inheritable=False)
        finally:
            os.close(null)

    def reopen(self) -> int:
        """Open the device again with the settings in force; the old descriptor
        is closed once the new one is open (so its number is never reused
        while the loop may still name it).

        Returns:
            The new descriptor.
        Raises:
            PortError: the device cannot be opened (yet).
        """
        st = os.stat(self.device)
        self._check_kind(st.st_rdev, st.st_mode)  # before the open: opening may act (a watchdog)
        fresh, lines = self._open()
        try:
            st = os.fstat(fresh.fileno())
            self._check_kind(st.st_rdev, st.st_mode)  # the path may have changed meanwhile
        except (OSError, PortError):
            fresh.close()
            raise
        self._lines = lines
        old, self._serial = self._serial, fresh
        self.fd = fresh.fileno()
        try:
            old.close()
        except OSError:
            pass  # a hung-up tty may refuse the flush pyserial's close does: it is closed anyway
        return self.fd

    def _check_kind(self, rdev: int, mode: int) -> None:
        """A device that returns must be one of the driver we served: a path
        pointed elsewhere meanwhile (a console, /dev/ptmx, another device a
        writable folder's link was turned to) is not opened as the MCU's.

        Raises:
            PortError: another kind of file or device.
        """
        if not stat.S_ISCHR(mode) or os.major(rdev) != self.major:
            what = f"device {os.major(rdev)}:{os.minor(rdev)}" if stat.S_ISCHR(mode) else "not a device"
            raise PortError(f"{self.device} is now another kind of device ({what}; it was of major "
                            f"{self.major}); waiting for the one it was")

    def hold_input(self, held: bool) -> None:
        """The front's read gate started (True) or stopped holding input."""
        self.rts.input_held(held)

    def after_read(self, size: int) -> None:
        self.rts.after_read(size)

    def _queued(self) -> int:
        try:
            return struct.unpack("i", fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            return 0

    def close(self) -> None:
        self._serial.close()


def _configure(port, settings: UartSettings) -> None:
    port.baudrate = settings.baud
    port.bytesize = settings.data_bits
    port.stopbits = _STOP_BITS[settings.stop_bits]
    port.parity = _PARITY[settings.parity]
    # Only flow 2 and 3 let the kernel wait for CTS; RTS alone (1) is ours to
    # drive: CRTSCTS would make a line without a CTS wire stall our output.
    port.rtscts = crtscts(settings.flow)


def open_serial(device: str, settings: UartSettings) -> SerialPort:
    """Open a real UART (see SerialPort). Raises PortError."""
    return SerialPort(device, settings)
