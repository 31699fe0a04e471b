"""net_latency on the uplink: what the MCU sent reaches the peer later (a part of a ``Shaper``).

Theory of operation
-------------------
Without latency the uplink goes straight from the ring to the socket
(bridged.links.uplink).  While net_latency is configured or armed on a
connection, or the `Outbox` still holds something, the worker's uplink pump
hands over to the connection's Outbox instead: it takes what the ring holds,
stamps each piece with the time it is due (``ms`` plus or minus up to
``jitter_ms``, drawn from a seeded stream of its own, so the downlink's
draws do not move), and hands it to the socket when due.

Order: a piece is never due before the one ahead of it, so a stream is never
reordered, and datagrams neither (as on the downlink: reordering is
net_udp_reorder's job).  A host's Close with flush waits for the Outbox as it
waits for the ring (bridged.links.uplink's closing flush, bounded as before),
so the FIN follows the delayed data; a connection that ends otherwise drops
what the Outbox holds, as a socket's unsent buffer is dropped.

Taking bytes out of the ring changes nothing for the MCU: SEND OK was given
when they entered it, and ring plus Outbox plus socket buffer are the
"protocol stack" buffer.  Back-pressure stays one chain: the Outbox takes no
more while it holds half a ring (a window over the delay, as TCP's is), nor
while the socket is full, so the ring fills and the front stops admitting.
net_bandwidth meters what leaves the ring (its uplink bucket in the Shaper):
N bytes take N / bytes_per_s, then the delay.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog

from bridged.faults import FaultPlan
from bridged.ipc import records
from bridged.links.connecting import failure_reason

if TYPE_CHECKING:
    from bridged.links.faults import LinkFaults
    from bridged.links.worker import Worker

__all__ = ["Outbox", "latency_delay"]

log = structlog.get_logger()

_TLS_WRITE = 16384  # one TLS record per write; a retry repeats the same length (the piece is unchanged)
_TLS_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


def latency_delay(plan: FaultPlan, rng: random.Random, now: float) -> float:
    """Seconds net_latency adds to what moves now (0 outside its windows)."""
    latency = plan.condition("net_latency", now)
    if latency is None:
        return 0.0
    ms, jitter = latency["ms"], latency["jitter_ms"]
    if jitter:
        ms += rng.uniform(-jitter, jitter)
    return max(ms, 0.0) / 1000


class Meter(Protocol):
    """The uplink's bandwidth bucket (bridged.links.shaping.Shaper)."""

    def up_allowance(self, want: int, floor: int = 0) -> int: ...

    def sent(self, n: int) -> None: ...


@dataclass(slots=True)
class _Piece:
    due: float
    data: bytes
    target: tuple | None = None  # a datagram's destination
    done: int = 0  # bytes of a stream piece the socket took


class Outbox:
    """The delayed uplink of the worker's current connection."""

    def __init__(self, worker: Worker, faults: LinkFaults, meter: Meter) -> None:
        self.w = worker
        self.plan = faults.plan
        self.jitter = faults.jitter_up
        self.meter = meter
        self.queue: deque[_Piece] = deque()
        self.queued = 0  # payload bytes in the queue
        self.bound = worker.uplink.capacity // 2
        self.last_due = 0.0
        self._wake: asyncio.TimerHandle | None = None
        self._wake_due = 0.0

    def active(self) -> bool:
        """The uplink goes through here: latency is configured or armed, or pieces wait."""
        return bool(self.queue) or self.plan.enabled("net_latency")

    def pending(self) -> bool:
        return bool(self.queue)

    def close(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        self.queue.clear()
        self.queued = 0

    def pump(self) -> None:
        """Hand the socket what is due, then take what the ring holds; again while both move."""
        now = self.w.loop.time()
        while not self._send(now) and self.w.sock is not None:
            if not (self._take_datagrams(now) if self.w.datagram else self._take_stream(now)):
                return

    # -- taking from the ring ---------------------------------------------------------

    def _queue(self, now: float, data: bytes, target: tuple | None = None) -> None:
        self.last_due = due = max(now + latency_delay(self.plan, self.jitter, now), self.last_due)
        self.queue.append(_Piece(due, data, target))
        self.queued += len(data)

    def _take_stream(self, now: float) -> int:
        ring = self.w.uplink
        size = min(ring.available(), self.bound - self.queued)
        if size > 0:
            size = self.meter.up_allowance(size)  # 0: the Shaper pumps again once its bucket has some
        if size <= 0:
            return 0
        data = ring.peek(size)
        ring.consume(size)
        self.meter.sent(size)
        self._queue(now, data)
        return 1

    def _take_datagrams(self, now: float) -> int:
        """Each uplink record is one datagram, to its own address or the remote."""
        w, ring, took = self.w, self.w.uplink, 0
        while self.queued < self.bound:
            header = records.peek_record_header(ring)
            if header is None:
                break
            target = header.addr or w.remote
            if not w.fence.open and not w._may_send(target):
                ring.consume(header.total)  # lost, as a datagram to an unreachable host
                continue
            if not self.meter.up_allowance(1):
                break  # a datagram goes whole once the bucket holds some
            payload = ring.peek(header.length, header.size)
            ring.consume(header.total)
            self.meter.sent(header.length)
            self._queue(now, payload, target)
            took += 1
        return took

    # -- handing the socket what is due ---------------------------------------------

    def _send(self, now: float) -> bool:
        """Send the due pieces; True when the socket is full (a writability wait is set) or gone."""
        w = self.w
        while self.queue:
            piece = self.queue[0]
            if piece.due > now:
                self._wake_at(piece.due)
                return False
            if w.sock is None:
                return True
            try:
                n = self._send_piece(piece)
            except (BlockingIOError, *_TLS_AGAIN):
                w.loop.add_writer(w.sock.fileno(), w._on_writable)
                return True
            except OSError as exc:
                if piece.target is None:
                    w._finish(f"send failed: {exc.strerror or exc}")
                    return True
                # A datagram that cannot go is lost, as lwIP would lose it.
                log.warning("datagram_dropped", to=str(piece.target), reason=failure_reason(exc))
                n = len(piece.data) - piece.done
            piece.done += n
            w.stats["up"] += n
            w._last_send = now
            if piece.done < len(piece.data):
                w.loop.add_writer(w.sock.fileno(), w._on_writable)  # a short send: the socket is full
                return True
            self.queue.popleft()
            self.queued -= len(piece.data)
        return False

    def _send_piece(self, piece: _Piece) -> int:
        sock = self.w.sock
        if piece.target is not None:
            sock.sendto(piece.data, piece.target)
            return len(piece.data)
        rest = memoryview(piece.data)[piece.done:]
        return sock.send(rest[:_TLS_WRITE] if isinstance(sock, ssl.SSLSocket) else rest)

    def _wake_at(self, due: float) -> None:
        if self._wake is not None:
            if self._wake_due == due:
                return
            self._wake.cancel()
        self._wake_due = due  # uvloop's TimerHandle.when() is rounded: keep our own
        self._wake = self.w.loop.call_at(due, self._woken)

    def _woken(self) -> None:
        self._wake = None
        self.w._on_uplink()  # sends what is due, and finishes a closing flush once all went
