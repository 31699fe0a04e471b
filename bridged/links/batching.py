"""A link worker's read batching (a part of ``Worker``, through ``Downlink``).

Theory of operation.  A peer streaming at UART rates (the UART, not the network, sets the pace
on a gateway) sends a segment every few ms; reading each as it lands
costs the worker and the front a wake-up apiece.  Once two reads come
within one period, the socket's SO_RCVLOWAT rises to one +IPD chunk, so
the kernel wakes us only when a whole chunk has gathered, and a tick
reads whatever is there at the period's end (a periodic timerfd armed once
while batching goes on, ``links.ticker``: cheaper than a ``call_at`` per
tick).  The ticks of all workers fall on one grid (the monotonic clock is
shared), so the front wakes once for all links.  Never held back: a lone piece after a quiet spell
(a whole period with nothing read ends batching), small pieces (interactive
traffic), and the answer to what the MCU sent (sending ends batching,
and none starts until the MCU has been quiet for a few periods).  The
peer's FIN and errors wake us regardless of SO_RCVLOWAT.

Both ways at once.  While the MCU streams too (its sends come within
BOTH_GAP periods of each other) and the peer streams on its own (two of
its pieces came with no send of the MCU's between them, in two periods
running: it is not answering each send), batching starts as well, and the
MCU's steady sends do not end it: the peer's pieces are read on the
window's ticks, shared with the other links.  A send after BOTH_GAP
periods of quiet ends it as before (a request: its answer is read at once),
and so does a whole period with nothing read.  Timing cannot tell a peer
answering each request in several pieces (>= _STREAMING apart) from one
streaming on its own: with requests under BOTH_GAP periods apart, such an
answer's pieces wait for the tick too (at most a period).

The uplink on the ticks.  While batching goes on both ways, the worker would
still wake once per payload of the MCU's (the uplink ring's doorbell) and once
per tick: twice a period at line rate.  So a send while batching goes on (a
steady stream, not a request) turns the ring's polling flag on
(``Ring.poll_on_tick``): the front commits without ringing, and each tick
sends what the ring holds before it reads.  A payload waits at most a period
for the socket (SEND OK went on admission, so the MCU is not slowed); a commit
that leaves the ring more than half full still rings (a fast stream is not
held to a ring per period), and so does one BOTH_GAP periods or more after the
commit before it: a request, which goes at once and ends batching (its answer
is read at once).  That gap is the MCU's, between the front's commits
(``Ring.last_commit``), never between the ticks that sent them: a tick sends a
payload up to a period after it came, which would make a request after two
windows of quiet look like a steady send.  A small commit (under POLLED_BULK
bytes: a request or keystrokes within the stream) rings too: held to a tick,
it would wait up to a period and its answer, coming just after that tick, a
whole period more.  A tick that finds the ring empty (the MCU was quiet a
while) turns the flag off, as does the end of batching.  The flag and the
write index cross without a fence (a store, then a load, each side), so the
front may skip its doorbell just as the flag goes off: after turning it off
the worker looks at the ring once more a period later (the next tick, or a
one-shot tick once batching has ended), so a skipped doorbell costs at most a
period.  The peer's FIN sends what the ring holds before the link ends, as a
doorbell would have (polling or not: the doorbell may come after it); over TLS
before the read that finds it (``_on_readable``): a FIN with no close_notify
fails the session there, and nothing can be sent after it.
"""

from __future__ import annotations

import math
import socket
import time

import structlog

from bridged.links.bulkpoll import BulkPolling
from bridged.links.connecting import failure_reason
from bridged.links.ticker import Ticker

__all__ = ["BOTH_GAP", "Batching", "wants_batching", "streams_both_ways", "both_steady", "next_tick"]

log = structlog.get_logger()

