"""One data phase on its way into a link's uplink ring, from ``>`` to its end.

Theory of operation.  The uplink ring plus the worker's kernel socket buffer
are bridged's "protocol stack send buffer" (lwIP's on ESP-AT, whose SEND OK
means send() took the bytes, not that the peer has them).  So a send is over
(SEND OK) once every byte of it is *admitted* into the ring; it fails (SEND
FAIL) when its connection is gone before that.  Bytes admitted and then lost
(the peer resets the connection) are reported as ESP-AT reports them: the
link's CLOSED.  The ring is bounded: a full one makes admission wait, and the
front stops reading the UART meanwhile (flow control).  A send that AT+CIPTCPOPT's
so_sndtimeo ends while it waits gets SEND FAIL; the part of it already admitted
goes out, as lwIP sends what a timed-out send() took.  A stream (AT+CIPSENDL)
that waits for room longer than so_sndtimeo fails too: the rest of its payload
is read and dropped, then SEND FAIL, as ESP-AT ends a stream whose send failed.

* AT+CIPSEND / AT+CIPSENDEX gather the payload and queue it once it is
  complete, as ESP-AT sends only then: ``+++`` cancels with nothing sent.
* AT+CIPSENDL streams: chunks go into the ring while the MCU still sends,
  and ``+CIPSENDL:<had sent>,<port recv>`` reports progress every
  <report size> bytes admitted.
* Passthrough streams with no end.
* On a UDP link every queued piece is one record, so one datagram; a stream
  (AT+CIPSENDL, passthrough) queues one block (<transmit size>, [links] chunk)
  or a shorter tail at a time, as ESP-AT hands its stack one block per send.
"""

from __future__ import annotations

import asyncio

import structlog

from bridged.at import format as fmt
from bridged.at.datamode import DataKind
from bridged.at.session import send_result
from bridged.ipc import records
from bridged.ipc.rings import Ring
from bridged.uart.slots import Slot, SlotState

__all__ = ["Leftover", "Send"]

log = structlog.get_logger()

_RECORD_SLACK = 32  # header and address of a datagram record


class Send:
    def __init__(self, slot: Slot, kind: DataKind, length: int,
                 remote: tuple[str, int] | None = None, report_size: int = 1024, block: int = 2920) -> None:
        self.slot = slot
        self.conn_id = slot.conn_id
        self.kind = kind
        self.length = length
        self.remote = remote
        self.report_size = report_size
        self.datagram = slot.type.startswith("UDP")
        self.streaming = kind in (DataKind.SENDL, DataKind.PASSTHROUGH)
        # A streamed datagram's most bytes: one block, and never more than the ring holds.
        self.block = max(1, min(block, slot.uplink.capacity - _RECORD_SLACK))
        self.gathered: bytes | bytearray | None = b"" if not self.streaming else None
        self.queued = 0  # gathered bytes already in the ring
        self.start = slot.uplink.write_index  # ring index of this phase's first byte
        self.end: int | None = None  # ring index after the last byte, once all is admitted
        self.complete = False  # the MCU has sent every byte
        self.admitted = 0  # payload bytes in the ring (what +CIPSENDL reports as sent)
        self.sent_reported = 0
        self.dropped = 0  # streamed while the link was down (or after so_sndtimeo passed)
        self.timed_out = False  # so_sndtimeo passed while a stream waited for room: the rest is dropped
        self.moved_at = 0.0  # loop time a chunk of the stream last went into the ring
        self.ahead: Leftover | None = None  # an escaped stream's bytes that go before this payload
        self.direct = False  # its payload is read straight into the ring (uart.direct)
        self.staged = 0  # ... bytes of it there, unpublished until the last one came
        self.direct_at = 0.0  # ... loop time of the last such read

    # -- state -------------------------------------------------------------------

    def alive(self) -> bool:
        """Its connection is still open to admission: not ended, and not hung up
        (CLOSING: the worker flushes only what the ring holds when its Close arrives), and
        not failed by so_sndtimeo."""
        slot = self.slot
        return (slot.conn_id == self.conn_id and self.conn_id is not None and not slot.ended
                and slot.state is SlotState.OPEN and not self.timed_out)

    def room(self) -> int | None:
        """How many payload bytes the parser may hand out now (None: any)."""
        if not self.streaming or not self.alive():
            return None
        if self.ahead is not None and not self._push_ahead():
            return 0
        free = self.slot.uplink.free()
        if not self.datagram:
            return free
        # Room for a whole block, or none: a datagram cut to the ring's room would
        # change what the peer receives.
        return self.block if free - _RECORD_SLACK >= self.block else 0

    def room_needed(self) -> int:
        """Free ring bytes worth resuming for: a gathered datagram's whole record,
        else a few (a doorbell for a sliver of room would wake us for nothing)."""
        if self.datagram:
            need = (len(self.gathered) if self.gathered is not None else self.block) + _RECORD_SLACK
        elif self.gathered is not None:
            need = max(1, min(_RECORD_SLACK, len(self.gathered) - self.queued))
        else:
            need = _RECORD_SLACK
        # A leftover ahead goes in first: room for less than its next record would wake us to no end.
        return need if self.ahead is None else max(need, self.ahead.room_needed())

    @property
    def waiting(self) -> bool:
        """Complete, alive, and part of it waits for ring room."""
        return self.complete and self.end is None and self.alive()

    # -- input -------------------------------------------------------------------

    def take(self, chunk: bytes, at: float = 0.0) -> None:
        """``chunk`` of the payload, its last byte read at ``at`` (loop time; 0: now)."""
        gathered = self.gathered
        if gathered is not None:
            # A payload read at once stays the bytes it came as (the ring's one-copy path).
            if not gathered:
                self.gathered = chunk
            elif type(gathered) is bytes:
                self.gathered = bytearray(gathered) + chunk
            else:
                gathered += chunk
        elif not self.alive():
            self.dropped += len(chunk)  # a dropped link: the bytes have nowhere to go
        elif self.datagram:
            records.put_record(self.slot.uplink, records.DATA, chunk, self.remote)
            self.admitted += len(chunk)
        else:
            self.admitted += _admit(self.slot.uplink, chunk, at)

    def payload_done(self) -> None:
        self.complete = True
        if self.gathered is None:
            self.end = self.slot.uplink.write_index
        else:
            self.pump()

    def pump(self) -> None:
        """Queue gathered bytes as the ring makes room."""
        if self.gathered is None or self.end is not None or not self.alive():
            return
        if self.ahead is not None and not self._push_ahead():
            return
        ring = self.slot.uplink
        if self.staged:  # read straight into the ring (uart.direct): it all fitted then
            self.start = ring.write_index
            ring.commit(self.staged)
            self.queued = self.admitted = self.staged
            self.end = self.start + self.staged
            return
        if self.datagram:
            if len(self.gathered) + _RECORD_SLACK > ring.capacity:
                self._too_big(ring.capacity)
                return
            if records.put_record(ring, records.DATA, self.gathered, self.remote):
                self.end = ring.write_index
                self.admitted = len(self.gathered)
            return
        if self.queued == 0:
            self.start = ring.write_index
            self.queued = _admit(ring, self.gathered)
        elif self.queued < len(self.gathered):
            with memoryview(self.gathered) as view:
                self.queued += ring.put_nowait(view[self.queued:])
        self.admitted = self.queued
        if self.queued == len(self.gathered):
            self.end = self.start + self.queued

    def _push_ahead(self) -> bool:
        """Admit what an escaped stream left on this link first; True once it is all in."""
        if self.ahead.push():
            self.ahead = None
        return self.ahead is None

    def _too_big(self, capacity: int) -> None:
        """A datagram the ring can never hold: it fails, as one lwIP has no buffer for."""
        self.dropped = len(self.gathered)
        log.warning("datagram_too_big", link_id=self.slot.link_id, length=self.dropped, ring_size=capacity,
                    why="a UDP send must fit the uplink ring: raise [links] ring_size or lower cipsend_max")

    # -- output -------------------------------------------------------------------

    def progress(self, received: int) -> bytes:
        """AT+CIPSENDL's +CIPSENDL line due now, if any."""
        if self.kind is not DataKind.SENDL:
            return b""
        sent = self.admitted
        final = self.end is not None
        if sent - self.sent_reported >= self.report_size or (final and sent != self.sent_reported):
            self.sent_reported = sent
            return fmt.info("+CIPSENDL", sent, received)
        return b""

    def result(self) -> bytes | None:
        """SEND OK, SEND FAIL, or None while part of it waits for room (bridged.at.session's rule)."""
        return send_result(self.complete, self.end is not None, self.alive(), self.dropped)


