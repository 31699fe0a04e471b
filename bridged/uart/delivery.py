"""Downlink delivery: the records of the link workers, to the front.

Theory of operation.  In active mode a slot's DATA records go to the front
(``LinkEvents.link_data``, which frames them as +IPD) while the UART output
has room for them (``delivery_room``); otherwise the slot is remembered and drained
again once the output catches up, and meanwhile the records stay in the ring,
so the worker stops reading its socket.  In passive mode (AT+CIPRECVTYPE=1)
the records stay in the ring until AT+CIPRECVDATA (``read``); a notice is
queued when data waits (``uart.passive``).  An EOF record ends the
connection (``end``, the slot table's).  Nothing of a connection the MCU
opened is delivered before the answer that announces it (CONNECT) is
written: until ``announce`` its records wait in the ring (``Slot.unannounced``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Callable

import structlog

from bridged.at.format import IPD_HEAD_MAX
from bridged.ipc import records
from bridged.uart.passive import NoticeState
from bridged.uart.slots import LinkEvents, Slot, SlotState

__all__ = ["Delivery"]

log = structlog.get_logger()

_DELIVERING = (SlotState.OPEN, SlotState.CLOSING)  # states whose DATA records go out as +IPD
_BATCHES_PER_DRAIN = 64  # then the event loop's other work first (a worker may refill as fast as we take)


class Delivery:
    def __init__(self, events: LinkEvents, end: Callable[[Slot, str], None],
                 dead: Callable[[Slot], None] = lambda slot: None) -> None:
        self.events = events
        self._end = end  # the connection of a slot is gone (LinkTable._end)
        self._dead = dead  # end a slot's worker as a dead one (LinkTable._worker_died)
        # Tell the supervisor a slot's worker was refused, with its pid (the front sends WorkerRefused).
        self.on_refused: Callable[[Slot, int], None] = lambda slot, pid: None
        self._deferred: dict[int, Slot] = {}  # slots whose records wait for UART room
        self.loop = asyncio.get_running_loop()

    # -- which records go where ----------------------------------------------------------

    @staticmethod
    def delivers(slot: Slot) -> bool:
        """Data records of the slot go out as +IPD (else they are dropped)."""
        return slot.state in _DELIVERING and not (slot.silent or slot.passive)

    @staticmethod
    def receiving(slot: Slot) -> bool:
        """Passive data of an open connection waits in the slot's ring."""
        return slot.passive and slot.state is SlotState.OPEN and slot.control is not None

    def deliver_partial(self, slot: Slot) -> None:
        """Back in active mode: the rest of a record passive reads left in part.

        It obeys the rule of whole records (``delivers``): after AT+CIPCLOSE
        or AT+RST it is dropped with them, never sent as a stray +IPD.
        """
        rest = slot.rx.take_partial()
        if self.delivers(slot):
            self.events.link_data(slot, records.Record(records.DATA, rest))

    # -- passive reads ---------------------------------------------------------------------

    def unread(self, slot: Slot) -> int:
        """What AT+CIPRECVDATA could take now (no notice, no CLOSED from here:
        they must not precede the answer being made)."""
        if self.receiving(slot):
            try:
                self._count(slot)
            except records.RecordError as error:
                self._refuse(slot, error)
        return slot.rx.total if slot.state is SlotState.OPEN else 0

    def read(self, slot: Slot, limit: int) -> bytes:
        """Take up to ``limit`` unread bytes of a passive slot (AT+CIPRECVDATA)."""
        try:
            return slot.rx.read(limit, one_datagram=slot.type.startswith("UDP"))
        except records.RecordError as error:  # the worker rewrote what it had published
            self._refuse(slot, error)
            return b""

    def _count(self, slot: Slot) -> None:
        if slot.rx.count():
            slot.last_activity = self.loop.time()

    def scan(self, slot: Slot) -> None:
        """Count newly published records; queue a notice, or end once all is read."""
        try:
            self._count(slot)
        except records.RecordError as error:
            self._refuse(slot, error)
            return
        if slot.rx.total:
            if slot.silent:
                return  # a restart closes it: no notice (leaving passive mode drops the rest)
            token = slot.rx.notice.want(slot.rx.total)
            if token is not None:
                self.events.link_notice(slot, lambda: self._notice_length(slot, token))
        elif slot.rx.eof_seen:
            slot.rx.eof_seen = False
            self._take_eof(slot, records.get_record(slot.downlink))

    def _notice_length(self, slot: Slot, token: int) -> int:
        """Called as the notice is written: what it announces (0: drop it).

        Only counts: it runs inside the UART output's write, which must not
        queue anything (an EOF found here is taken by the drain it rings).
        """
        receiving = self.receiving(slot)
        if receiving:
            self._count(slot)
        return slot.rx.notice.length(token, slot.rx.total if receiving else 0)

    # -- active delivery ---------------------------------------------------------------------

    def announce(self, slot: Slot) -> None:
        """The slot's CONNECT is written (or will never be): what waited may go."""
        slot.unannounced = False
        if slot.control is not None:
            self.drain(slot)

    def drain(self, slot: Slot, clear: bool = True) -> None:
        """Deliver the slot's records while the UART output can take them
        (its doorbell's callback: one call to the first record, as the rest
        of the +IPD path, on every wake-up).

        ``clear``: reset the slot's data doorbell first (its records are all
        taken or kept track of after a drain).  False only while nothing
        listens to it (a passthrough downlink paused across ticks: a syscall
        a tick less); a doorbell left ringing then costs one empty drain
        once it is listened to again.
        """
        if clear:
            try:
                os.eventfd_read(slot.downlink.data_fd)  # Ring.clear_data_doorbell, inline
            except BlockingIOError:
                pass  # not ringing: a drain of our own (announce, back-pressure over)
        try:
            if slot.unannounced:
                return  # `announce` drains it
            if slot.passive and slot.state is SlotState.OPEN:
                self.scan(slot)
                return
            rx = slot.rx
            if rx.offset and self.events.delivery_room() > 0:
                self.deliver_partial(slot)
            if rx.total or rx.scanned or rx.eof_seen or rx.notice.state is not NoticeState.QUIET:
                rx.forget()  # (a no-op otherwise, as on every drain of an active link)
            self._deliver(slot)
        except records.RecordError as error:
            self._refuse(slot, error)

    def _refuse(self, slot: Slot, error: records.RecordError) -> None:
        """Its worker wrote what is no record (a bug, or a worker a peer took over): what
        the ring holds is dropped and the worker is ended as a dead one (CLOSED; the
        supervisor starts another), rather than the link stuck on it for good.

        A well-behaved worker exits at the EOF on its control socket; one that
        does not (a hostile one) would hold the link id for good: the supervisor
        is told, and kills it (only it may: it reaps its children)."""
        log.error("downlink_refused", link_id=slot.link_id, error=str(error))
        slot.downlink.discard_all()
        self._dead(slot)
        self.on_refused(slot, slot.worker_pid)

    def _deliver(self, slot: Slot) -> None:
        """Records in batches as large as the output's room (one consume, one
        space doorbell each); an EOF ends a batch, so the slot's state is right
        for what follows it.  Each record counts with the longest +IPD head: a
        flood of tiny records passes the high mark by one record, as big ones do."""
        for _ in range(_BATCHES_PER_DRAIN):
            room = self.events.delivery_room()
            if room <= 0:
                self._deferred[slot.link_id] = slot  # drained again once the UART catches up
                return
            batch, more = records.take_records(slot.downlink, room, IPD_HEAD_MAX)
            delivered = False
            for record in batch:
                if record.kind == records.EOF:
                    self._take_eof(slot, record)
                elif slot.state in _DELIVERING and not (slot.silent or slot.passive):  # delivers(slot), inline
                    if not delivered:  # (AT+CIPSTO) once a batch: the loop's time is the same for each
                        delivered = True
                        slot.last_activity = self.loop.time()
                    self.events.link_data(slot, record)
            if not more:
                return  # the ring is empty (its data doorbell, cleared before, rings for more)
        # A worker that refills the ring as fast as we take (records that make no output:
        # a quiet slot's, empty ones) must not hold the front: the rest after other work.
        self.loop.call_soon(self._drain_again, slot)

    def _drain_again(self, slot: Slot) -> None:
        if slot.control is not None:
            self.drain(slot)

    def _take_eof(self, slot: Slot, record: records.Record) -> None:
        conn_text, _, reason = record.payload.decode("utf-8", "replace").partition(" ")
        if conn_text.isdigit() and int(conn_text) == slot.conn_id:
            self._end(slot, reason)
        elif slot.passive:
            self.scan(slot)  # a stale EOF: look past it

    def drain_deferred(self) -> None:
        """The UART output caught up: deliver what back-pressure held in the rings."""
        if not self._deferred:
            return  # the usual case, after every write
        deferred, self._deferred = self._deferred, {}
        for link_id in sorted(deferred):
            if deferred[link_id].control is not None:
                self.drain(deferred[link_id])

    def owed_at_death(self, slot: Slot) -> None:
        """A worker died: what it received is still owed to the MCU, as +IPD even
        in passive mode (no worker, no reads), but only once: of a record that
        reads took part of, only the rest."""
        owed = slot.state is SlotState.OPEN and not slot.silent
        rest = slot.rx.take_partial()
        if rest and owed:
            self.events.link_data(slot, records.Record(records.DATA, rest))
        try:
            while (record := records.get_record(slot.downlink)) is not None:
                if record.kind == records.DATA and owed:
                    self.events.link_data(slot, record)
        except records.RecordError as error:  # what came before it went out
            log.error("downlink_refused", link_id=slot.link_id, error=str(error))
            slot.downlink.discard_all()