# Read batching starts only for pieces at least this big (bulk, not keystrokes)...
_BATCH_PIECE = 512
# ... and only once the MCU has sent nothing for this many periods (the peer
# may be answering it: an answer is read at once, and a link busy both ways
# would start and stop batching all the time).
_BATCH_QUIET = 4
# The MCU streams while its sends come within this many periods of each other.
BOTH_GAP = 2
# Polling the uplink on the ticks stops once the MCU has sent nothing for this many periods:
# over one, as a stream whose cadence drifts against the grid leaves a tick empty now and
# then (a send's time is its tick's: +-a period).  (A request rings anyway: poll_on_tick's quiet.)
_UNPOLL = 1.25
# A batch's next tick is at least this far off: uvloop's clock ticks in
# whole milliseconds, and a timer due sooner would fire at once.
_TICK_MARGIN = 0.001


def wants_batching(since: float, quiet: float, period: float) -> bool:
    """Whether a wake-up that read at least a batching piece starts read batching.

    Args:
        since: seconds since the read before this one (two within a period: a stream).
        quiet: seconds since the MCU's data last went to the socket (more than
            a few periods: the peer is not answering it).
        period: read batching's period (0: off).
    """
    return since < period and quiet > _BATCH_QUIET * period


def streams_both_ways(since: float, quiet: float, unprompted: float, period: float) -> bool:
    """Whether a wake-up that read an unprompted batching piece (no send of the
    MCU's since the peer's piece before) starts read batching while the MCU
    streams too.

    Args:
        since: seconds since the read before this one (within a period: a stream).
        quiet: seconds since the MCU's data last went to the socket (within
            BOTH_GAP periods: the MCU streams).
        unprompted: seconds since the unprompted read before this one (within
            BOTH_GAP periods: the peer has streamed on its own a while).
        period: read batching's period (0: off).
    """
    return since < period and quiet < BOTH_GAP * period and unprompted < BOTH_GAP * period


def both_steady(gap: float, period: float) -> bool:
    """Whether a send ``gap`` seconds after the MCU's last one continues its
    stream (read batching goes on) rather than asking something (it ends)."""
    return gap < BOTH_GAP * period


def next_tick(now: float, period: float) -> float:
    """When read batching next reads: the next multiple of ``period`` at least
    _TICK_MARGIN after ``now`` (one grid for all workers: the clock is shared)."""
    return (math.floor((now + _TICK_MARGIN) / period) + 1) * period


