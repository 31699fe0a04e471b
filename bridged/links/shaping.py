"""The data-path faults of one connection: latency, a bandwidth cap, UDP
datagrams lost or reordered, a TCP reset in mid-stream.

Theory of operation
-------------------
Without these faults the worker receives straight into the downlink ring.
A connection for which one of them is configured or armed gets a `Shaper`
(at connect, or when ``bridged fault`` arms one), and the worker hands it
every read wake-up instead.  The Shaper reads into bytes, decides (lose, hold
back, delay, reset) and queues what the MCU is to get with the time it is
due; `_deliver` moves due items into the ring in order, so what the front
sees is what a slower, lossier network would have handed the ESP32.

Back-pressure stays one chain: the queue holds at most half a ring; reads
stop while it is full, while the passive receive window is full and while
the bandwidth bucket is empty, so the peer's TCP window closes as it would
without a fault.  Nothing is dropped but what net_udp_loss drops (and what a
reset or a close drops, as a real one would).

* net_latency: each read is due ``ms`` (plus or minus up to ``jitter_ms``,
  from a seeded stream) after it was read, never before the one ahead of it;
  a peer's FIN or reset waits its turn too.  What the MCU sends is delayed
  the same way by the Shaper's `Outbox` (bridged.links.outbox).
* net_bandwidth: a token bucket each way, starting empty and holding 20 ms'
  worth: N bytes take at least N / bytes_per_s seconds.  Reads take at most
  what the bucket holds; a send at most that too (a datagram goes whole and
  leaves the bucket in debt).
* net_tcp_reset: the gap to the next hit is drawn per byte (`FaultPlan.gap`)
  and reads stop exactly there, so the same seed resets after the same byte
  however the kernel cut the stream.  The bytes before it are delivered,
  then the socket is closed with SO_LINGER 0 (the peer sees a RST) and the
  MCU sees CLOSED, as after a reset from the peer.
* net_udp_loss: a datagram read is dropped before anything else sees it.
* net_udp_reorder: a datagram read is held back until ``depth`` later ones
  arrived (at most 64 held; a held one is lost if the link closes first).

The receiving end's own checks ([links] allow/deny, AT+CIPSTART's UDP
<mode>, a passive receive window's datagram loss) run when a datagram is
delivered: that is when it reaches the device.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from bridged.ipc import records
from bridged.links.downlink import keeps_datagram, recv_window_need
from bridged.links.faults import Bucket, LinkFaults
from bridged.links.outbox import Outbox, latency_delay

if TYPE_CHECKING:
    from bridged.links.worker import Worker

__all__ = ["Shaper"]

log = structlog.get_logger()

_MAX_HELD = 64  # datagrams held back at once (net_udp_reorder)
_READS_PER_WAKEUP = 16
_TLS_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_RESET = "receive failed: Connection reset by peer"  # what a peer's RST gives the worker


@dataclass(slots=True)
class _Item:
    due: float
    payload: bytes | None  # None: the connection ends here
    addr: tuple | None = None  # a datagram's sender
    reason: str = ""
    reset: bool = False  # the end is a reset: close with SO_LINGER 0


class Shaper:
    """The data-path faults of the worker's current connection."""

    def __init__(self, worker: Worker, faults: LinkFaults) -> None:
        self.w = worker
        self.plan = faults.plan
        self.jitter = faults.jitter
        self.queue: deque[_Item] = deque()
        self.queued = 0  # payload bytes in the queue
        self.bound = worker.downlink.capacity // 2
        self.last_due = 0.0
        self.ended = False  # the end is queued: read no more
        self.closed = False
        self.down: Bucket | None = None
        self.up: Bucket | None = None
        self.reset_left: int | None = None  # bytes before the next reset occasion; None: off
        self.received = 0  # stream bytes read, for the reset's report
        self.held: list[list] = []  # [payload, sender, datagrams still to pass]
        self._queue_full = False
        self._deliver_at: asyncio.TimerHandle | None = None
        self._read_at: asyncio.TimerHandle | None = None
        self._send_at: asyncio.TimerHandle | None = None
        self.outbox = Outbox(worker, faults, self)  # net_latency on what the MCU sends
        self.armed("net_tcp_reset")

    def armed(self, name: str) -> None:
        """`name` was configured or armed on demand: pick up what it needs."""
        if name == "net_tcp_reset" and not self.w.datagram and self.plan.enabled(name):
            self.reset_left = self.plan.gap(name) - 1

    def close(self) -> None:
        """The connection is gone: drop what is queued and held, stop the timers."""
        self.closed = True
        for handle in (self._deliver_at, self._read_at, self._send_at):
            if handle is not None:
                handle.cancel()
        self.queue.clear()
        self.held.clear()
        self.outbox.close()

    # -- receiving --------------------------------------------------------------------

    def on_readable(self) -> None:
        w = self.w
        if w.sock is None or self.closed:
            return
        if self.ended:  # the end is queued: a readable socket would call again and again
            w._pause_reading()
            return
        now = w.loop.time()
        ring = w.downlink
        ring.hold_doorbells()
        try:
            if w.datagram:
                self._recv_datagrams(now)
            else:
                self._recv_stream(now)
        finally:
            ring.release_doorbells()

    def _recv_stream(self, now: float) -> None:
        w = self.w
        sock = w.sock
        for _ in range(_READS_PER_WAKEUP):
            limit = self._stream_limit(now)
            if not limit:
                return
            try:
                data = sock.recv(limit)
            except (BlockingIOError, *_TLS_AGAIN):
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            except OSError as exc:
                self._end(now, f"receive failed: {exc.strerror or exc}")
                return
            if not data:
                self._end(now, "peer closed")
                return
            self.received += len(data)
            if self.reset_left:
                self.reset_left -= len(data)
            if self.down is not None:
                self.down.spend(len(data))
            self._enqueue(now, data)
            if len(data) < limit and not isinstance(sock, ssl.SSLSocket):
                return  # the socket is empty: another recv would say EAGAIN
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            w.loop.call_soon(w._on_readable)  # decrypted bytes no fd event will announce

    def _stream_limit(self, now: float) -> int:
        """How many bytes the next read may take; 0 when it must wait (a wake-up is arranged)."""
        w = self.w
        limit = w.chunk
        if self.reset_left is not None:
            if self.reset_left == 0 and self._reset_now(now):
                return 0
            if self.reset_left:
                limit = min(limit, self.reset_left)
        room = self.bound - self.queued
        if room <= 0:
            self._queue_full = True
            w._pause_reading()
            return 0
        limit = min(limit, room)
        if w.recv_window:
            room = w.recv_window - w.downlink.available() - self.queued
            if room <= 0:  # passive mode: the unread data fills the receive window
                w._pause_reading()
                w._wait_space(self._kick, need=recv_window_need(w.downlink.capacity, w.recv_window))
                return 0
            limit = min(limit, room)
        bucket = self._bucket(now, "down")
        if bucket is not None:
            allowed = bucket.allowance(now)
            if not allowed:
                self._wait_tokens(bucket)
                return 0
            limit = min(limit, allowed)
        return limit

    def _reset_now(self, now: float) -> bool:
        """The next byte is net_tcp_reset's occasion: reset, or draw the next gap."""
        if self.plan.hit("net_tcp_reset", now, rate_drawn=True) is not None:
            self.plan.fired("net_tcp_reset", after_bytes=self.received)
            self._end(now, _RESET, reset=True)
            return True
        gap = self.plan.gap("net_tcp_reset")
        # A gap of 1 (a schedule without a rate: every byte in its windows):
        # ask again at each wake-up rather than read one byte at a time.
        self.reset_left = gap if gap > 1 else 0
        return False

    def _recv_datagrams(self, now: float) -> None:
        w = self.w
        for _ in range(_READS_PER_WAKEUP):
            if w.sock is None or self.closed:
                return
            if self.queued >= self.bound:
                self._queue_full = True
                w._pause_reading()
                return
            bucket = self._bucket(now, "down")
            if bucket is not None and not bucket.allowance(now):
                self._wait_tokens(bucket)
                return
            try:
                n, sender = w.sock.recvfrom_into(w._dgram_buf)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("receive_failed", reason=exc.strerror or str(exc))
                return
            if bucket is not None:
                bucket.spend(n)
            if self.plan.hit("net_udp_loss", now) is not None:
                self.plan.fired("net_udp_loss", length=n, sender=sender[0], port=sender[1])
                continue
            payload = bytes(w._dgram_buf[:n])
            hold = self.plan.hit("net_udp_reorder", now) if len(self.held) < _MAX_HELD else None
            if hold is not None:
                depth = int(hold["depth"])
                self.plan.fired("net_udp_reorder", length=n, depth=depth)
                self.held.append([payload, sender, depth])
                continue
            self._arrive(now, payload, sender)

    def _arrive(self, now: float, payload: bytes, sender: tuple) -> None:
        """A datagram arrives; each held one goes after `depth` arrivals."""
        arriving = deque([(payload, sender)])
        while arriving:
            self._enqueue(now, *arriving.popleft())
            for held in self.held:
                held[2] -= 1
            if any(held[2] <= 0 for held in self.held):
                arriving.extend((h[0], h[1]) for h in self.held if h[2] <= 0)
                self.held = [h for h in self.held if h[2] > 0]

    # -- the queue --------------------------------------------------------------------

    def _due(self, now: float) -> float:
        self.last_due = due = max(now + latency_delay(self.plan, self.jitter, now), self.last_due)  # order kept
        return due

    def _enqueue(self, now: float, payload: bytes, addr: tuple | None = None) -> None:
        self.queue.append(_Item(self._due(now), payload, addr))
        self.queued += len(payload)
        self._deliver()

    def _end(self, now: float, reason: str, reset: bool = False) -> None:
        self.ended = True
        self.w._pause_reading()
        self.queue.append(_Item(self._due(now), None, reason=reason, reset=reset))
        self._deliver()

    def _deliver(self) -> None:
        """Move the due items into the ring, in order, while it has room."""
        if self.closed:
            return
        if self._deliver_at is not None:
            self._deliver_at.cancel()
            self._deliver_at = None
        w = self.w
        now = w.loop.time()
        while self.queue:
            item = self.queue[0]
            if item.due > now:
                self._deliver_at = w.loop.call_at(item.due, self._deliver_timer)
                break
            if item.payload is None:
                self._finish(item)
                return
            if item.addr is not None and not self._device_takes(item):
                self.queue.popleft()
                self.queued -= len(item.payload)
                continue
            if not records.put_record(w.downlink, records.DATA, item.payload, item.addr):
                w._wait_space(self._kick, need=records.HEADER_SIZE + 16 + len(item.payload))
                break
            self.queue.popleft()
            self.queued -= len(item.payload)
            w.stats["down"] += len(item.payload)
        if self._queue_full and self.queued < self.bound and not self.ended:
            self._queue_full = False
            w._resume_reading()

    def _deliver_timer(self) -> None:
        self._deliver_at = None
        ring = self.w.downlink
        ring.hold_doorbells()
        try:
            self._deliver()
        finally:
            ring.release_doorbells()

    def _device_takes(self, item: _Item) -> bool:
        """A datagram reaches the device: the checks the worker makes on a datagram it reads."""
        w, sender, n = self.w, item.addr, len(item.payload)
        if not w.fence.open and not w.fence.admit(sender, "receive"):
            return False
        w._retarget(sender)
        unread = w.downlink.available()
        if not n or not keeps_datagram(n, w.downlink.capacity, w.recv_window, unread):
            log.debug("datagram_dropped", length=n, unread=unread)
            return False
        return True

    def _finish(self, item: _Item) -> None:
        w = self.w
        if item.reset and w.sock is not None:
            try:  # the peer sees a RST, not a FIN
                w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # the socket failed already: it is closing anyway
        w._finish(item.reason)  # drops the socket, and this Shaper with it

    def _kick(self) -> None:
        """Ring space came back: deliver, then read again."""
        if self.closed:
            return
        self._deliver_timer()
        if not self.ended and not self.closed:
            self.w._resume_reading()

    # -- the bandwidth cap ------------------------------------------------------------

    def _bucket(self, now: float, way: str) -> Bucket | None:
        cap = self.plan.condition("net_bandwidth", now)
        if cap is None:
            setattr(self, way, None)
            return None
        bucket = getattr(self, way)
        if bucket is None or bucket.rate != cap["bytes_per_s"]:
            bucket = Bucket(int(cap["bytes_per_s"]), now)
            setattr(self, way, bucket)
        return bucket

    def _wait_tokens(self, bucket: Bucket) -> None:
        self.w._pause_reading()
        if self._read_at is None:
            self._read_at = self.w.loop.call_later(bucket.wait(), self._tokens_back)

    def _tokens_back(self) -> None:
        self._read_at = None
        if not self.ended and not self.closed:
            self.w._resume_reading()

    def up_allowance(self, want: int, floor: int = 0) -> int:
        """How many of `want` bytes may be sent now (at least `floor` when any);
        0: the uplink is pumped again once the bucket has gathered some."""
        now = self.w.loop.time()
        bucket = self._bucket(now, "up")
        if bucket is None:
            return want
        allowed = bucket.allowance(now)
        if not allowed:
            if self._send_at is None:
                self._send_at = self.w.loop.call_later(bucket.wait(), self._send_again)
            return 0
        return min(want, max(allowed, floor))

    def sent(self, n: int) -> None:
        if self.up is not None:
            self.up.spend(n)

    def _send_again(self) -> None:
        self._send_at = None
        if not self.closed:
            self.w._on_uplink()
