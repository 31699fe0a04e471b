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
        if not self._queue:
            self.loop.call_soon(callback)
        else:
            self._when_empty.append(callback)

    def _put(self, data: bytes, urc: bool) -> None:
        if not data:
            return
        self._queue.append((data, urc, (not urc) and is_final(data)))
        self._buffered += len(data)
        if not self._writer_armed and self._timer is None:
            self._pump()

    def _urc_wait(self) -> float:
        if self._final_at is None or self.gap <= 0:
            return 0.0
        return self._final_at + self.gap - self.loop.time()

    def _pump(self) -> None:
        self._timer = None
        while self._queue:
            data, urc, final = self._queue[0]
            if urc:
                wait = self._urc_wait()
                if wait > 0:
                    self._timer = self.loop.call_later(wait, self._pump)
                    return
            try:
                n = os.write(self.fd, data[:_MAX_WRITE])
            except BlockingIOError:
                n = 0
            if n < len(data):
                if n:
                    self._queue[0] = (memoryview(data)[n:], urc, final)
                    self._account(n, None)
                self._arm_writer()
                return
            self._queue.popleft()
            self._account(n, final)
        self._disarm_writer()
        # Deferred: a writer must never be re-entered by the callbacks it causes.
        callbacks, self._when_empty = self._when_empty, []
        for callback in callbacks:
            self.loop.call_soon(callback)
        self.loop.call_soon(self.on_drained)

    def _account(self, n: int, final: bool | None) -> None:
        self._buffered -= n
        self.written += n
        if final is not None:
            self._final_at = self.loop.time() if final else None

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
