"""uart.dispatch: a flood of command lines is handled 64 at a time, the rest on the event
loop's next passes, the read gate paused meanwhile and open again once all are handled."""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import pytest
import uvloop

from bridged.at.parser import Parser
from bridged.at.session import Ready, Session
from bridged.commands.registry import Reply
from bridged.ops.status import UartCounters
from bridged.readgate import ReadGate
from bridged.uart.dispatch import CommandDispatch


class _Faults:
    """The front's fault hooks with the AT fault kind on (no short paths); every line is
    answered OK with its own name, so the order shows."""

    at_commands = True

    @staticmethod
    def refuse(line) -> bool:
        return False

    @staticmethod
    def dispatch(ctx, line) -> Reply:
        if line.name == "+SLOW":
            time.sleep(0.008)  # a handler that blocks the loop, as the settings store's fsyncs do
        return Reply(line.name.encode(), b"\r\nOK\r\n")


class _Front(CommandDispatch):
    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop = loop
        self.session = Session()
        self.session.handle(Ready(), 0.0)
        self.parser = Parser(256)
        self.faults = _Faults()
        self.tap = None
        self.ctx = SimpleNamespace(state=SimpleNamespace(echo=False, syslog=False))
        self.written: list[bytes] = []
        self.output = SimpleNamespace(reply=self.written.append, backlogged=False)
        self.counters = UartCounters()
        self._stopped = loop.create_future()
        self.reads = 0
        self._gate = ReadGate(loop, self._on_readable)
        self._gate.open(fd)

    def _on_readable(self) -> None:
        self.reads += 1


async def _flood_in_shares() -> None:
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    front = _Front(loop, r)
    try:
        os.write(w, b"x")  # the port stays readable: a read while the rest waits would show
        lines = [b"AT+L%d\r\n" % i for i in range(200)]
        front.parser.receive_bytes(b"".join(lines), 0.0)
        front._process()
        assert len(front.written) == 2 * 64
        assert front._gate.holds == {"command share"} and not front._gate.is_open
        for _ in range(50):  # bounded: four passes are enough
            await asyncio.sleep(0)
            if not front._gate.holds:
                break
        assert front.written == [part for i in range(200) for part in (b"+L%d" % i, b"\r\nOK\r\n")]
        assert front.reads == 0, "the port was read while commands of the last read waited"
        assert front._gate.is_open and front.counters.max_command_batch == 64
        await asyncio.sleep(0.01)
        assert front.reads > 0  # open again: the port's bytes are read
    finally:
        front._gate.close()
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_flood_is_handled_a_share_at_a_time_and_the_gate_reopens(run):
    """200 lines in the parser: 64 answered at once, the gate paused under "command share",
    the rest answered on the next passes in order, with no read meanwhile, then the gate open."""
    run(asyncio.wait_for(_flood_in_shares(), 10.0))


async def _slow_commands_in_short_shares() -> None:
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    front = _Front(loop, r)
    try:
        front.parser.receive_bytes(b"AT+SLOW\r\n" * 40, 0.0)
        front._process()
        # Each takes 8 ms or more: the share ends once 20 ms went, after three at most.
        assert 1 <= len(front.written) // 2 <= 3, len(front.written)
        assert front._gate.holds == {"command share"}
        for _ in range(100):  # bounded: 40 passes at most
            await asyncio.sleep(0)
            if not front._gate.holds:
                break
        assert front.written == [b"+SLOW", b"\r\nOK\r\n"] * 40
        assert front.counters.max_command_batch <= 3
    finally:
        front._gate.close()
        os.close(r)
        os.close(w)


def test_commands_that_block_the_loop_end_a_share_early():
    """Commands whose handler blocks the loop (a settings-store write fsyncs, tens of ms on
    an SD card) are handled a few at a time, not 64: the share ends once it took 20 ms."""
    uvloop.run(asyncio.wait_for(_slow_commands_in_short_shares(), 10.0))
