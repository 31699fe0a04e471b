"""uart.reading's listening for +++ while a stream's ring is full, on a real read gate and pipe: the
gate's holding (what drives RTS under flow control rts) goes held, released while listening, held
when the +++ buffer is full, and released when the stream ends; nothing leaves it held."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

from bridged.at.datamode import DataKind
from bridged.at.parser import Parser
from bridged.at.session import Input
from bridged.readgate import ReadGate
from bridged.uart import reading
from bridged.uart.reading import PortReading


class _Front(PortReading):
    """The parts of Front that reading uses; the data phase's processing only parses."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop, self.fd = loop, fd
        self.rts: list[bool] = []  # what the gate told (Front: serial.hold_input drives RTS)
        self._gate = ReadGate(loop, self._on_readable, self.rts.append)
        self.parser = Parser()
        self.parser.start_data(DataKind.PASSTHROUGH, 0, loop.time())
        self.sending = SimpleNamespace(slot=SimpleNamespace(link_id=0), direct=False)
        self._room_slot = self.sending.slot
        self.session = SimpleNamespace(input=Input.PARSE)
        self.output = SimpleNamespace(backlogged=False)
        self.counters = SimpleNamespace(rx_bytes=0)
        self._paced = self._serial = self.tap = self.rx_fault = self._replug = None
        self._listening = self._side_full = False
        self._side_base = 0
        self._listen_timer = None
        self._last_read = 0.0
        self._ticking = False

    def _process(self) -> None:
        pass  # the ring is full: nothing goes out of the parser


def test_listening_keeps_the_gate_honest():
    """Held at the stall, released while listening, held once the +++ buffer is full (then no timer
    reopens it), released for good when the stream ends (room, +++, a lost link)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        front = _Front(loop, rfd)
        try:
            front._gate.open(rfd)
            front._hold_stream(front.sending)  # the ring is full
            assert front._gate.holding and front._listen_timer is not None
            front._listen_timer.cancel()
            front._listen(front.sending)  # _LISTEN_AFTER later
            assert not front._gate.holding and front._listening
            os.write(wfd, bytes(reading._SIDE + 1000))
            for _ in range(100):
                await asyncio.sleep(0.01)
                if front._side_full:
                    break
            assert front._side_full and front._gate.holding
            assert front.parser.data.buffered == reading._SIDE and front._listen_timer is None
            front._resume_reading()  # room came (or +++, or the link went)
            assert not front._gate.holding and not front._listening and not front._side_full
            assert front.rts == [True, False, True, False]
        finally:
            front._gate.close()
            os.close(rfd)
            os.close(wfd)

    asyncio.run(main())
