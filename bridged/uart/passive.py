"""Passive receive mode (AT+CIPRECVTYPE=1): one link's unread data and its notice.

Theory of operation
-------------------
The data stays in the link's downlink ring as the worker published it (DATA
records, perhaps an EOF record last) until AT+CIPRECVDATA takes it; the
worker stops reading its socket at the receive window, so the ring holds all
of it.  ``Unread`` counts published records once (``count``), takes bytes
from the front (``read``; one read never joins two datagrams) and hands back
the rest of a record that reads left in part when the link returns to active
mode (``take_partial``).

The notice ``+IPD[,<id>],<len>`` follows ESP-AT (AT+CIPRECVTYPE notes): one
notice when data waits, the next only once the host has read; after every
read, what is left is announced again (esp-at-behavior.md 8.3).  Its length
is what is unread when the notice is *written* (DESIGN.md), not when data
arrived: ``Notice.want`` hands out a token when a notice is to be queued, and
the UART output asks ``Notice.length`` with it at the moment the notice joins
a write -- and drops it when nothing is unread by then::

    QUIET  --want, data unread-->    QUEUED   (a token; the only valid one)
    QUEUED --length, data unread-->  OUT      (written with what is unread now)
    QUEUED --length, none unread-->  QUIET    (dropped)
    QUEUED or OUT --read / reset-->  QUIET    (a queued token is void)

A read voids a queued notice instead of letting it count after the read: it
was queued before the read's reply, so it could be written ahead of that
reply with the read already taken off, and a driver would take the reply's
bytes off twice.  The front queues a fresh notice after the reply.

No I/O here beyond the ring's memory, no clock: tested with a real ring.
"""

from __future__ import annotations

import enum

from bridged.ipc import records
from bridged.ipc.rings import Ring

__all__ = ["NoticeState", "Notice", "Unread"]


class NoticeState(enum.Enum):
    QUIET = enum.auto()  # no notice queued or unanswered
    QUEUED = enum.auto()  # a notice waits in the UART output, its length not yet known
    OUT = enum.auto()  # a notice was written; the next waits for a read


class Notice:
    """ESP-AT's one-notice-until-read rule, with the length fixed at write time."""

    def __init__(self) -> None:
        self.state = NoticeState.QUIET
        self._token = 0

    def want(self, unread: int) -> int | None:
        """The token of a notice to queue now, or None (nothing unread, or a
        notice is queued or unanswered)."""
        if not unread or self.state is not NoticeState.QUIET:
            return None
        self._token += 1
        self.state = NoticeState.QUEUED  # QUIET -> QUEUED
        return self._token

    def length(self, token: int, unread: int) -> int:
        """The length to write for a queued notice; 0: write nothing."""
        if token != self._token or self.state is not NoticeState.QUEUED:
            return 0  # void: a read or reset came after it was queued
        if not unread:
            self.state = NoticeState.QUIET  # QUEUED -> QUIET
            return 0
        self.state = NoticeState.OUT  # QUEUED -> OUT
        return unread

    def read(self) -> None:
        """The host read (AT+CIPRECVDATA): a new notice may follow its reply."""
        self.state = NoticeState.QUIET  # -> QUIET; a queued token is void now

    reset = read  # a new connection, or back to active mode


class Unread:
    """The records of a passive link that AT+CIPRECVDATA has not taken yet."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.notice = Notice()
        self.offset = 0  # payload bytes of the first record already read
        self.total = 0  # unread payload bytes of the records counted so far
        self.scanned = 0  # ring bytes past the read index already counted
        self.eof_seen = False  # counting stopped at an EOF record

    def reset(self) -> None:
        """A new connection in the slot: nothing read, nothing counted."""
        self.offset = 0
        self.forget()

    def forget(self) -> None:
        """Back to active mode: records go out whole; only the offset into a
        record that reads left in part stays, until ``take_partial``."""
        self.total = self.scanned = 0
        self.eof_seen = False
        self.notice.reset()

    def count(self) -> bool:
        """Count the DATA records published since the last count, up to an EOF
        record; True if there were any."""
        before = self.scanned
        while not self.eof_seen:
            header = records.peek_record_header(self.ring, self.scanned)
            if header is None:
                break
            if header.kind == records.EOF:
                self.eof_seen = True
                break
            # The first record may be part read (``forget`` keeps the offset).
            self.total += header.length - (self.offset if not self.scanned else 0)
            self.scanned += header.total
        return self.scanned != before

    def read(self, limit: int, one_datagram: bool) -> bytes:
        """Take up to ``limit`` bytes of the counted records."""
        parts: list[bytes] = []
        taken = 0
        while taken < limit:
            header = records.peek_record_header(self.ring)
            # Only records already counted: the worker may publish more meanwhile.
            if header is None or header.kind != records.DATA or header.total > self.scanned:
                break
            n = min(limit - taken, header.length - self.offset)
            parts.append(self.ring.peek(n, header.size + self.offset))
            taken += n
            self.total -= n
            self.offset += n
            if self.offset == header.length:
                self.ring.consume(header.total)
                self.scanned -= header.total
                self.offset = 0
            if one_datagram:
                break
        self.notice.read()
        return b"".join(parts)

    def take_partial(self) -> bytes | None:
        """Consume a record that reads left in part; return its rest (None if none)."""
        if not self.offset:
            return None
        header = records.peek_record_header(self.ring)
        rest = self.ring.peek(header.length - self.offset, header.size + self.offset)
        self.ring.consume(header.total)
        self.reset()
        return rest
