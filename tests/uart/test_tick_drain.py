"""uart.reading's passthrough tick, which reads the port itself and drains the tty past its
4 KiB buffer, on a real read gate and pty: bytes a drain read are never lost to the error a
later read of the same drain meets (the device went away in between)."""

from __future__ import annotations

import asyncio
import errno
import os
import termios
import tty
from types import SimpleNamespace

from bridged.at.session import Input, State
from bridged.uart import reading
from tests.uart.test_listening_gate import _Front

_TTY_READ = 4095  # what a pty master's read hands out of a full n_tty buffer


class _TickFront(_Front):
    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        super().__init__(loop, fd)
        self.session = SimpleNamespace(input=Input.PARSE, state=State.PASSTHROUGH)
        self._tick = None
        self._port_paused = False

    def _end_down_pauses(self) -> None:
        pass  # no downlink here


def test_bytes_a_drain_read_survive_its_next_read_failing():
    """Two full tty buffers wait behind a pty whose other end closed: the tick reads both, and the
    read after them fails (EIO, as a device that went away says). Both buffers reach the parser,
    counted; the failure is heard on the next read (not before: it would drop them). A loaded
    kernel may hand the second buffer out in parts (the drain then stops short of the failing
    read, reading nothing it does not count): then a new pty tries again, three times at most."""
    async def attempt() -> bool:
        loop = asyncio.get_running_loop()
        master, slave = os.openpty()
        tty.setraw(slave, termios.TCSANOW)
        os.set_blocking(master, False)
        data = os.urandom(2 * _TTY_READ)
        os.write(slave, data)
        os.close(slave)  # the master's read after the data: EIO
        front = _TickFront(loop, master)
        try:
            front._gate.open(master)
            front._gate.hold(reading._PAUSE, press=False)  # a coalescing pause under way
            front._port_paused = True
            front._on_tick()
            assert front.parser.data.buffered == front.counters.rx_bytes  # all it read, counted
            if front.counters.rx_bytes < len(data):
                return False  # the drain stopped at a short piece, before the failing read
            assert front.counters.rx_bytes == len(data)
            try:
                os.read(master, 1)
            except OSError as exc:  # the failure is still there for the next read
                assert exc.errno == errno.EIO
            else:
                raise AssertionError("the pty read on")
            return True
        finally:
            front._gate.close()
            os.close(master)

    assert any(asyncio.run(attempt()) for _ in range(3)), "no drain read both buffers in three tries"


class _Bug(_TickFront):
    """Processing what a read brought meets a bug of ours (it raises), once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        super().__init__(loop, fd)
        self.bugs = 1
        self.down_ended = 0

    def _process(self) -> None:
        if self.bugs:
            self.bugs -= 1
            raise KeyError("a bug")

    def _end_down_pauses(self) -> None:
        self.down_ended += 1


def test_a_bug_in_a_tick_read_leaves_the_port_read():
    """A tick's read whose processing raises (a bug of ours): the loop logs it, as it would from the
    gate's read callback, and the coalescing pause is not left held (the port would never be read
    again, the heartbeat still answering), nor the downlinks paused; the next bytes are read."""
    async def main() -> tuple[list, frozenset, bool, int, int]:
        loop = asyncio.get_running_loop()
        caught: list = []
        loop.set_exception_handler(lambda loop, context: caught.append(context.get("exception")))
        master, slave = os.openpty()
        tty.setraw(slave, termios.TCSANOW)
        os.set_blocking(master, False)
        front = _Bug(loop, master)
        try:
            front._gate.open(master)
            front._gate.hold(reading._PAUSE, press=False)  # a coalescing pause under way
            front._port_paused = True
            os.write(slave, bytes(1024))
            loop.call_soon(front._on_tick)  # as the tick's timer calls it
            for _ in range(3):
                await asyncio.sleep(0)
            holds, is_open, ended = front._gate.holds, front._gate.is_open, front.down_ended
            os.write(slave, bytes(100))
            for _ in range(100):  # bounded: the gate's read of the next bytes
                await asyncio.sleep(0.01)
                if front.counters.rx_bytes > 1024:
                    break
            return caught, holds, is_open, ended, front.counters.rx_bytes
        finally:
            front._gate.close()
            os.close(master)
            os.close(slave)

    caught, holds, is_open, ended, read = asyncio.run(main())
    assert [type(exc) for exc in caught] == [KeyError]
    assert holds == frozenset() and is_open and ended == 1
    assert read == 1124
