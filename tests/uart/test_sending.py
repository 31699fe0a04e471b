"""uart.sending.Send against a real ring: what a data phase admits, and its SEND OK / SEND FAIL."""

from __future__ import annotations

from bridged.at.datamode import DataKind
from bridged.ipc import records
from bridged.uart.sending import Leftover, Send
from bridged.uart.slots import Slot, SlotState
from tests.ringtools import new_ring


def open_slot(uplink, downlink) -> Slot:
    return Slot(0, uplink, downlink, state=SlotState.OPEN, conn_id=7, type="TCP")


def test_a_complete_send_on_an_open_link_is_admitted_and_gets_send_ok():
    with new_ring() as up, new_ring() as down:
        send = Send(open_slot(up, down), DataKind.SEND, 4)
        send.take(b"abcd")
        send.payload_done()
        assert send.result() == b"\r\nSEND OK\r\n"
        assert up.available() == 4


def test_a_link_hung_up_mid_payload_admits_nothing_more_and_fails():
    """The Wi-Fi drops while the payload still comes: the slot is CLOSING (its Close is on
    its way to the worker, which flushes only what the ring already holds), so the rest
    must not reach the ring, and the send is SEND FAIL, not a SEND OK for lost bytes."""
    with new_ring() as up, new_ring() as down:
        slot = open_slot(up, down)
        send = Send(slot, DataKind.SEND, 4)
        send.take(b"ab")
        slot.state = SlotState.CLOSING  # LinkTable.hang_up
        send.take(b"cd")
        send.payload_done()
        assert send.result() == b"\r\nSEND FAIL\r\n"
        assert up.available() == 0


def test_a_stream_hung_up_drops_what_follows():
    """CIPSENDL after a hang-up: what the MCU still streams is counted dropped, not admitted."""
    with new_ring() as up, new_ring() as down:
        slot = open_slot(up, down)
        send = Send(slot, DataKind.SENDL, 8)
        send.take(b"abcd")
        slot.state = SlotState.CLOSING
        send.take(b"efgh")
        send.payload_done()
        assert up.available() == 4 and send.dropped == 4
        assert send.result() == b"\r\nSEND FAIL\r\n"


def test_a_datagram_larger_than_the_ring_fails_at_once():
    """A gathered UDP send the ring can never hold is SEND FAIL when complete, with nothing
    admitted (put_record would raise, and waiting for room would wait for ever)."""
    with new_ring() as up, new_ring() as down:
        slot = Slot(0, up, down, state=SlotState.OPEN, conn_id=7, type="UDP")
        send = Send(slot, DataKind.SEND, 4096)
        send.take(bytes(4096))
        send.payload_done()
        assert send.result() == b"\r\nSEND FAIL\r\n"
        assert up.available() == 0


def test_a_udp_stream_waits_for_room_for_a_whole_block():
    """A streamed datagram is one block: with less room than a block the parser gets none
    (a datagram cut to the ring's room would change what the peer receives), then a block."""
    with new_ring() as up, new_ring() as down:
        slot = Slot(0, up, down, state=SlotState.OPEN, conn_id=7, type="UDP")
        send = Send(slot, DataKind.SENDL, 5000, block=1000)
        up.put_nowait(bytes(up.capacity - 600))  # 600 bytes of room left
        assert send.room() == 0 and send.room_needed() == 1000 + 32
        up.consume(up.available())
        assert send.room() == 1000


def _escaped_stream(up, down, kind: DataKind = DataKind.PASSTHROUGH) -> Send:
    """A stream whose ring is full, as +++ finds it."""
    send = Send(open_slot(up, down), kind, 0 if kind is DataKind.PASSTHROUGH else 1 << 20)
    send.take(b"r" * up.capacity)
    assert up.free() == 0
    return send


def test_an_escaped_streams_leftover_goes_in_as_room_comes():
    """What +++ left of a stream is admitted in order as the ring frees room, and says when it is all in."""
    with new_ring() as up, new_ring() as down:
        leftover = Leftover(_escaped_stream(up, down), b"0123456789")
        assert not leftover.push()
        up.consume(4)
        assert not leftover.push() and leftover.data == b"456789"
        up.consume(up.capacity - 4)  # the stream's own bytes went out: the rest fits
        assert leftover.push()
        assert up.get_nowait(100) == b"0123456789"


def test_a_later_send_goes_behind_the_leftover():
    """A send started on the link while a leftover waits: the leftover first, then its own payload,
    for a stream (no room until the leftover is in) and a gathered send alike."""
    for kind in (DataKind.SENDL, DataKind.SEND):
        with new_ring() as up, new_ring() as down:
            escaped = _escaped_stream(up, down)
            send = Send(escaped.slot, kind, 3)
            send.ahead = Leftover(escaped, b"left")
            if kind is DataKind.SENDL:
                assert send.room() == 0
            else:
                send.take(b"new")
                send.payload_done()
                assert send.result() is None  # waits for the leftover's room first
            up.consume(up.capacity)
            if kind is DataKind.SENDL:
                assert send.room() == up.capacity - 4
                send.take(b"new")
            else:
                send.pump()
            assert send.ahead is None
            assert up.get_nowait(100) == b"leftnew"


def test_a_leftover_of_a_link_that_ended_is_dropped():
    """The link ends before room comes: the leftover has nowhere to go and says it is done."""
    with new_ring() as up, new_ring() as down:
        leftover = Leftover(_escaped_stream(up, down), b"lost")
        leftover.slot.state = SlotState.CLOSING
        assert not leftover.alive() and leftover.push()


def test_a_udp_send_behind_a_leftover_waits_for_the_leftovers_datagram():
    """A small UDP send behind an escaped stream's leftover of big blocks: the room it waits for is the
    leftover's next datagram, not its own few bytes (room for those alone would wake the front for
    nothing, again and again: a spin)."""
    with new_ring() as up, new_ring() as down:
        slot = Slot(0, up, down, state=SlotState.OPEN, conn_id=7, type="UDP")
        stream = Send(slot, DataKind.SENDL, 1 << 20, block=2000)
        send = Send(slot, DataKind.SEND, 5)
        send.ahead = Leftover(stream, bytes(3000))
        up.put_nowait(bytes(up.capacity - 100))  # room for the 5-byte datagram, not for a block
        send.take(b"small")
        send.payload_done()
        assert send.result() is None
        assert send.room_needed() == 2000 + 32
        up.consume(up.available())
        send.pump()
        assert send.result() == b"\r\nSEND OK\r\n"


def test_a_udp_leftover_goes_in_one_block_per_datagram():
    """A UDP stream's leftover is admitted as the stream queued it: one datagram per block, in order,
    each whole (none cut to the ring's room)."""
    with new_ring() as up, new_ring() as down:
        slot = Slot(0, up, down, state=SlotState.OPEN, conn_id=7, type="UDP")
        stream = Send(slot, DataKind.PASSTHROUGH, 0, block=1000)
        leftover = Leftover(stream, bytes(range(250)) * 10)
        up.put_nowait(bytes(up.capacity - 1500))  # room for one block's record, not two
        assert not leftover.push() and len(leftover.data) == 1500
        up.consume(up.capacity - 1500)
        assert leftover.push()
        sizes = []
        while up.available():
            header = records.peek_record_header(up)
            sizes.append(header.length)
            up.consume(header.total)
        assert sizes == [1000, 1000, 500]
