"""A virtual clock that lets bytes cross a pty no faster than a UART line.

Theory of operation.  A real UART moves one character every ``bits / baud``
seconds, where ``bits`` is the framing: 1 start bit, the data bits, a parity
bit if any, the stop bits (10 for 8N1, 11 for 8E1 or 8N2, 10.5 for 8N1.5).
A pty moves bytes as fast as they are written, so ``[uart] pace`` puts a
`Pacer` on each direction of it (bridged.uart.output writes, the front reads).

The pacer is the generic cell rate algorithm on a virtual clock: ``_line``
is when the line has sent everything charged so far (its "theoretical
arrival time").  It is computed from an anchor and a whole count of
characters since it, never by adding up intervals, so the long-run rate is
exact however late the timers fire and however many slices go by.  A byte
may go once it is due within ``lead`` seconds: the writer sends a slice,
sleeps until about ``lead / 2`` of line time is free again (`deadline`),
and keeps up through a timer up to ``lead / 2`` late.  A line left idle
keeps no credit beyond ``lead``: after silence at most one lead's worth of
bytes goes at once, as when a real UART's FIFO is filled.  A line with
bytes waiting is not idle: time lost to a late wake-up (a loaded machine)
is made up, as a real UART's bytes keep arriving while its CPU is busy.
The caller says how much may be made up when it charges: ``CATCH_UP`` when
bytes are known to wait, less when they may (a pty's kernel buffer refills
its reader's side from a worker thread, late on a loaded machine), none
when nothing waits.  Time the line is held by flow control (`hold_off`: the
reader stops for back-pressure, the MCU does not read) is idle time.

A new line speed (AT+UART_CUR) applies to bytes charged from then on; what
was charged keeps its times, as the bytes a real UART had already sent.

Sans I/O: the caller passes ``now`` (the event loop's clock) everywhere.
"""

from __future__ import annotations

__all__ = ["Pacer", "LEAD", "CATCH_UP", "char_bits2"]

LEAD = 0.006  # seconds a byte may go ahead of its line time: two slices of 3 ms (the loop ticks in ms)
CATCH_UP = 0.25  # seconds of line time a backlogged line may make up after a late wake-up
_EPS = 1e-3  # of a character: float rounding of ``now`` (~1e-11 s) must not cost one


def char_bits2(data_bits: int, stop_bits: int, parity: int) -> int:
    """Twice the bits one character takes on the line (ESP-AT's codes: stop 1 = 1, 2 = 1.5, 3 = 2;
    parity 0 none, 1 odd, 2 even); twice, so that 1.5 stop bits stay whole."""
    stop2 = {1: 2, 2: 3, 3: 4}[stop_bits]
    return 2 * (1 + data_bits + (1 if parity else 0)) + stop2


class Pacer:
    """One direction of a UART line: how many bytes may go now, and when it is worth trying again."""

    def __init__(self, baud: int, bits2: int, now: float, lead: float = LEAD) -> None:
        """A line at ``baud`` with ``bits2`` half-bits per character (see `char_bits2`)."""
        self._lead_asked = lead
        self._anchor = now  # the line time of the first character charged since then
        self._count = 0  # characters charged since the anchor
        self._credit = 0.0  # seconds of lateness the next charge may make up
        self.charged = 0  # bytes charged in all
        self._set(baud, bits2)

    def _set(self, baud: int, bits2: int) -> None:
        if baud <= 0 or bits2 <= 0:
            raise ValueError(f"no line at {baud} baud with {bits2 / 2} bits a character")
        self.baud = baud
        self.bits2 = bits2
        self._char = bits2 / (2 * baud)  # seconds per character
        # At least one character may always go: at 80 baud one takes 125 ms.
        self.lead = max(self._lead_asked, self._char)
        self._slice = max(1, round(self.lead / 2 / self._char))

    def _line(self) -> float:
        """When the line is done with every character charged (exact: anchor + count)."""
        return self._anchor + self._count * self.bits2 / (2 * self.baud)

    def set_line(self, baud: int, bits2: int, now: float) -> None:
        """A new speed or framing from now on (characters charged keep their times)."""
        line = max(self._line(), now)
        self._anchor, self._count = line, 0
        self._set(baud, bits2)

    def _start(self, now: float) -> float:
        """Where the line stands at ``now``: behind ``now`` only for a backlogged
        line a late wake-up left behind (then that time is made up)."""
        line = self._line()
        return line if line >= now - self._credit else now  # else idle: no credit from the past

    def allowance(self, now: float) -> int:
        """How many bytes may go at ``now``."""
        return max(0, int((now + self.lead - self._start(now)) / self._char + _EPS))

    def charge(self, n: int, now: float, credit: float = 0.0) -> None:
        """``n`` bytes went at ``now`` (no more than `allowance` said).

        Args:
            credit: seconds of line time the next call may make up if it comes
                late: `CATCH_UP` while bytes wait for the line, 0 when none do.
        """
        start = self._start(now)
        if start != self._line():  # it was idle: it starts again from now
            self._anchor, self._count = start, 0
        self._count += n
        self.charged += n
        self._credit = credit

    def hold_off(self) -> None:
        """Flow control holds the line from now on: nothing waits for it, no credit builds."""
        self._credit = 0.0

    def deadline(self, pending: int) -> float:
        """When it is worth writing again with ``pending`` bytes waiting: once a
        slice (about lead / 2 of line time, all of them if fewer) may go."""
        want = min(max(pending, 1), self._slice)
        return self._line() + want * self._char - self.lead
