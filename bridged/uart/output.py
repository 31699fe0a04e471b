"""Everything written to the UART goes through here.

Two kinds of item: parts of a command's answer (``reply``) and unsolicited
messages (``urc``: +IPD, CLOSED, WIFI ...).  Host drivers read the UART in
chunks and some discard whatever follows a final result (OK, SEND OK) in the
same read; on a real ESP32, Wi-Fi latency keeps the next unsolicited message
apart from it.  So:

* an unsolicited item that would directly follow a final result waits until
  ``gap`` seconds after that result went out, but never longer than ``gap``
  in all (so a busy command stream cannot starve it); the ones queued behind
  it go in the same write (they follow it, not the result: one write and no
  timer of their own for a batch of +IPD drained over a few milliseconds);
* replies never wait behind such a held message: they go out at once, in
  their order; unsolicited items keep their own order (data before CLOSED);
* an unsolicited item may be a function that makes its bytes at the moment
  they join a write (a passive-mode notice announces what is unread *then*,
  so a reply that overtook it is already counted); b"" drops it.  It runs
  inside the writer, so it must not queue output itself.

Everything due in one loop iteration goes out in one write, and a reply may
*linger* a moment for the next one (``Recv <n> bytes`` waits up to a few ms
for its SEND OK): each write to a tty costs a syscall and a wake-up of the
reader, and the host reads both at once anyway.  Writes are
non-blocking; what the port does not take stays queued and the loop waits
for the fd to be writable (or, on a real UART, for CTS).  The owner reads
``buffered`` to stop producing (downlink back-pressure) and gets
``on_drained`` when everything is out.  Above ``high`` bytes queued the
output is ``backlogged`` until it is down to ``low`` again, then ``on_eased``
is called (soon, not from inside the writer): the owner stops taking input
meanwhile, as ESP-AT's AT task blocks on a full UART.

Writing the batches to the port (paced or not, and what a port that goes
away does to the output): ``uart.writing``.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import Callable, Union

import structlog

from bridged.at.format import FINALS
from bridged.uart.pacer import Pacer
from bridged.uart.writing import MAX_WRITE, TICK, PortWriting

__all__ = ["Output"]

log = structlog.get_logger()

Urc = Union[bytes, Callable[[], bytes]]  # the bytes, or a function making them at write time


class Output(PortWriting):
    tap = None  # the AT transcript while it is on (bridged.uart.transcript)
    mangle = None  # injected line faults (bridged.faults.uart), only while some are enabled

    def __init__(self, fd: int, gap: float, on_drained: Callable[[], None],
                 water: tuple[int, int] = (65536, 32768),
                 on_eased: Callable[[], None] = lambda: None,
                 on_failed: Callable[[OSError], None] | None = None) -> None:
        self.fd = fd
        self.gap = gap
        self.on_drained = on_drained
        self.high, self.low = water
        self.on_eased = on_eased
        self.backlogged = False  # above high, not yet down to low
        self.on_failed = on_failed
        self.suspended = False  # the port is gone: queue, write nothing
        self.loop = asyncio.get_running_loop()
        self._seq = 0  # each queued item's number: the older item goes first
        # Each item with its size, counted once as it is queued (-1: a function, sized when made).
        self._replies: deque[tuple[int, bytes, bool, int]] = deque()  # seq, data, final, size
        self._urcs: deque[tuple[int, Urc, float, int]] = deque()  # seq, data, queued at, size
        self.buffered = 0  # bytes queued, not yet written (read by the owner for back-pressure)
        self._final_at: float | None = None  # when the last final result went out
        self._timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None  # a lingering reply's deadline
        self._writer_armed = False
        self._scheduled = False
        self._pending = memoryview(b"")  # the batch being written
        self._pending_final = False  # ... ends with a final result
        self._when_empty: list[Callable[[], None]] = []
        self.written = 0
        self.batched = 0  # bytes joined into writes, before any injected fault: offsets in the stream
        self.pacer: Pacer | None = None  # [uart] pace: the line's rate (None: as fast as the port takes)
        self._woken_at = 0.0  # the line deadline the pacing timer last fired for

    def reply(self, data: bytes, linger: float = 0.0) -> None:
        """Queue part of an answer; with ``linger`` it may wait that many
        seconds for more output to share its write (whatever comes next
        takes it along, in order)."""
        if not data:
            return
        size = len(data)
        self._seq += 1
        self._replies.append((self._seq, data, data in FINALS, size))  # (format.is_final, inline)
        self.buffered += size
        if self.buffered > self.high:
            self.backlogged = True
        if self._writer_armed or self._scheduled:
            return
        if linger and self._linger is None:
            self._linger = self.loop.call_later(linger, self._pump)
        else:  # (output behind a lingering reply takes it along at once)
            self._scheduled = True
            self.loop.call_soon(self._pump)

    def reply_now(self, data: bytes, final: bool = True) -> None:
        """A reply written at once when nothing is queued, held, paced or watched (a bulk
        upload's prompt, its Recv and SEND OK): the bytes and the order of ``reply`` and the
        pump's, without a callback's round trip.  ``final``: it ends with a final result."""
        if (self._replies or self._urcs or self._pending or self._scheduled or self._writer_armed
                or self.pacer is not None or self.mangle is not None or self.tap is not None or self.suspended):
            self._seq += 1
            self._replies.append((self._seq, data, final, len(data)))
            self._queued(len(data))
            return
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError:  # the pump meets it again and says so (on_failed)
            self._seq += 1
            self._replies.append((self._seq, data, final, len(data)))
            self._queued(len(data))
            return
        self.batched += len(data)  # as _next_batch counts a batch (the fault offsets rest on it)
        self.written += n
        if n < len(data):  # the port is full: the rest waits for it as the pump's would
            self._pending = memoryview(data)[n:]
            self._pending_final = final
            self._queued(len(data) - n, pump=False)
            self._arm_writer()
            return
        if final:
            self._final_at = self.loop.time()
        self._all_written()

    def _queued(self, size: int, pump: bool = True) -> None:
        self.buffered += size
        if self.buffered > self.high:
            self.backlogged = True
        if pump and not (self._writer_armed or self._scheduled):
            self._scheduled = True
            self.loop.call_soon(self._pump)

    def urc(self, data: Urc) -> None:
        """Queue an unsolicited message: bytes, or a function returning them
        when they are written (it counts as 0 bytes buffered until then)."""
        if not data:
            return
        size = -1 if callable(data) else len(data)
        self._seq += 1
        self._urcs.append((self._seq, data, self.loop.time(), size))
        if size > 0:
            self.buffered += size
        if self.buffered > self.high:  # (_queued, inline: one call less per +IPD)
            self.backlogged = True
        if not (self._writer_armed or self._scheduled):
            self._scheduled = True
            self.loop.call_soon(self._pump)

    def when_empty(self, callback: Callable[[], None]) -> None:
        """Call back once everything queued so far has been written."""
        if self._idle():
            self.loop.call_soon(callback)
        else:
            self._when_empty.append(callback)

    def discard(self) -> int:
        """Drop everything not written yet (a restarting chip loses its UART's queue).

        Returns:
            The bytes dropped.  ``when_empty`` callbacks and ``on_drained`` follow
            as after a write: the queue is empty.
        """
        dropped = self.buffered
        self._replies.clear()
        self._urcs.clear()
        self._pending = memoryview(b"")
        self.buffered = 0
        if self.pacer is not None:  # nothing waits for the line any more
            self.pacer.charge(0, self.loop.time())
        self._pump()
        return dropped

    def _idle(self) -> bool:
        return not (self._replies or self._urcs or self._pending)

    # -- choosing what goes next ---------------------------------------------------

    def _urc_due(self, queued_at: float, final_in_batch: bool, now: float) -> float:
        """Seconds until a held unsolicited item may go (<= 0: now)."""
        if self.gap <= 0:
            return 0.0
        if final_in_batch:
            since_final = 0.0  # the final goes out in this very write
        elif self._final_at is None:
            return 0.0
        else:
            since_final = now - self._final_at
        waited = now - queued_at
        return min(self.gap - since_final, self.gap - waited)

    def _next_batch(self, now: float) -> bool:
        """Join what may go now into one write; False when nothing may."""
        parts: list[bytes] = []
        size = 0
        final = final_in_batch = after_urc = False
        gap, half, final_at = self.gap, TICK / 2, self._final_at
        while size < MAX_WRITE:
            reply = self._replies[0] if self._replies else None
            urc = self._urcs[0] if self._urcs else None
            # The older item goes first; an unsolicited one once its gap is over
            # (`_urc_due` < half a tick, inline: this runs for every +IPD), or right
            # behind another one in this write: it follows no final result then.
            if (urc is not None and (reply is None or urc[0] < reply[0])
                    and (gap <= 0 or after_urc or gap - (now - urc[2]) < half
                         or gap - (0.0 if final_in_batch else gap if final_at is None else now - final_at) < half)):
                self._urcs.popleft()
                data, n = urc[1], urc[3]
                if n < 0:
                    data = _make(data)
                    n = len(data)
                    self.buffered += n
                    if not n:
                        continue  # nothing to say any more
                parts.append(data)
                final, after_urc = False, True
            elif reply is not None:
                self._replies.popleft()
                parts.append(reply[1])
                n, final = reply[3], reply[2]
                final_in_batch = final_in_batch or final
                after_urc = False
            else:
                break
            size += n
        if not parts:
            return False
        data = b"".join(parts)
        self.batched += len(data)
        if self.mangle is not None:  # bytes lost or corrupted on the line (bridged.faults)
            mangled = self.mangle(data)
            self.buffered -= len(data) - len(mangled)
            data = mangled
        self._pending = memoryview(data)
        self._pending_final = final
        return True


def _make(make: Callable[[], bytes]) -> bytes:
    """Run a message function as its message is written; b"" if it fails.

    A failure is our bug, never the host's; it costs that one message only:
    raised inside the writer, it would strand what the batch had gathered
    and leave nothing scheduled to write the rest.
    """
    try:
        data = make()
    except Exception:
        log.exception("urc_failed")
        return b""
    if not isinstance(data, bytes):
        log.error("urc_failed", why=f"made {type(data).__name__}, not bytes")
        return b""
    return data
