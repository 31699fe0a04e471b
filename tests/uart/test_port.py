"""bridged.uart.port: a serial port that cannot be used is one PortError line
naming the path, what is wrong and what to do, for each way opening it fails."""

from __future__ import annotations

import fcntl
import os
import struct

import pytest

from bridged.commands.context import UartSettings
from bridged.uart.port import PortError, open_serial

SETTINGS = UartSettings(115200, 8, 1, 0, 0)
_TIOCGPTN = 0x80045430  # the pty number behind a /dev/ptmx descriptor


def _symlink_loop(tmp_path) -> str:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    return str(tmp_path / "a")


def _directory(tmp_path) -> str:
    return str(tmp_path)


def _fifo(tmp_path) -> str:
    os.mkfifo(tmp_path / "fifo")
    return str(tmp_path / "fifo")


def _regular_file(tmp_path) -> str:
    (tmp_path / "file").write_text("")
    return str(tmp_path / "file")


def _below_a_file(tmp_path) -> str:
    (tmp_path / "file").write_text("")
    return str(tmp_path / "file" / "tty")


def _missing(tmp_path) -> str:
    return str(tmp_path / "ttyUSB9")


CASES = {
    "symlink loop": (_symlink_loop, "is a loop of symbolic links; fix the link or choose another --port"),
    "directory": (_directory, "is not a serial port (a directory); choose a serial device with --port"),
    "fifo": (_fifo, "is not a serial port (not a tty); choose a serial device with --port"),
    "regular file": (_regular_file, "is not a serial port (not a tty); choose a serial device with --port"),
    "below a file": (_below_a_file, "does not exist (a part of its path is not a directory); choose another --port"),
    "missing": (_missing, "does not exist; plug the device in or choose another --port"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_path_that_is_no_serial_port_is_one_line(tmp_path, case):
    """Each kind of path that is no serial port gives its own cause and remedy, on one line."""
    make, expected = CASES[case]
    path = make(tmp_path)
    with pytest.raises(PortError) as caught:
        open_serial(path, SETTINGS)
    assert str(caught.value) == f"{path} {expected}"


def test_a_device_that_does_not_answer_says_input_output_error():
    """A tty whose open fails with EIO (here a pty slave still locked) names the
    I/O error and what to try, not pyserial's repeated text."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)  # no unlockpt: its slave refuses to open
    try:
        path = f"/dev/pts/{struct.unpack('I', fcntl.ioctl(master, _TIOCGPTN, b'0000'))[0]}"
        with pytest.raises(PortError) as caught:
            open_serial(path, SETTINGS)
    finally:
        os.close(master)
    assert str(caught.value) == (f"{path} does not answer (input/output error); "
                                 "re-plug the device, look at `dmesg`, or choose another --port")
