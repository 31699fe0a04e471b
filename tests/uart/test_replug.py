"""bridged.uart.replug on a real serial port (a pty slave behind a by-id style
link): one line per transition, reminders while away, the device reopened
with the settings in force."""

from __future__ import annotations

import asyncio
import os
import termios
import tty

import uvloop
from structlog.testing import capture_logs

from bridged.commands.context import UartSettings
from bridged.uart import replug
from bridged.uart.port import SerialPort
from bridged.uart.replug import Replug


def test_waits_reminds_and_reopens_with_the_settings_in_force(tmp_path, monkeypatch):
    """Lost twice, said once; reminded while away; reopened (AT+UART_CUR's
    settings, not the opening ones) as soon as the path is back, and said so once."""
    monkeypatch.setattr(replug, "POLL", 0.02)
    monkeypatch.setattr(replug, "REMIND", 0.2)
    master, slave = os.openpty()
    tty.setraw(slave)
    link = tmp_path / "usb-adapter"
    link.symlink_to(os.ttyname(slave))
    port = SerialPort(str(link), UartSettings(115200, 8, 1, 0, 0))
    port.apply(UartSettings(57600, 8, 3, 0, 3))  # AT+UART_CUR while it served
    fds: list[int] = []

    async def main() -> list[int]:
        backs: list[int] = []
        watch = Replug(port, backs.append, asyncio.create_task)
        os.close(master)
        os.close(slave)
        link.unlink()
        watch.lost("hung up (unplugged?)")
        watch.lost("Input/output error")  # the write found it too: the same loss
        assert watch.away
        await asyncio.sleep(0.5)
        assert backs == []
        new_master, new_slave = os.openpty()
        fds.extend((new_master, new_slave))
        link.symlink_to(os.ttyname(new_slave))
        async with asyncio.timeout(5):
            while not backs:
                await asyncio.sleep(0.01)
        assert not watch.away
        return backs

    try:
        with capture_logs() as logs:
            backs = uvloop.run(main())
        attrs = termios.tcgetattr(fds[1])
    finally:
        port.close()
        for fd in fds:
            os.close(fd)
    assert backs == [port.fd]
    assert attrs[4] == termios.B57600 and attrs[2] & termios.CSTOPB and attrs[2] & termios.CRTSCTS
    events = [e["event"] for e in logs]
    assert events.count("port_lost") == 1 and events.count("port_back") == 1
    assert 1 <= events.count("port_still_away") <= 3, events
    lost = next(e for e in logs if e["event"] == "port_lost")
    assert lost["device"] == str(link) and lost["error"] == "hung up (unplugged?)"
    back = next(e for e in logs if e["event"] == "port_back")
    assert 0.5 <= back["away_s"] < 5


def _fds_on(rdev: int) -> list[int]:
    """This process's descriptors open on the character device ``rdev``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if st.st_rdev == rdev and not os.path.isdir(f"/proc/self/fd/{name}"):
            found.append(int(name))
    return found


def test_a_lost_device_is_let_go_of_while_away(tmp_path, monkeypatch):
    """While the device is away nothing of ours holds it open: a USB adapter's
    driver frees its node (ttyUSB0 comes back as ttyUSB0, not ttyUSB1; a pty its
    number) only once the last descriptor is closed."""
    monkeypatch.setattr(replug, "POLL", 0.02)
    master, slave = os.openpty()
    tty.setraw(slave)
    rdev = os.fstat(slave).st_rdev
    link = tmp_path / "usb-adapter"
    link.symlink_to(os.ttyname(slave))
    port = SerialPort(str(link), UartSettings(115200, 8, 1, 0, 0))
    fd = port.fd
    held: list[int] = []

    async def main() -> None:
        watch = Replug(port, lambda fd: None, asyncio.create_task)
        os.close(master)
        os.close(slave)
        link.unlink()
        watch.lost("hung up (unplugged?)")
        await asyncio.sleep(0.1)  # five polls of the path while away: none may hold the device
        held.extend(_fds_on(rdev))
        assert os.fstat(fd)  # the number stays taken: the loop may still name it
        watch.close()

    try:
        uvloop.run(main())
    finally:
        port.close()
    assert held == []


def test_a_path_that_returns_as_another_kind_of_device_is_not_taken(tmp_path, monkeypatch):
    """The link returns pointing at a tty of another driver (/dev/ptmx, not a pty slave as
    before: for a USB adapter, a console instead of a ttyUSB): it is not opened, the port
    stays away saying why; the same kind of device at the path is taken."""
    monkeypatch.setattr(replug, "POLL", 0.02)
    monkeypatch.setattr(replug, "REMIND", 0.2)
    master, slave = os.openpty()
    tty.setraw(slave)
    link = tmp_path / "usb-adapter"
    link.symlink_to(os.ttyname(slave))
    port = SerialPort(str(link), UartSettings(115200, 8, 1, 0, 0))
    fds: list[int] = []

    async def main() -> list[int]:
        backs: list[int] = []
        watch = Replug(port, backs.append, asyncio.create_task)
        os.close(master)
        os.close(slave)
        link.unlink()
        watch.lost("hung up (unplugged?)")
        link.symlink_to("/dev/ptmx")
        await asyncio.sleep(0.5)
        assert backs == [] and watch.away
        link.unlink()
        new_master, new_slave = os.openpty()
        fds.extend((new_master, new_slave))
        link.symlink_to(os.ttyname(new_slave))
        async with asyncio.timeout(5):
            while not backs:
                await asyncio.sleep(0.01)
        return backs

    try:
        with capture_logs() as logs:
            backs = uvloop.run(main())
        assert os.fstat(backs[0]).st_rdev == os.fstat(fds[1]).st_rdev
    finally:
        port.close()
        for fd in fds:
            os.close(fd)
    reminders = [e for e in logs if e["event"] == "port_still_away"]
    assert reminders and "another kind of device" in reminders[0]["error"], reminders
