"""uart.roomwait's so_sndtimeo timers against a real ring: a deadline that comes while
room the front has not heard of yet (a doorbell the worker missed: the poll finds it
up to 50 ms later) waits on, it does not fail the send."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from bridged.at.datamode import DataKind
from bridged.at.session import PayloadDone, Prompt, Ready, Session, State
from bridged.commands.options import TcpOptions
from bridged.uart.dataphase import DataPhases
from bridged.uart.roomwait import RoomWait
from bridged.uart.sending import Send
from bridged.uart.slots import Slot, SlotState
from tests.ringtools import new_ring


class _Front(DataPhases, RoomWait):
    """The parts of Front that the room wait uses; reading and parsing only counted."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Send, so_sndtimeo: int) -> None:
        self.loop = loop
        self.sending = send
        self._room_slot = None
        self._room_need = 0
        self._room_poll = None
        self._room_timer = None
        self.counters = SimpleNamespace(flow_pauses=0)
        self.ctx = SimpleNamespace(state=SimpleNamespace(tcpopts=[TcpOptions(so_sndtimeo=so_sndtimeo)]))
        self.resumed = 0
        self.session = Session()
        self.session.handle(Ready(), 0.0)
        self.output = SimpleNamespace(written=[])
        self.output.reply = self.output.written.append

    def _pause_reading(self) -> None:
        pass

    def _hold_stream(self, send: Send) -> None:
        pass

    def _resume_reading(self) -> None:
        self.resumed += 1

    def _process(self) -> None:
        pass


def _full_ring_stream(up, down) -> Send:
    slot = Slot(0, up, down, state=SlotState.OPEN, conn_id=7, type="TCP")
    send = Send(slot, DataKind.SENDL, 10 * up.capacity)
    send.take(bytes(up.capacity))  # the ring is full: the stream waits for room
    assert up.free() == 0
    return send


def test_a_stream_whose_room_came_unheard_is_not_failed_by_so_sndtimeo():
    """AT+CIPSENDL waiting for room, so_sndtimeo due: the worker freed the ring but its doorbell
    was missed (the quiet flag's race), so only the ring says so.  The stream goes on (reading
    resumes) instead of failing with the room there."""
    async def main() -> None:
        with new_ring() as up, new_ring() as down:
            send = _full_ring_stream(up, down)
            front = _Front(asyncio.get_running_loop(), send, 300)
            front._wait_room(send)
            assert front._room_timer is not None
            up.want_space_doorbell(False)  # the worker read the flag before the front set it
            up.consume(up.capacity)  # room, and no doorbell
            send.moved_at = front.loop.time() - 1.0  # the deadline is due
            front._stream_timed_out(send, 0.3)
            assert not send.timed_out and send.alive()
            assert front._room_slot is None and front.resumed == 1  # the stream reads on
            front._stop_waiting_room()

    asyncio.run(main())


def test_a_stream_with_no_room_is_failed_by_so_sndtimeo():
    """The same wait with the ring still full: so_sndtimeo fails the stream (the rest is dropped)."""
    async def main() -> None:
        with new_ring() as up, new_ring() as down:
            send = _full_ring_stream(up, down)
            front = _Front(asyncio.get_running_loop(), send, 300)
            front._wait_room(send)
            send.moved_at = front.loop.time() - 1.0
            front._stream_timed_out(send, 0.3)
            assert send.timed_out and not send.alive()
            assert front._room_slot is None and front.resumed == 1

    asyncio.run(main())


def test_a_send_whose_room_came_unheard_is_not_failed_by_so_sndtimeo():
    """AT+CIPSEND complete, its tail waiting for room, so_sndtimeo due: the worker freed the ring
    but its doorbell was missed.  The tail goes into the ring and the send is SEND OK, not
    SEND FAIL with the room there."""
    async def main() -> None:
        with new_ring() as up, new_ring() as down:
            loop = asyncio.get_running_loop()
            slot = Slot(0, up, down, state=SlotState.OPEN, conn_id=7, type="TCP")
            send = Send(slot, DataKind.SEND, up.capacity + 100)
            front = _Front(loop, send, 300)
            front.session.handle(Prompt(DataKind.SEND, 0.3), loop.time())
            send.take(bytes(up.capacity + 100))
            send.payload_done()  # the ring takes all but 100 bytes
            deadline = front.session.handle(PayloadDone(send.result()), loop.time()).deadline
            assert front.session.state is State.AWAITING_SEND_OK and deadline is not None
            front._wait_room(send)
            up.want_space_doorbell(False)  # the worker read the flag before the front set it
            up.consume(up.capacity)  # room, and no doorbell
            front._send_timed_out(send, deadline)
            assert front.output.written == [b"\r\nSEND OK\r\n"]
            assert front.sending is None and up.available() == 100

    asyncio.run(main())


def test_a_restart_during_a_streams_wait_disarms_its_so_sndtimeo():
    """A restart (an at_reset fault) while AT+CIPSENDL waits for room drops the send, then stops
    the wait (Front._restart's order): its so_sndtimeo timer goes too, not left armed for up to
    so_sndtimeo (24 days at most) holding the dead send."""
    async def main() -> None:
        with new_ring() as up, new_ring() as down:
            send = _full_ring_stream(up, down)
            front = _Front(asyncio.get_running_loop(), send, 0x7FFFFFFF)
            front._wait_room(send)
            armed = [h for h in front.loop._scheduled if not h.cancelled()]
            assert len(armed) == 2  # the room poll and so_sndtimeo
            front.sending = None
            front._stop_waiting_room()
            assert [h for h in front.loop._scheduled if not h.cancelled()] == []

    asyncio.run(main())
