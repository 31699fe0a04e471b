"""The data modes after a ``>`` prompt.  Sans I/O: time is passed in.

Theory of operation.  One machine per data phase; the parser feeds it bytes
with their arrival time and pulls events::

    kind         ends when                         +++ (with guard times)
    SEND         <length> bytes (AT+CIPSEND)        cancels: SEND Canceled
    SENDEX       <length> bytes or "\\0"             cancels: SEND Canceled
    SENDL        <length> bytes (AT+CIPSENDL)       cancels: SEND CANCELLED
    PASSTHROUGH  never (AT+CIPSEND in CIPMODE=1)    leaves data mode

``+++`` (the spec's "[Data Mode Only] +++"): three '+' with more than 20 ms
of silence before the first and after the third and less than 20 ms between
them; otherwise they are data.  Bytes read together arrive together, so a
candidate is a burst of '+' only (one read or several close ones) after a
silence; it is held back until the silence after it decides: in next_chunk()
at deadline(), or in feed() when the next bytes come after the silence (the
owner may look late; the outcome is the same).  Holding back at most three
bytes for 20 ms is the only delay the rule adds.  Times are compared as
``now >= then + GUARD``, the form deadline() reports.  The escape comes
whatever ``limit`` next_chunk() is given (a full ring must not keep the MCU in
data mode); a stream's payload still buffered then is ``leftover()``.

AT+CIPSENDEX escapes (spec): ``\\0`` ends the data (the two bytes are not
sent), ``\\<x>`` is ``<x>`` for any other x (so ``\\\\0`` sends ``\\0``).  A
backslash that ends a read waits for the next byte.  <length> counts the bytes
sent, after unescaping.

SENDL and PASSTHROUGH forward while data still arrives: whole chunks go out
as soon as ``chunk`` bytes are buffered (several at once when they are
there), a shorter rest once ``interval`` seconds passed since its first byte
(AT+TRANSINTVL; AT+CIPSENDLCFG's transmit size).
SEND and SENDEX hand over every byte at once: the owner gathers them.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

__all__ = ["DataKind", "DataMachine", "Escape", "GUARD"]

GUARD = 0.020  # seconds: the +++ guard time


class DataKind(enum.Enum):
    SEND = enum.auto()
    SENDEX = enum.auto()
    SENDL = enum.auto()
    PASSTHROUGH = enum.auto()

    __hash__ = object.__hash__  # singletons: the C slot, not Enum's Python-level hash (a key per send)


@dataclass(frozen=True, slots=True)
class Escape:
    """``+++`` with its guard times: cancel the send or leave passthrough."""


class DataMachine:
    """Bytes of one data phase -> payload chunks, completion or escape.

    Args:
        kind: which command's data phase.
        length: bytes to take (ignored for PASSTHROUGH).
        now: the time the prompt went out (the silence before +++ counts from it).
        chunk: SENDL/PASSTHROUGH forward in blocks of this size.
        interval: ... or after this many seconds.
    """

    def __init__(self, kind: DataKind, length: int, now: float, chunk: int = 2920, interval: float = 0.020) -> None:
        self.kind = kind
        self.left = length if kind is not DataKind.PASSTHROUGH else -1
        self.taken = 0  # payload bytes produced (after unescaping)
        self.received = 0  # raw bytes taken from the UART
        self.chunk = chunk
        self.interval = interval
        self._buf = bytearray()
        self._arrivals: deque[list] = deque()  # [count, arrival time] of the buffered bytes, oldest first
        self.last_arrival = 0.0  # SENDL, PASSTHROUGH: when the last byte next_chunk() handed out came
        self._timed = kind in (DataKind.SENDL, DataKind.PASSTHROUGH)  # arrivals matter (AT+TRANSINTVL)
        self._last_rx = now
        self._plus = 0  # '+' bytes held back as a +++ candidate
        self._plus_since = 0.0  # arrival of its first '+'
        self._plus_at = 0.0  # ... and of its last
        self._backslash = False  # SENDEX: a '\\' waiting for its next byte
        self._done = False
        self._escaped = False
        self._escape_due = False  # escaped, Escape not yet returned by next_chunk()

    @property
    def done(self) -> bool:
        """The phase ended (complete or escaped); no more bytes are taken."""
        return self._done or self._escaped

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def fresh(self) -> bool:
        """No byte of the phase came yet."""
        return not self.received and not self._plus and not self._buf and not self.done

    # -- input -------------------------------------------------------------------

    def feed(self, data: bytes, now: float) -> bytes:
        """Take the bytes that belong to this phase; return the rest (command input)."""
        if self.done or not data:
            return data
        silent = now >= self._last_rx + GUARD
        self._last_rx = now
        if self._plus and silent:
            self._settle()  # the silence after the candidate passed before these bytes
            if self.done:
                return data  # +++ escaped: what follows is command input
        if self._plus_candidate(data, silent, now):
            return b""
        return self._take(data, now)

    def _plus_candidate(self, data: bytes, silent: bool, now: float) -> bool:
        # A candidate is at most three bytes: longer reads are never scanned.
        only_plus = len(data) <= 3 and data.count(b"+") == len(data)
        if self._plus:  # not silent: feed() settled the candidate otherwise
            if only_plus and self._plus + len(data) <= 3:
                self._plus += len(data)
                self._plus_at = now
                return True
            self._release_plus()
            return False
        room = self.left < 0 or self.left >= 3  # a +++ must fit in what is left
        if silent and only_plus and len(data) <= 3 and room:
            self._plus, self._plus_since, self._plus_at = len(data), now, now
            return True
        return False

    def _settle(self) -> None:
        """The silence after a candidate passed: three '+' escape, fewer are data.

        A gathered send (SEND, SENDEX) is cancelled whole; a stream's bytes taken
        before the +++ but not yet handed out (its ring was full) stay for
        ``leftover()``: the MCU sent them before it escaped."""
        if self._plus == 3:
            self._plus = 0
            self._escaped = self._escape_due = True
            if not self._timed:
                self._buf.clear()
            self._arrivals.clear()
        else:
            self._release_plus()

    def leftover(self) -> bytes:
        """An escaped stream's payload that was never handed out (then the buffer is empty)."""
        out = bytes(self._buf) if self._escaped else b""
        if self._escaped:
            self._buf.clear()
        return out

    def _release_plus(self) -> None:
        """A candidate that turned out to be data (arrived when its first '+' did)."""
        plus, self._plus = self._plus, 0
        rest = self._take(b"+" * plus, self._plus_since)
        assert not rest or self.done

    def _take(self, data: bytes, now: float) -> bytes:
        if self.kind is DataKind.SENDEX:
            return self._take_escaped(data, now)
        n = len(data) if self.left < 0 else min(len(data), self.left)
        self._append(data[:n], now)
        self.received += n
        if self.left > 0:
            self.left -= n
            self._done = self.left == 0
        return data[n:]

    def _take_escaped(self, data: bytes, now: float) -> bytes:
        out = bytearray()
        i, n = 0, len(data)
        while i < n and self.left > 0:
            if self._backslash:
                self._backslash = False
                byte = data[i]
                i += 1
                if byte == 0x30:  # "\0": the end
                    self.left = 0
                    break
                out.append(byte)
                self.left -= 1
                continue
            # A run of plain bytes up to the next backslash, at most what is left: one copy.
            end = min(n, i + self.left)
            slash = data.find(b"\\", i, end)
            stop = end if slash < 0 else slash
            out += data[i:stop]
            self.left -= stop - i
            i = stop
            if slash >= 0:
                self._backslash = True
                i += 1
        self.received += i
        self._append(bytes(out), now)
        self._done = self.left == 0
        return data[i:]

    def _append(self, data: bytes, now: float) -> None:
        if data:
            if self._timed:  # (SEND and SENDEX hand out every byte at once: no interval to keep)
                if self._arrivals and self._arrivals[-1][1] == now:
                    self._arrivals[-1][0] += len(data)
                else:
                    self._arrivals.append([len(data), now])
            self._buf += data
            self.taken += len(data)

    def _consume(self, size: int) -> bytes:
        """The first ``size`` buffered bytes, removed with their arrival times."""
        if size == len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
        else:
            out = bytes(self._buf[:size])
            del self._buf[:size]
        if not self._timed:
            return out
        while size:
            run = self._arrivals[0]
            n = min(size, run[0])
            run[0] -= n
            size -= n
            self.last_arrival = run[1]
            if not run[0]:
                self._arrivals.popleft()
        return out

    # -- output ------------------------------------------------------------------

    def next_chunk(self, now: float, limit: int | None = None) -> bytes | Escape | None:
        """Payload ready to go (at most ``limit`` bytes), Escape, or None."""
        if self._plus and now >= self._plus_at + GUARD:
            self._settle()
        if self._escape_due:
            self._escape_due = False
            return Escape()
        if not self._buf or limit == 0 or self._escaped:  # an escaped stream's rest is leftover()'s
            return None
        streaming = self._timed
        ready = (
            not streaming
            or self._done
            or len(self._buf) >= self.chunk
            or now >= self._arrivals[0][1] + self.interval
        )
        if not ready:
            return None
        size = len(self._buf)
        if streaming and not self._done and size >= self.chunk:
            # Whole chunks go now; a shorter tail waits for the interval.
            size -= size % self.chunk
        if limit is not None:
            size = min(size, limit)
        return self._consume(size)

    def deadline(self, room: bool = True) -> float | None:
        """When next_chunk() may have something new without more input.

        ``room``: False while the owner can take no payload (a full ring): then
        only a +++ can come (the interval of bytes that cannot go is no reason
        to look again: past, it would call for a look at once, again and again)."""
        times = []
        if self._plus:
            times.append(self._plus_at + GUARD)
        if self._buf and self._timed and room and not self._escaped:
            times.append(self._arrivals[0][1] + self.interval)
        return min(times) if times else None

    @property
    def complete(self) -> bool:
        """Every byte of a finite phase was taken and handed out."""
        return self._done and not self._buf and not self._plus
