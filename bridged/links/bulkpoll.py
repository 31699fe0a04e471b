"""A link worker's uplink polled while the MCU streams bulk payloads (a part of ``Worker``, through ``Batching``).

Theory of operation.  Uploading as fast as it can (AT+CIPSEND=8192 after AT+CIPSEND=8192, a
passthrough or AT+CIPSENDL stream), the MCU's payloads reach the uplink ring a fraction of a
millisecond apart, and each commit rang the ring's data doorbell: one wake-up of the worker per
send, the largest cost of moving the bytes on (``bench/RESULTS.md``).  Read batching's polling
(``links.batching``, "The uplink on the ticks") covers only a link streaming both ways at UART
pace; this covers the bulk upload, with a downlink or without one.

Once ``_BULK_STREAK`` sends running each took a bulk commit (``POLLED_BULK`` bytes or more) that
came within a bulk tick of the commit before it (``_BULK_START``; the front's commit clock,
``Ring.last_commit``: the MCU's pace, not our wake-ups'), the worker turns the ring's polling flag
on (``Ring.poll_on_tick``, quiet = one bulk tick) and arms a one-shot tick a bulk tick on (the
batch ticker's timerfd, free while read batching is off).  The front then rings only for a commit
that leaves the ring over half full (the worker wakes once per half ring at full speed: ~4-5
sends of 8 KiB in the default 64 KiB ring), one under POLLED_BULK bytes (a request or keystrokes
go at once), and one that comes a bulk tick or more after the commit before it (a request after
quiet, or a slower stream: at once, as without polling).  The tick sends what the ring holds;
every send pushes it to a bulk tick after the send (re-armed only once it is due within half a
tick: a timerfd_settime per two wake-ups at most, where a periodic tick would cost a wake-up per
period), so a payload committed unrung waits at most one bulk tick (``bulk_period``: 4 ms, or the
read window if shorter) before it goes to the socket.  SEND OK went on ring admission
(DESIGN.md): the latency is the network's, never loss or reordering (one ring, one consumer).

A tick that finds the ring empty with the front's last commit a bulk tick old or older (the MCU
stopped) turns the flag off: within three bulk ticks of the stream's last commit (sent up to a
tick after it; the next tick may find it younger than a tick, the one after cannot).  Its next
commit rings anyway (it comes after quiet); the flag and the write index cross without a fence
(``Ring.poll_on_tick``), so, as batching does, the worker looks at the ring once more a tick
later.  Read batching starting meanwhile takes over (its periodic ticks look at the ring while
the flag is on, its rules end polling); a dropped socket or a fault's Shaper ends it.  A UDP
link's payloads are records, one datagram each, committed whole (header and payload in one
commit): polled records go in order, one ``sendto`` each, boundaries exact.  ``read_window_ms
= 0`` (no ticker) turns this off too: every payload rings and goes at once.

While polling, a TCP (or SSL) link whose AT+CIPTCPOPT left Nagle on sends with TCP_NODELAY
(``_bulk_nodelay``; its own setting back when polling ends): a tick's send is a batch already,
and Nagle held the next tick's behind the peer's delayed ACK, about 40 ms on loopback (48-72 of
400 sends around the bulk tick that late, 0-21 with polling off: tests/integration/
test_bulk_polling_edges_daemon).
"""

from __future__ import annotations

import socket
import time

from bridged.ipc.doorbells import POLLED_BULK

__all__ = ["BulkPolling", "bulk_period", "POLLED_BULK"]

# The longest a bulk payload waits for the socket (chosen by measurement: bench/RESULTS.md).
_BULK_TICK = 0.004
# Polling starts after this many sends running whose commit came within _BULK_START of the one
# before (a stream, not a request and its continuation), ...
_BULK_STREAK = 2
# ... a bulk tick (as a fraction of it): a tick then sends one payload or more, and the
# worker wakes no more often than without polling (less once several come per tick).
_BULK_START = 1.0


