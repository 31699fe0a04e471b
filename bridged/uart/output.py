"""Everything written to the UART goes through one queue, in order.

Two kinds of item: parts of a command's answer (``reply``) and unsolicited
messages (``urc``: +IPD, CLOSED, WIFI ...).  Host drivers read the UART in
chunks and some discard whatever follows a final result (OK, SEND OK) in the
same read; on a real ESP32, Wi-Fi latency keeps the next unsolicited message
apart from it.  So an unsolicited item that would directly follow a final
result waits until ``gap`` seconds after that result went out; nothing else is
ever delayed.

Writes are non-blocking; what the port does not take stays queued and the
loop waits for the fd to be writable (or, on a real UART, for CTS).  The
owner reads ``buffered`` to stop producing (downlink back-pressure) and gets
``on_drained`` when the queue empties.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import Callable

from bridged.at.format import is_final

__all__ = ["Output"]

_MAX_WRITE = 65536


class Output:
    def __init__(self, fd: int, gap: float, on_drained: Callable[[], None]) -> None:
        self.fd = fd
        self.gap = gap
        self.on_drained = on_drained
        self.loop = asyncio.get_running_loop()
        self._queue: deque[tuple[bytes | memoryview, bool, bool]] = deque()  # data, is_urc, is_final
        self._buffered = 0
        self._final_at: float | None = None  # when the last item written was a final result
        self._timer: asyncio.TimerHandle | None = None
        self._writer_armed = False
        self._scheduled = False
        self._pending = memoryview(b"")  # the batch being written
        self._pending_final = False  # ... ends with a final result
        self._when_empty: list[Callable[[], None]] = []
        self.written = 0

    @property
    def buffered(self) -> int:
        return self._buffered

    def reply(self, data: bytes) -> None:
        self._put(data, urc=False)

    def urc(self, data: bytes) -> None:
        self._put(data, urc=True)

    def when_empty(self, callback: Callable[[], None]) -> None:
        """Call back once everything queued so far has been written."""
        if not self._queue and not self._pending:
            self.loop.call_soon(callback)
        else:
            self._when_empty.append(callback)

    def _put(self, data: bytes, urc: bool) -> None:
        if not data:
            return
        self._queue.append((data, urc, (not urc) and is_final(data)))
        self._buffered += len(data)
        if not (self._writer_armed or self._timer is not None or self._scheduled):
            # Everything queued in this loop iteration goes out in one write.
            self._scheduled = True
            self.loop.call_soon(self._pump)

    def _urc_wait(self) -> float:
        if self._final_at is None or self.gap <= 0:
            return 0.0
        return self._final_at + self.gap - self.loop.time()

    def _next_batch(self) -> bool:
        """Join the queue's head into one write, up to a URC that must wait."""
        parts: list[bytes | memoryview] = []
        final = False
        while self._queue:
            data, urc, is_final_ = self._queue[0]
            if urc and (final or (not parts and self._urc_wait() > 0)):
                break  # the gap after a final result comes first
            self._queue.popleft()
            parts.append(data)
            final = is_final_ if not urc else False
            if sum(len(p) for p in parts) >= _MAX_WRITE:
                break
        if not parts:
            return False
        self._pending = memoryview(b"".join(parts))
        self._pending_final = final
        return True

    def _pump(self) -> None:
        self._timer = None
        self._scheduled = False
        while True:
            if not self._pending and not self._next_batch():
                break
            try:
                n = os.write(self.fd, self._pending[:_MAX_WRITE])
            except BlockingIOError:
                n = 0
            self._buffered -= n
            self.written += n
            self._pending = self._pending[n:]
            if self._pending:
                self._arm_writer()
                return
            self._final_at = self.loop.time() if self._pending_final else None
        if self._queue:  # a URC waits for the gap
            self._disarm_writer()
            self._timer = self.loop.call_later(max(self._urc_wait(), 0.0), self._pump)
            return
        self._disarm_writer()
        # Deferred: a writer must never be re-entered by the callbacks it causes.
        callbacks, self._when_empty = self._when_empty, []
        for callback in callbacks:
            self.loop.call_soon(callback)
        self.loop.call_soon(self.on_drained)

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
        if self._timer is not None:
            self._timer.cancel()
