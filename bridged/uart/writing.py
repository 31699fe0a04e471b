"""Writing the UART output's batches to the port (a part of ``uart.output.Output``).

Theory of operation.  ``_pump`` writes what ``Output`` joined into a batch
(``_next_batch``) until the port takes no more, then waits for the fd to be
writable (or, on a real UART, for CTS); once all is written it eases
back-pressure, holds unsolicited items for their gap after a final result
and tells the waiters.

With ``[uart] pace`` on a pty, a `Pacer` (bridged.uart.pacer) sets how
much of the queue may go at a time: a slice, then one timer until the line
has room for the next (the pending write waits, as in a UART's FIFO).
Without it nothing of this runs: no pacer, no per-write cost.

A write that fails (EIO: the serial device went away) suspends the output
and calls ``on_failed``: nothing is lost that the port had not taken, and
``resume`` writes it, in order, to the reopened port.  What the kernel had
taken is gone with the device.
"""

from __future__ import annotations

import math
import os

from bridged.uart.pacer import CATCH_UP

__all__ = ["MAX_WRITE", "TICK", "PortWriting"]

MAX_WRITE = 65536
# uvloop's clock and timers tick in whole milliseconds: a timer set for less
# than 1 ms fires at once, and a hold that ends within half a tick has ended.
TICK = 0.001


class PortWriting:
    """Batches to the port; a part of ``bridged.uart.output.Output`` (uses its attributes)."""

    def _check_low(self) -> None:
        if self.backlogged and self.buffered <= self.low:
            self.backlogged = False
            self.loop.call_soon(self.on_eased)  # it may take input, which queues output

    def _pump(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._scheduled = False
        if self.suspended:
            return
        while self._pending or ((self._replies or self._urcs) and self._next_batch(self.loop.time())):
            chunk = self._pending[:MAX_WRITE]
            if self.pacer is not None:
                # The timer may fire a hair before its deadline (uvloop ticks whole ms).
                now = max(self.loop.time(), self._woken_at)
                chunk = chunk[:self.pacer.allowance(now)]
                if not chunk:
                    self._wait_line()
                    return
            try:
                n = os.write(self.fd, chunk)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                if self.on_failed is None:
                    raise
                self.suspend()
                self.on_failed(exc)
                return
            self.buffered -= n
            self.written += n
            if self.tap is not None and n:
                self.tap.sent(self._pending[:n])
            self._pending = self._pending[n:]
            if self.pacer is not None:
                # A full port is the MCU not reading (CTS low): idle line time, not made up.
                self.pacer.charge(n, now, CATCH_UP if self._pending and n == len(chunk) else 0.0)
            if self._pending:
                self._check_low()
                if self.pacer is not None and n == len(chunk):  # the line, not the port, holds the rest
                    self._wait_line()
                else:
                    self._arm_writer()
                return
            if self._pending_final:
                self._final_at = self.loop.time()
        self._all_written()

    def _all_written(self) -> None:
        """Nothing is left to write now: ease back-pressure, hold URCs for their gap, tell the waiters."""
        if self.backlogged:
            self._check_low()
        if self._writer_armed:
            self._disarm_writer()
        if self._urcs:  # held for the gap after a final result
            wait = self._urc_due(self._urcs[0][2], False, self.loop.time())
            # Whole ticks: a shorter timer would fire at once and spin the loop.
            self._timer = self.loop.call_later(max(math.ceil(wait / TICK - 0.5), 1) * TICK, self._pump)
            return
        if self._when_empty:  # deferred: a writer must never be re-entered by the callbacks it causes
            callbacks, self._when_empty = self._when_empty, []
            for callback in callbacks:
                self.loop.call_soon(callback)
        # Called at once (it runs after every write): it may only queue more
        # output, and queuing never writes from inside _pump.
        self.on_drained()

    def _wait_line(self) -> None:
        """Write the pending bytes once the line has room for a slice of them: one timer."""
        self._disarm_writer()
        deadline = self.pacer.deadline(len(self._pending))
        self._scheduled = True  # nothing queued meanwhile needs a pump of its own
        self._timer = self.loop.call_at(deadline, self._line_free, deadline)

    def _line_free(self, deadline: float) -> None:
        self._woken_at = deadline
        self._pump()

    def suspend(self) -> None:
        """Write nothing until ``resume`` (the port is gone); keep queuing."""
        self.suspended = True
        self._disarm_writer()

    def resume(self, fd: int) -> None:
        """Write what is queued, in order, to ``fd`` (the port reopened)."""
        self.fd = fd
        self.suspended = False
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._pump)

    def _arm_writer(self) -> None:
        if not self._writer_armed:
            self.loop.add_writer(self.fd, self._pump)
            self._writer_armed = True

    def _disarm_writer(self) -> None:
        if self._writer_armed:
            self.loop.remove_writer(self.fd)
            self._writer_armed = False

    def close(self) -> None:
        self._disarm_writer()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._timer is not None:
            self._timer.cancel()
