"""Batched +IPD delivery against a hostile peer or worker: a flood of tiny records keeps the
output near its high mark (heads counted, not only payloads), an EOF inside a batch ends the
connection before anything after it, a corrupt ring delivers what came before it and ends its
worker, and a worker refilling as fast as the front takes does not hold the front."""

from __future__ import annotations

import asyncio

import pytest

from bridged.at import format as fmt
from bridged.ipc import records
from bridged.ipc.records import DATA, EOF, put_record
from bridged.uart.delivery import Delivery
from bridged.uart.slots import Slot, SlotState
from tests.uart.test_delivery import open_slot

pytestmark = pytest.mark.timeout(60)

HIGH = 32768
_REMOTE = ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)  # the longest head AT+CIPDINFO=1 shows


class SizedFront:
    """LinkEvents whose room is that of the real front: the high mark less what +IPD queued."""

    def __init__(self) -> None:
        self.buffered = 0
        self.events: list[object] = []

    def link_data(self, slot: Slot, record: records.Record) -> None:
        self.buffered += len(fmt.ipd_active(4, len(record.payload), _REMOTE)) + len(record.payload)
        self.events.append(bytes(record.payload))

    def link_notice(self, slot, length): pass
    def link_closed(self, slot, reason): pass
    def link_ended(self, slot): pass
    def link_accepted(self, slot): pass
    def link_freed(self, slot): pass

    def delivery_room(self) -> int:
        return HIGH - self.buffered


def _run(body) -> None:
    async def main() -> None:
        front = SizedFront()
        body(front)

    asyncio.run(main())


def test_a_flood_of_one_byte_records_overshoots_the_high_mark_by_one_record_at_most():
    """A 64 KiB ring full of 1-byte records (a peer's tiny segments or datagrams): one drain
    queues at most one +IPD past the high mark, not one head per record of the ring."""
    def body(front: SizedFront) -> None:
        delivery = Delivery(front, lambda slot, reason: None)
        with open_slot() as slot:
            put = 0
            while put_record(slot.downlink, DATA, b"%c" % (put % 256)):
                put += 1
            assert put > 5000
            one = len(fmt.ipd_active(4, 1, _REMOTE)) + 1
            front.buffered = HIGH - 1000  # a little room: the usual state under back-pressure
            delivery.drain(slot)
            assert front.buffered <= HIGH + one, front.buffered - HIGH
            front.buffered = 0  # the UART caught up
            delivery.drain_deferred()
            assert front.buffered <= HIGH + one, front.buffered - HIGH
            while slot.downlink.available():  # the rest, as the output keeps emptying
                front.buffered = 0
                delivery.drain_deferred()
            assert front.events == [b"%c" % (i % 256) for i in range(put)]  # none lost, in order
    _run(body)


def test_an_eof_in_a_batch_ends_the_connection_before_the_records_behind_it():
    """DATA, EOF of this connection, DATA of the next one on the same id: CLOSED once, between
    them; the new connection's record is not delivered as the old one's."""
    def body(front: SizedFront) -> None:
        def end(slot: Slot, reason: str) -> None:
            front.events.append(("CLOSED", reason))
            slot.state, slot.conn_id = SlotState.IDLE, None  # as LinkTable._end

        delivery = Delivery(front, end)
        with open_slot(conn_id=7) as slot:
            for kind, payload in ((DATA, b"old"), (EOF, b"7 peer closed"), (DATA, b"new"), (EOF, b"7 again")):
                assert put_record(slot.downlink, kind, payload)
            delivery.drain(slot)
            assert front.events == [b"old", ("CLOSED", "peer closed")]
            assert slot.downlink.available() == 0
    _run(body)