class Batching(BulkPolling):
    """Read batching; a part of ``bridged.links.worker.Worker`` (uses its attributes)."""

    def _can_batch(self) -> bool:
        # Passive mode keeps its data here anyway; datagrams have no low-water mark.
        return (self.batch_period > 0 and not self.datagram and not self.recv_window
                and self.sock is not None and self._gate.is_open and self.shaper is None)

    def _init_batching(self, read_window_ms: int) -> None:
        self.batch_period = read_window_ms / 1000  # 0: read every piece as it arrives
        self._request_gap = BOTH_GAP * read_window_ms * 1_000_000  # ns: a send this long after the last asks
        self._ticker: Ticker | None = None  # created in run(), on the running loop
        self._batch_tick: Ticker | None = None  # the ticker, while read batching is on
        self._lowat_raised = False  # the socket's SO_RCVLOWAT is one +IPD chunk
        self._polling = False  # the uplink ring's polling flag is on: the front rings no doorbell
        self._look_owed = False  # polling went off: one more look at the uplink ring, a tick later
        self._init_bulk(read_window_ms)  # the uplink polled during a bulk upload, on the same ticker

    def _start_ticker(self) -> None:
        """The ticks' timerfd, for the worker's life (``Worker._start``)."""
        if self.batch_period <= 0:
            return
        try:
            self._ticker = Ticker(self.loop, self._on_batch_tick)
        except OSError as exc:
            self._no_batching(exc)

    def _start_batching(self) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self.ipd_chunk)
            self._lowat_raised = True
            # The ticks go on, a period apart, until _stop_batching.
            self._ticker.arm(next_tick(time.monotonic(), self.batch_period), self.batch_period)
        except OSError as exc:
            self._no_batching(exc)
            self._stop_batching()  # no tick would read below a raised low-water mark
            return
        self._batch_tick = self._ticker

    def _no_batching(self, exc: OSError) -> None:
        """A socket or timerfd call read batching needs failed: off for the
        worker's life (every piece read as it arrives), the ticker closed
        (an owed look at the uplink on a timer instead)."""
        log.warning("read_window_unavailable", reason=failure_reason(exc))
        if self._polling:
            self._unpoll_uplink()
        if self._look_owed:
            self._look_owed = False
            self.loop.call_later(self.batch_period, self._look_uplink)
        self.batch_period = self._bulk_period = 0
        self._bulk_start_ns = 0
        self._batch_tick = None
        if self._ticker is not None:
            self._ticker.close()
            self._ticker = None

    def _on_batch_tick(self) -> None:
        if self._batch_tick is None:  # stopped since, or never on: a bulk upload's tick, a look owed
            self._on_bulk_tick()
            return
        now = self.loop.time()
        if self._polling or self._look_owed:  # the MCU's payloads first (no doorbell rang for them)
            self._look_owed = False
            if not self._look_uplink() and self._polling and now - self._last_send >= _UNPOLL * self.batch_period:
                self._unpoll_uplink()  # the MCU went quiet: its next send rings (a request goes at once)
        if not self._can_batch():
            self._stop_batching()
            return
        # One recv takes all the kernel has (up to a record): a short read
        # means the socket is empty, so no EAGAIN round trip.  Its doorbells
        # are not held: one record rings once anyway (a tick that finds more
        # than a record's worth, rare below SO_RCVLOWAT, rings per record).
        got = self._read_plain(False)
        if got:
            self._last_read = now
        # Only a whole period with nothing read ends it: the first tick may come
        # a millisecond after the read that started it, before the next piece.
        # (A read that ends it, a full ring or the socket's end, stops it itself.)
        if not got and now - self._last_read >= self.batch_period:
            self._stop_batching()

    def _stop_batching(self) -> None:
        """Back to reading every piece at once (the invariant: a raised
        low-water mark always has a tick armed that will read below it)."""
        if self._batch_tick is not None:
            self._batch_tick = None
            if self._polling:
                self._unpoll_uplink()
            try:
                if self._look_owed:  # one tick more, a period on, for a doorbell the front skipped
                    self._ticker.arm(time.monotonic() + self.batch_period, 0)
                else:
                    self._ticker.disarm()
            except OSError as exc:  # it may tick on: closed, or the link could not end
                self._no_batching(exc)
        if self._lowat_raised:
            self._lowat_raised = False
            if self.sock is not None:
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                except OSError:
                    pass  # the socket failed: its next read says why

    # -- the uplink on the ticks ----------------------------------------------------------

    def _poll_uplink(self) -> None:
        """A steady send while batching: the MCU's next payloads go on the ticks (but one
        after BOTH_GAP periods of quiet rings: a request, which goes and ends batching at once)."""
        self._polling = True
        self.uplink.poll_on_tick(BOTH_GAP * self.batch_period)

    def _unpoll_uplink(self) -> None:
        """Doorbells again; a look a tick later for one the front skipped meanwhile."""
        if self._bulk:
            self._bulk_nodelay(False)  # AT+CIPTCPOPT's Nagle back (links.bulkpoll)
        self._polling = self._bulk = False
        self.uplink.poll_on_tick(0)
        self._look_owed = True

    def _look_uplink(self) -> bool:
        """Send what the uplink ring holds, rung or not; True when something went.  What
        it finds unrung is a steady send (the front rings for one after a quiet spell);
        a request rung just before the tick is found a request all the same: its gap
        is taken between the front's commits, not the ticks."""
        if self.sock is None:
            return False
        up = self.stats["up"]
        self._uplink_ready()
        return self.stats["up"] != up

    def _flush_on_fin(self) -> None:
        """The peer's FIN: what the ring holds goes first (SEND OK said it was sent; sending
        after a FIN is allowed, a reset fails the send, as it would have): put there with no
        doorbell while we poll, or rung in the same turn of the loop as the FIN, handled first."""
        if self.sock is not None and self.uplink.available():
            self._look_owed = False
            self._pump_ring()
