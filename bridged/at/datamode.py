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
silence; it is held back until the silence after it decides.  Holding back
at most three bytes for 20 ms is the only delay the rule adds.

AT+CIPSENDEX escapes (spec): ``\\0`` ends the data (the two bytes are not
sent), ``\\<x>`` is ``<x>`` for any other x (so ``\\\\0`` sends ``\\0``).  A
backslash that ends a read waits for the next byte.  <length> counts the bytes
sent, after unescaping.

SENDL and PASSTHROUGH forward while data still arrives: a chunk goes out as
soon as ``chunk`` bytes are buffered, a shorter rest once ``interval`` seconds
passed since its first byte (AT+TRANSINTVL; AT+CIPSENDLCFG's transmit size).
SEND and SENDEX hand over every byte at once: the owner gathers them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["DataKind", "DataMachine", "Escape", "GUARD"]

GUARD = 0.020  # seconds: the +++ guard time


class DataKind(enum.Enum):
    SEND = enum.auto()
    SENDEX = enum.auto()
    SENDL = enum.auto()
    PASSTHROUGH = enum.auto()


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
        self._first_at: float | None = None  # arrival of the oldest buffered byte
        self._last_rx = now
        self._plus = 0  # '+' bytes held back as a +++ candidate
        self._plus_at = 0.0
        self._backslash = False  # SENDEX: a '\\' waiting for its next byte
        self._done = False
        self._escaped = False

    @property
    def done(self) -> bool:
        """The phase ended (complete or escaped); no more bytes are taken."""
        return self._done or self._escaped

    @property
    def buffered(self) -> int:
        return len(self._buf)

    # -- input -------------------------------------------------------------------

    def feed(self, data: bytes, now: float) -> bytes:
        """Take the bytes that belong to this phase; return the rest (command input)."""
        if self.done or not data:
            return data
        gap = now - self._last_rx
        self._last_rx = now
        if self._plus_candidate(data, gap, now):
            return b""
        return self._take(data, now)

    def _plus_candidate(self, data: bytes, gap: float, now: float) -> bool:
        only_plus = data.count(b"+") == len(data)
        if self._plus:
            if gap < GUARD and only_plus and self._plus + len(data) <= 3:
                self._plus += len(data)
                self._plus_at = now
                return True
            self._release_plus(now)
            return False
        room = self.left < 0 or self.left >= 3  # a +++ must fit in what is left
        if gap >= GUARD and only_plus and len(data) <= 3 and room:
            self._plus, self._plus_at = len(data), now
            return True
        return False

    def _release_plus(self, now: float) -> None:
        """A candidate that turned out to be data."""
        plus, self._plus = self._plus, 0
        rest = self._take(b"+" * plus, now)
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
        i = 0
        while i < len(data) and self.left > 0:
            byte = data[i]
            i += 1
            if self._backslash:
                self._backslash = False
                if byte == 0x30:  # "\0": the end
                    self.left = 0
                    break
                out.append(byte)
                self.left -= 1
            elif byte == 0x5C:
                self._backslash = True
            else:
                out.append(byte)
                self.left -= 1
        self.received += i
        self._append(bytes(out), now)
        self._done = self.left == 0
        return data[i:]

    def _append(self, data: bytes, now: float) -> None:
        if data:
            if not self._buf:
                self._first_at = now
            self._buf += data
            self.taken += len(data)

    # -- output ------------------------------------------------------------------

    def next_chunk(self, now: float, limit: int | None = None) -> bytes | Escape | None:
        """Payload ready to go (at most ``limit`` bytes), Escape, or None."""
        if self._plus and now - self._plus_at >= GUARD:
            if self._plus == 3:
                self._plus = 0
                self._escaped = True
                self._buf.clear()  # an escape ends the phase; what is unsent is dropped
                return Escape()
            self._release_plus(now)
        if not self._buf or limit == 0:
            return None
        streaming = self.kind in (DataKind.SENDL, DataKind.PASSTHROUGH)
        ready = (
            not streaming
            or self._done
            or len(self._buf) >= self.chunk
            or now - self._first_at >= self.interval
        )
        if not ready:
            return None
        size = len(self._buf) if not streaming else min(len(self._buf), self.chunk)
        if limit is not None:
            size = min(size, limit)
        out = bytes(self._buf[:size])
        del self._buf[:size]
        self._first_at = now if self._buf else None
        return out

    def deadline(self) -> float | None:
        """When next_chunk() may have something new without more input."""
        times = []
        if self._plus:
            times.append(self._plus_at + GUARD)
        if self._buf and self._first_at is not None and self.kind in (DataKind.SENDL, DataKind.PASSTHROUGH):
            times.append(self._first_at + self.interval)
        return min(times) if times else None

    @property
    def complete(self) -> bool:
        """Every byte of a finite phase was taken and handed out."""
        return self._done and not self._buf and not self._plus