def bulk_period(read_window_ms: int) -> float:
    """The bulk tick in seconds: ``_BULK_TICK``, the read window if shorter, 0 (off) with none."""
    return min(_BULK_TICK, read_window_ms / 1000) if read_window_ms > 0 else 0.0


class BulkPolling:
    """The uplink ring polled during a bulk upload; a part of ``Worker`` (uses its attributes)."""

    def _init_bulk(self, read_window_ms: int) -> None:
        self._bulk_period = bulk_period(read_window_ms)
        self._bulk_start_ns = round(self._bulk_period * _BULK_START * 1e9)  # 0: never starts
        self._bulk_quiet_ns = round(self._bulk_period * 1e9)
        self._bulk = False  # the uplink's polling flag is on for a bulk upload (not batching's)
        self._bulk_streak = 0  # sends running of close bulk commits
        self._bulk_due = 0.0  # when the armed one-shot tick fires (time.monotonic; 0: fired)

    def _bulk_sent(self, sent: int, committed: int) -> None:
        """A send with read batching off (``Uplink``): start polling after a streak of close
        bulk commits; while polling, keep the tick at most a bulk tick after this send."""
        if self._bulk:
            if self._bulk_due - time.monotonic() < 0.5 * self._bulk_period:
                self._arm_bulk_tick()
        elif committed == self._last_commit:
            pass  # the rest of the same commits (a send the socket cut short, TLS records)
        elif sent >= POLLED_BULK and 0 <= committed - self._last_commit < self._bulk_start_ns:
            # (0 <=: a stamp behind the last one, Ring.commit's ``at``, is no gap; with no ticker
            # _bulk_start_ns is 0 and a negative "gap" would start polling with nothing to tick)
            self._bulk_streak += 1
            if self._bulk_streak >= _BULK_STREAK and self.shaper is None and self.sock is not None:
                self._bulk = self._polling = True
                self.uplink.poll_on_tick(self._bulk_period)
                self._bulk_nodelay(True)
                self._arm_bulk_tick()
        else:
            self._bulk_streak = 0

    def _arm_bulk_tick(self) -> None:
        due = time.monotonic() + self._bulk_period
        try:
            self._ticker.arm(due, 0)
        except OSError as exc:
            self._no_batching(exc)  # polling ends there, the look owed goes on a timer
            return
        self._bulk_due = due

    def _on_bulk_tick(self) -> None:
        """The one-shot tick while read batching is off: a bulk upload's look, or the look owed
        once a polling flag went off."""
        if not (self._bulk or self._look_owed):
            return
        self._look_owed = False
        self._bulk_due = 0.0
        sent = self._look_uplink()  # a send re-arms the tick (_bulk_sent)
        if not self._bulk:
            return
        if not sent and time.monotonic_ns() - self.uplink.last_commit() >= self._bulk_quiet_ns:
            self._end_bulk()  # the MCU stopped: its next send rings
        elif not self._bulk_due:
            self._arm_bulk_tick()  # nothing went (a full socket waits for writability)

    def _end_bulk(self) -> None:
        """Doorbells again, and a look a tick later for one the front skipped meanwhile."""
        if not self._bulk:
            return
        self._unpoll_uplink()  # clears _bulk and _polling, owes the look
        self._bulk_streak = 0
        if self._batch_tick is None and self._ticker is not None:
            self._arm_bulk_tick()

    def _bulk_nodelay(self, on: bool) -> None:
        """TCP_NODELAY while polling, on a link whose AT+CIPTCPOPT left Nagle on: a tick's send
        is already a batch, and Nagle would hold the next one behind the peer's delayed ACK (its
        ACK policy tuned to the batches' larger segments): ~40 ms, ten ticks, on loopback."""
        if self.options.nodelay or self.datagram or self.sock is None:
            return
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if on else 0)
        except OSError:
            pass  # the socket failed: its next send says why