class Leftover:
    """Bytes a stream (AT+CIPSENDL, passthrough) had taken from the MCU but not yet
    put into its full ring when +++ ended it.  The MCU sent them before it
    escaped, and the link stays open: they go out as the ring makes room, ahead
    of anything a later send puts on the link (``Send.ahead``).  If the link
    ends first they are dropped (logged by the owner), as the ring's own are."""

    def __init__(self, send: Send, data: bytes) -> None:
        self.slot = send.slot
        self.conn_id = send.conn_id
        self.datagram = send.datagram
        self.remote = send.remote
        self.block = send.block
        self.data = bytearray(data)

    def alive(self) -> bool:
        slot = self.slot
        return (slot.conn_id == self.conn_id and self.conn_id is not None and not slot.ended
                and slot.state is SlotState.OPEN)

    def room_needed(self) -> int:
        """Free ring bytes that let push() make progress (a datagram goes whole)."""
        if self.datagram:
            return min(self.block, len(self.data)) + _RECORD_SLACK
        return max(1, min(_RECORD_SLACK, len(self.data)))

    def push(self) -> bool:
        """Put as much as fits into the ring; True once nothing is left (or the link is gone)."""
        if not self.alive():
            return True
        ring = self.slot.uplink
        if not self.datagram:
            del self.data[:ring.put_nowait(self.data)]
        while self.datagram and self.data:
            piece = bytes(self.data[:self.block])  # one block per datagram, as the stream queued them
            if not records.put_record(ring, records.DATA, piece, self.remote):
                break
            del self.data[:len(piece)]
        return not self.data

    async def drain(self, wait: float, poll: float) -> bool:
        """Push as room comes (a look every ``poll`` s) for up to ``wait`` s; True once all went
        (AT+CIPCLOSE hands them over before the close, as lwIP's close sends its buffer)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not self.push():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(poll)
        return not self.data


def _admit(ring: Ring, data: bytes | bytearray, at: float = 0.0) -> int:
    """Put as much of ``data`` into the ring as fits, stamped ``at`` (``Ring.commit``); the
    count.  Bytes that fit whole take the ring's one-slice path (a payload read at once, a chunk)."""
    if type(data) is bytes and len(data) <= ring.free():
        ring.stage(0, data)
        ring.commit(len(data), at)
        return len(data)
    return ring.put_nowait(data, at)
