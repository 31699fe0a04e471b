"""One data phase on its way into a link's uplink ring, from ``>`` to its end.

Theory of operation.  What "handed to the protocol stack" means is the ring's
read index: the worker advances it only for bytes its socket accepted.  So a
send is over (SEND OK) once the read index passes ``end``, the ring index
after its last byte; it fails (SEND FAIL) when its connection is gone first.

* AT+CIPSEND / AT+CIPSENDEX gather the payload and queue it once it is
  complete, as ESP-AT sends only then: ``+++`` cancels with nothing sent.
* AT+CIPSENDL streams: chunks go into the ring while the MCU still sends,
  and ``+CIPSENDL:<had sent>,<port recv>`` reports progress every
  <report size> bytes handed on.
* Passthrough streams with no end.
* On a UDP link every queued piece is one record, so one datagram.
"""

from __future__ import annotations

from bridged.at import format as fmt
from bridged.at.datamode import DataKind
from bridged.ipc import records
from bridged.uart.links import Slot

__all__ = ["Send"]

_RECORD_SLACK = 32  # header and address of a datagram record


class Send:
    def __init__(self, slot: Slot, kind: DataKind, length: int,
                 remote: tuple[str, int] | None = None, report_size: int = 1024) -> None:
        self.slot = slot
        self.conn_id = slot.conn_id
        self.kind = kind
        self.length = length
        self.remote = remote
        self.report_size = report_size
        self.datagram = slot.type.startswith("UDP")
        self.streaming = kind in (DataKind.SENDL, DataKind.PASSTHROUGH)
        self.gathered = bytearray() if not self.streaming else None
        self.queued = 0  # gathered bytes already in the ring
        self.start = slot.uplink.write_index  # ring index of this phase's first byte
        self.end: int | None = None  # ring index after the last byte, once all is queued
        self.complete = False  # the MCU has sent every byte
        self.sent_reported = 0
        self.dropped = 0  # streamed while the link was down

    # -- state -------------------------------------------------------------------

    def alive(self) -> bool:
        return self.slot.conn_id == self.conn_id and self.conn_id is not None and not self.slot.ended

    def room(self) -> int | None:
        """How many payload bytes the parser may hand out now (None: any)."""
        if not self.streaming or not self.alive():
            return None
        free = self.slot.uplink.free()
        return max(0, free - _RECORD_SLACK) if self.datagram else free

    @property
    def had_sent(self) -> int:
        return self.slot.uplink.read_index - self.start

    # -- input -------------------------------------------------------------------

    def take(self, chunk: bytes) -> None:
        if self.gathered is not None:
            self.gathered += chunk
        elif not self.alive():
            self.dropped += len(chunk)  # a dropped link: the bytes have nowhere to go
        elif self.datagram:
            records.put_record(self.slot.uplink, records.DATA, chunk, self.remote)
        else:
            self.slot.uplink.put_nowait(chunk)

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
        ring = self.slot.uplink
        if self.datagram:
            if records.put_record(ring, records.DATA, self.gathered, self.remote):
                self.end = ring.write_index
            return
        if self.queued == 0:
            self.start = ring.write_index
        with memoryview(self.gathered) as view:
            self.queued += ring.put_nowait(view[self.queued:])
        if self.queued == len(self.gathered):
            self.end = self.start + self.queued

    # -- output -------------------------------------------------------------------

    def progress(self, received: int, sent: int | None = None) -> bytes:
        """AT+CIPSENDL's +CIPSENDL lines due now (``sent``: a snapshot to report)."""
        if self.kind is not DataKind.SENDL:
            return b""
        sent = self.had_sent if sent is None else sent
        final = self.end is not None and sent >= self.end - self.start
        if sent - self.sent_reported >= self.report_size or (final and sent != self.sent_reported):
            self.sent_reported = sent
            return fmt.info("+CIPSENDL", sent, received)
        return b""

    def result(self) -> tuple[bytes | None, int]:
        """(SEND OK / SEND FAIL / None while undecided, bytes handed on so far).

        One reading of the read index decides both, so the last +CIPSENDL
        report and the result always agree (the worker moves it meanwhile).
        """
        sent = self.had_sent
        if not self.complete:
            return None, sent
        if self.end is not None and self.start + sent >= self.end and not self.dropped:
            return fmt.SEND_OK, sent
        if not self.alive():
            return fmt.SEND_FAIL, sent
        return None, sent