def test_an_eof_in_a_batch_then_a_reopened_link_gets_only_its_own_records():
    """The link reopens as the EOF is taken (a new connection on the id): what follows the
    EOF in the same drain goes out after CLOSED, none of the old connection's after it."""
    def body(front: SizedFront) -> None:
        def end(slot: Slot, reason: str) -> None:
            front.events.append(("CLOSED", reason))
            slot.conn_id = 8  # the id at once taken again, still OPEN

        delivery = Delivery(front, end)
        with open_slot(conn_id=7) as slot:
            for kind, payload in ((DATA, b"a"), (DATA, b"b"), (EOF, b"7 x"), (DATA, b"c"), (EOF, b"7 stale")):
                assert put_record(slot.downlink, kind, payload)
            delivery.drain(slot)
            assert front.events == [b"a", b"b", ("CLOSED", "x"), b"c"]
    _run(body)


_GARBAGE = [
    b"\xff\xff\xff\x7f\x00\x00\x01\x00",  # a DATA header claiming 2 GiB, past what is published
    b"\x04\x00\x00\x00\x00\x00\x01\x05xxxx",  # address length 5
    b"\x04\x00\x00\x00\x00\x00\x00\x00xxxx",  # kind 0
    b"\x01\x00",  # shorter than a header
]


@pytest.mark.parametrize("garbage", _GARBAGE)
@pytest.mark.parametrize("passive", [False, True])
def test_a_corrupt_record_after_good_ones_ends_the_worker_as_a_dead_one(garbage, passive):
    """A buggy or taken-over worker's bad header: (active) the records before it go out, then
    the ring is emptied and the worker ended as dead, once; no exception reaches the loop; the
    supervisor is told once, with the pid it announced (not the one the worker's Hello claimed)."""
    def body(front: SizedFront) -> None:
        dead: list[Slot] = []
        told: list[tuple[int, int]] = []
        delivery = Delivery(front, lambda slot, reason: None, dead.append)
        delivery.on_refused = lambda slot, pid: told.append((slot.link_id, pid))
        with open_slot() as slot:
            slot.pid, slot.worker_pid = 1, 4242  # Hello's claim, WorkerStarted's
            slot.passive = passive
            put_record(slot.downlink, DATA, b"good")
            assert slot.downlink.put_nowait(garbage) == len(garbage)
            delivery.drain(slot)
            assert front.events == ([] if passive else [b"good"])
            assert dead == [slot] and slot.downlink.available() == 0
            assert told == [(slot.link_id, 4242)]
    _run(body)


@pytest.mark.parametrize("garbage", _GARBAGE)
def test_a_dead_workers_corrupt_ring_owes_what_came_before_and_drops_the_rest(garbage):
    """At a worker's death the good records before the bad one are owed as +IPD; the rest
    is dropped (no exception out of the death's handling); the supervisor, which sees the death,
    is not told of a refusal."""
    def body(front: SizedFront) -> None:
        delivery = Delivery(front, lambda slot, reason: None)
        told: list[Slot] = []
        delivery.on_refused = lambda slot, pid: told.append(slot)
        with open_slot() as slot:
            put_record(slot.downlink, DATA, b"owed")
            slot.downlink.put_nowait(garbage)
            delivery.owed_at_death(slot)
            assert front.events == [b"owed"] and slot.downlink.available() == 0
            assert told == []
    _run(body)


def test_a_worker_refilling_as_fast_as_the_front_takes_does_not_hold_the_front():
    """Empty records (no output, so the room never shrinks) published faster than a batch
    takes them (more than its budget between two looks): drain returns after a bounded
    number of batches and carries on at the loop's next turn."""
    async def main() -> None:
        front = SizedFront()
        delivery = Delivery(front, lambda slot, reason: None)
        with open_slot() as slot:
            looks = 0

            def room() -> int:  # the hostile worker: more records every time we look
                nonlocal looks
                looks += 1
                assert looks < 10_000, "drain never returned"
                for _ in range(HIGH // fmt.IPD_HEAD_MAX + 10):
                    put_record(slot.downlink, DATA, b"")
                return HIGH

            front.delivery_room = room
            delivery.drain(slot)
            first = looks
            await asyncio.sleep(0.01)
            assert looks > first  # taken up again after the loop's other work
            slot.control = None  # the worker is gone: the rounds stop
            await asyncio.sleep(0.01)

    asyncio.run(main())
