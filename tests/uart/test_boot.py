"""One boot of the emulated chip on a real pty: the answer first, the port restarted,
silence for boot_ms, then ready; output a host never reads is given up after ESP-AT's
3 s (shortened here); a failing boot is reported, never silent."""

from __future__ import annotations

import asyncio
import os
import select
import time

import pytest
import uvloop
from structlog.testing import capture_logs

from bridged.commands.context import UartSettings
from bridged.config import FirmwareConfig
from bridged.uart import boot as boot_module
from bridged.uart.banner import Reset
from bridged.uart.boot import Boot
from bridged.uart.output import Output

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("plain_structlog")]


SETTINGS = UartSettings(115200, 8, 1, 0, 0)


def _read_until(fd: int, wanted: bytes, timeout: float = 5.0) -> tuple[float, bytes]:
    """(time ``wanted`` arrived, everything read up to then)."""
    got = b""
    deadline = time.monotonic() + timeout
    while wanted not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"only {got[-200:]!r} arrived"
        if select.select([fd], [], [], left)[0]:
            got += os.read(fd, 65536)
    return time.monotonic(), got


class Steps:
    """The front's side of a boot: records what was called when."""

    def __init__(self, output: Output) -> None:
        self.output = output
        self.calls: list[tuple[str, float, int]] = []  # (step, time, bytes still queued)
        self.ready = asyncio.get_running_loop().create_future()
        self.failed = False

    async def drain_port(self, deadline: float) -> bool:
        self.calls.append(("drain", time.monotonic(), self.output.buffered))
        return True

    def restart_port(self) -> UartSettings:
        self.calls.append(("restart", time.monotonic(), self.output.buffered))
        return SETTINGS

    def on_ready(self) -> None:
        self.calls.append(("ready", time.monotonic(), self.output.buffered))
        self.output.reply(b"\r\nready\r\n")
        self.ready.set_result(None)

    def on_failed(self) -> None:
        self.failed = True
        self.ready.set_result(None)

    def start(self, boot: Boot) -> None:
        boot.start(self.drain_port, self.restart_port, self.on_ready, self.on_failed)


def test_the_answer_goes_out_then_silence_then_ready(pty_pair):
    """OK is written before the port restarts; ready comes boot_ms after, with nothing between."""
    master, slave = pty_pair

    async def main():
        output = Output(master, 0.0, lambda: None)
        steps = Steps(output)
        output.reply(b"\r\nOK\r\n")
        steps.start(Boot(FirmwareConfig(boot_ms=300), output, Reset.SOFTWARE))
        ok_at, before = await asyncio.to_thread(_read_until, slave, b"\r\nOK\r\n")
        ready_at, after = await asyncio.to_thread(_read_until, slave, b"ready\r\n")
        await steps.ready
        return steps.calls, ok_at, before, ready_at, after

    calls, ok_at, before, ready_at, after = uvloop.run(main())
    assert [step for step, _, _ in calls] == ["drain", "restart", "ready"]
    assert all(queued == 0 for _, _, queued in calls)  # the answer had left the queue first
    assert before == b"\r\nOK\r\n" and after == b"\r\nready\r\n"
    assert calls[2][1] - calls[1][1] >= 0.3 - 0.005  # boot_ms of silence after the restart
    assert ready_at > ok_at


def test_the_rom_banner_at_its_own_baud_comes_before_ready(pty_pair):
    """boot_banner: the ROM's messages, as a host at another speed receives them, precede ready."""
    master, slave = pty_pair

    async def main():
        output = Output(master, 0.0, lambda: None)
        steps = Steps(output)
        with capture_logs() as logs:
            steps.start(Boot(FirmwareConfig(boot_ms=0, boot_banner=True, boot_banner_baud=74880),
                             output, Reset.POWER_ON))
            _, got = await asyncio.to_thread(_read_until, slave, b"\r\nready\r\n")
            await steps.ready
        return got, logs

    got, logs = uvloop.run(main())
    banner = got[: -len(b"\r\nready\r\n")]
    (booting,) = [e for e in logs if e["event"] == "booting"]
    assert booting["banner_bytes"] == len(banner) > 0 and booting["reset"] == "power_on"


def test_input_during_the_boot_is_counted_and_logged_once(pty_pair):
    """drop() while booting: one boot_input_dropped with every byte lost."""
    master, _ = pty_pair

    async def main():
        output = Output(master, 0.0, lambda: None)
        steps = Steps(output)
        boot = Boot(FirmwareConfig(boot_ms=100), output, Reset.SOFTWARE, dropped=3)
        with capture_logs() as logs:
            steps.start(boot)
            boot.drop(10)
            boot.drop(5)
            await steps.ready
        return logs

    logs = uvloop.run(main())
    assert [e["bytes"] for e in logs if e["event"] == "boot_input_dropped"] == [18]


def test_output_a_host_does_not_read_is_given_up_at_the_deadline(pty_pair, monkeypatch):
    """Nobody reads: at ESP-AT's deadline the queue is discarded, logged with its size, and the boot goes on."""
    monkeypatch.setattr(boot_module, "TX_WAIT_MAX", 0.3)
    master, _ = pty_pair

    async def main():
        output = Output(master, 0.0, lambda: None)
        steps = Steps(output)
        for _ in range(64):
            output.urc(b"x" * 4096)  # more than the pty holds
        started = time.monotonic()
        with capture_logs() as logs:
            steps.start(Boot(FirmwareConfig(boot_ms=0), output, Reset.SOFTWARE))
            await steps.ready
        return started, steps.calls, logs

    started, calls, logs = uvloop.run(main())
    (discarded,) = [e for e in logs if e["event"] == "restart_output_discarded"]
    assert discarded["queued_bytes"] > 0 and discarded["port_flushed"] is False  # the port itself had sent its own
    assert calls[0][1] - started >= 0.3 - 0.005 and calls[0][2] == 0  # gave up at the deadline, queue dropped


def test_a_boot_that_raises_is_reported_not_left_hanging(pty_pair):
    """A bug in a step: boot_failed logged and on_failed called (no ready would ever come)."""
    master, _ = pty_pair

    async def main():
        output = Output(master, 0.0, lambda: None)
        steps = Steps(output)

        def broken() -> UartSettings:
            raise RuntimeError("a bug")

        with capture_logs() as logs:
            Boot(FirmwareConfig(boot_ms=0), output, Reset.SOFTWARE).start(
                steps.drain_port, broken, steps.on_ready, steps.on_failed)
            async with asyncio.timeout(5):
                await steps.ready
        return steps.failed, logs

    failed, logs = uvloop.run(main())
    assert failed and [e["event"] for e in logs if e["log_level"] == "error"] == ["boot_failed"]
