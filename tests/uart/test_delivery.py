"""Downlink delivery on real rings: active +IPD records, back-pressure, CONNECT first,
EOF of this connection or a stale one, passive notices, and what a dead worker owed."""

from __future__ import annotations

import asyncio
import socket
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest

from bridged.ipc import records
from bridged.ipc.records import DATA, EOF, put_record
from bridged.uart.delivery import Delivery
from bridged.uart.slots import Slot, SlotState
from tests.ringtools import new_ring

pytestmark = pytest.mark.timeout(60)


class Front:
    """The front's side of LinkEvents: records what it is told."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.notices: list[Callable[[], int]] = []
        self.ended: list[str] = []
        self.room = True

    def link_data(self, slot: Slot, record: records.Record) -> None:
        self.data.append(bytes(record.payload))

    def link_notice(self, slot: Slot, length: Callable[[], int]) -> None:
        self.notices.append(length)

    def link_closed(self, slot: Slot, reason: str) -> None:
        raise AssertionError("delivery reports an end through its `end` callback")

    def link_ended(self, slot: Slot) -> None:
        pass

    def link_accepted(self, slot: Slot) -> None:
        pass

    def link_freed(self, slot: Slot) -> None:
        pass

    def delivery_room(self) -> int:
        return 32768 if self.room else 0


@contextmanager
def open_slot(state: SlotState = SlotState.OPEN, conn_id: int = 7) -> Iterator[Slot]:
    """Slot 0 with real rings and a control socket (a live worker's)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with new_ring(65536, "up") as up, new_ring(65536, "down") as down, a, b:
        yield Slot(0, up, down, control=a, state=state, conn_id=conn_id)


def run(body: Callable[[Delivery, Front], None]) -> None:
    async def main() -> None:
        front = Front()
        ends: list[str] = []
        delivery = Delivery(front, lambda slot, reason: ends.append(reason))
        front.ended = ends
        body(delivery, front)

    asyncio.run(main())


def publish(slot: Slot, *payloads: bytes, kind: int = DATA) -> None:
    for payload in payloads:
        assert put_record(slot.downlink, kind, payload)


def test_active_records_go_out_in_order_and_leave_the_ring():
    """An open active slot's DATA records reach the front in order; the ring is empty after."""
    def body(delivery: Delivery, front: Front) -> None:
        with open_slot() as slot:
            publish(slot, b"one", b"two", b"three")
            delivery.drain(slot)
            assert front.data == [b"one", b"two", b"three"]
            assert slot.downlink.available() == 0
    run(body)


def test_a_backed_up_output_keeps_the_records_in_the_ring_until_it_catches_up():
    """With no room at the UART nothing is taken from the ring; drain_deferred delivers it later."""
    def body(delivery: Delivery, front: Front) -> None:
        with open_slot() as slot:
            publish(slot, b"held", b"back")
            front.room = False
            delivery.drain(slot)
            assert front.data == [] and slot.downlink.available() > 0
            front.room = True
            delivery.drain_deferred()
            assert front.data == [b"held", b"back"]
            assert slot.downlink.available() == 0
    run(body)


def test_nothing_goes_out_before_connect_is_announced():
    """Data of an unannounced connection waits in the ring; announce() lets it go."""
    def body(delivery: Delivery, front: Front) -> None:
        with open_slot() as slot:
            slot.unannounced = True
            publish(slot, b"peer spoke first")
            delivery.drain(slot)
            assert front.data == []
            delivery.announce(slot)
            assert front.data == [b"peer spoke first"] and not slot.unannounced
    run(body)


def test_an_eof_of_this_connection_ends_it_and_a_stale_one_is_ignored():
    """EOF "7 reason" ends conn 7 with that reason; an EOF of conn 6 ends nothing."""
    def body(delivery: Delivery, front: Front) -> None:
        with open_slot(conn_id=7) as slot:
            publish(slot, b"6 old connection", kind=EOF)
            publish(slot, b"last words")
            publish(slot, b"7 peer closed", kind=EOF)
            delivery.drain(slot)
            assert front.data == [b"last words"]
            assert front.ended == ["peer closed"]
    run(body)


@pytest.mark.parametrize("why", ["silent", "idle"])
def test_records_of_a_quiet_or_idle_slot_are_dropped(why):
    """A slot closed quietly (AT+RST) or no longer open gives no +IPD, yet its ring is emptied."""
    def body(delivery: Delivery, front: Front) -> None:
        with open_slot(SlotState.IDLE if why == "idle" else SlotState.OPEN) as slot:
            slot.silent = why == "silent"
            publish(slot, b"x" * 100, b"y" * 100)
            delivery.drain(slot)
            assert front.data == [] and slot.downlink.available() == 0
    run(body)


def test_passive_data_stays_in_the_ring_with_one_notice_of_what_is_unread():
    """Passive mode: no +IPD, one notice whose length is counted when written, unread() agrees."""
    def body(delivery: Delivery, front: Front) -> None:
        with open_slot() as slot:
            slot.passive = True
            publish(slot, b"a" * 10)
            delivery.drain(slot)
            publish(slot, b"b" * 5)
            delivery.drain(slot)
            assert front.data == [] and len(front.notices) == 1  # one notice until a read
            assert delivery.unread(slot) == 15
            assert front.notices[0]() == 15  # the notice says what is unread as it is written
            assert slot.rx.read(100, one_datagram=False) == b"a" * 10 + b"b" * 5
            assert delivery.unread(slot) == 0
    run(body)


def test_passive_eof_ends_the_connection_once_everything_is_read():
    """An EOF behind unread passive data waits for the reads; then the connection ends."""
    def body(delivery: Delivery, front: Front) -> None:
        with open_slot(conn_id=3) as slot:
            slot.passive = True
            publish(slot, b"tail")
            publish(slot, b"3 peer closed", kind=EOF)
            delivery.drain(slot)
            assert front.ended == []
            assert slot.rx.read(4, one_datagram=False) == b"tail"
            delivery.scan(slot)
            assert front.ended == ["peer closed"]
    run(body)


def test_a_dead_workers_data_is_owed_as_ipd_even_in_passive_mode():
    """owed_at_death hands the rest of a part-read record, then every DATA record, to the front."""
    def body(delivery: Delivery, front: Front) -> None:
        with open_slot() as slot:
            slot.passive = True
            publish(slot, b"0123456789", b"more")
            delivery.drain(slot)
            assert slot.rx.read(4, one_datagram=True) == b"0123"
            delivery.owed_at_death(slot)
            assert front.data == [b"456789", b"more"]
            assert slot.downlink.available() == 0
    run(body)


def test_a_quietly_closed_slot_owes_nothing_at_death():
    """After AT+RST (silent) a dead worker's records are dropped, not sent."""
    def body(delivery: Delivery, front: Front) -> None:
        with open_slot() as slot:
            slot.silent = True
            publish(slot, b"late")
            delivery.owed_at_death(slot)
            assert front.data == [] and slot.downlink.available() == 0
    run(body)
