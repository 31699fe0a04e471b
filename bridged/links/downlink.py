"""A link worker's downlink: socket -> ring (a part of ``Worker``).

Theory of operation.  ``recv`` goes straight into the downlink ring (one
record per read, at most a quarter of the ring: the front cuts records into
+IPD frames); when the ring is full we stop reading the socket (the peer's
TCP window closes) and wait for the front's space doorbell.  Two rules
decide how much is read and when:

* the passive receive window (``recv_window``, AT+CIPRECVTYPE 1 and
  AT+CIPRECVBUF, from ``SetRecvWindow``): the most unread bytes the ring may
  hold.  A stream stops being read when it is full, so the peer's TCP window
  closes; a datagram that would overflow it is dropped (ESP-AT's passive UDP
  loses data).  0: active mode, the ring's size is the only bound;
* read batching (``batch_period``, ``[links] read_window_ms``, the README's
  "read window"): a stream paced at UART rates is read once per period
  instead of once per segment (``links.batching``).

The hot reads of a plain TCP link in active mode (a batch's tick, a pause
the uplink ends) are lean (``_read_plain``): one ``recv_into`` the ring
(``Ring.recv_behind``), one record and one doorbell, no second recv only to
hear EAGAIN after a short read.

A connection ends with one EOF record ("<conn_id> <reason>"); EOF records
wait in order for ring space, never dropped: the front's CLOSED depends on
them.  A data-path fault hands every read wake-up to the connection's
``Shaper`` (bridged.links.shaping) instead, which uses the same rules.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Callable

import structlog

from bridged.ipc import records
from bridged.ipc.messages import RemoteChanged
from bridged.links.batching import _BATCH_PIECE, Batching, next_tick, streams_both_ways, wants_batching
from bridged.links.connecting import failure_reason
from bridged.readgate import ReadGate

__all__ = ["Downlink", "wants_batching", "next_tick", "recv_window_need", "keeps_datagram", "STREAMING_BOTH"]

log = structlog.get_logger()

_RECORDS_PER_WAKEUP = 16  # bound one wake-up's work so other fds get their turn
_MAX_DATAGRAM = 65536
_TLS_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
# Reads closer together than this are a stream: read until the kernel says
# EAGAIN, and (outside read batching) read again only after this pause, so
# the kernel gathers what arrives meanwhile: a link busy both ways wakes its
# worker and the front for several segments at a time, and an answer waits
# at most this long.
_STREAMING = 0.004
# ... or, while the MCU streams to the socket too (its data went out within
# _STREAMING), until its next send wakes us or this long at the most: longer
# than two of the front's 4 ms ticks, the most between two passthrough packs
# (2920 bytes) at 0.5 MB/s, so the timer rarely fires while both ways stream.
STREAMING_BOTH = 0.012
_SPACE_POLL = 0.05  # seconds between looks at the downlink's free space while waiting for it
_MIN_NEED = 64  # bytes of ring space worth waking up for


def recv_window_need(capacity: int, recv_window: int) -> int:
    """The ring space to wait for while the receive window is full: a read must
    make room in the window (waiting for less would resume at once and spin)."""
    return max(capacity - recv_window + 1, _MIN_NEED)


def keeps_datagram(n: int, capacity: int, recv_window: int, unread: int) -> bool:
    """Whether a datagram of ``n`` bytes goes into the ring.

    Every datagram kept fits in half the ring.  Passive mode with a full
    window: UDP data is lost (AT+CIPRECVTYPE).  With nothing unread a
    datagram larger than the window is kept, else it could never be read
    (ESP-AT queues datagrams, not bytes).
    """
    return not (n > capacity // 2 - 32 or (recv_window and unread and unread + n > recv_window))


class Downlink(Batching):
    """Socket -> downlink ring; a part of ``bridged.links.worker.Worker`` (uses its attributes)."""

    def _init_downlink(self, read_window_ms: int, ipd_chunk: int) -> None:
        # Records may be larger than one +IPD: the front cuts them into <chunk>
        # frames, so each wake-up moves more bytes for the same overhead.
        self.chunk = self.downlink.capacity // 4
        self._ring_mask = self.downlink.capacity - 1  # a write index & this == 0: at the data area's end
        self.ipd_chunk = ipd_chunk
        self.recv_window = 0  # passive mode: most unread bytes to keep in the downlink ring
        self._init_batching(read_window_ms)
        self._gate: ReadGate | None = None  # created in run(), on the running loop
        self._pause: asyncio.TimerHandle | None = None  # a stream's reads, _STREAMING apart
        self._dgram_buf = bytearray(_MAX_DATAGRAM)
        self._fresh_timing()
        self._pending_eof: list[bytes] = []  # EOF records waiting for ring space
        self._waiting_space: Callable[[], None] | None = None
        self._space_poll: asyncio.TimerHandle | None = None
        self._space_need = _MIN_NEED  # bytes of downlink room the wait is for

    def _fresh_timing(self) -> None:
        """A connection begins (``Worker._opened``): its reads and the MCU's sends
        have no history, or a connection opened within a read window of the last
        one's reads would start read batching on its first bulk piece and hold the
        next for a tick.  The timers and the low-water mark ended with the old
        socket (``_stop_reading``); the receive window, the options and pending
        EOFs belong to the link, not to one connection, and stay."""
        self._last_read = 0.0
        self._unprompted_at = -1.0  # the peer's last bulk piece with no send of the MCU's since the one before
        self._last_send = 0.0  # (the uplink's) when the MCU's data last went to the socket
        self._last_commit = 0  # (the uplink's) the front's commit of it (ns)
        self._bulk_streak = 0  # (links.bulkpoll) the last connection's sends start no polling
        self._more_datagrams = False  # the last read left datagrams waiting (_recv_datagrams)

    def _on_readable(self) -> None:
        if self.shaper is not None:  # a data-path fault (bridged.links.shaping)
            self.shaper.on_readable()
            return
        if (self._polling or self._look_owed) and isinstance(self.sock, ssl.SSLSocket):
            # The MCU's unrung payloads before a read that may find the peer's FIN: one with no
            # close_notify fails the TLS session (SSLEOFError), and no send goes after it.
            self._look_uplink()
        now = self.loop.time()
        previous, self._last_read = self._last_read, now
        since = now - previous
        got = self._read_held(since < _STREAMING or self._batch_tick is not None)
        if got < _BATCH_PIECE or self._batch_tick is not None or self.sock is None:
            return
        quiet = now - self._last_send
        both = False  # (a faster stream, pieces under _STREAMING apart, pauses instead)
        if self._last_send < previous:  # no send of the MCU's since the peer's last piece
            both = since >= _STREAMING and streams_both_ways(since, quiet, now - self._unprompted_at,
                                                             self.batch_period)
            self._unprompted_at = now
        if (both or wants_batching(since, quiet, self.batch_period)) and self._can_batch():
            self._start_batching()
        elif since < _STREAMING and self._gate.is_open and not (self.datagram and self._more_datagrams):
            self._pause_reading()
            # Both directions on one wake-up: while the MCU streams too, its next
            # send ends the pause (``_on_uplink``); the longer timer is the fallback.
            pause = STREAMING_BOTH if quiet < _STREAMING else _STREAMING
            self._pause = self.loop.call_later(pause, self._end_pause)

    def _end_pause(self) -> None:
        self._pause = None
        self._resume_reading()

    def _read_held(self, streaming: bool) -> int:
        """Read the socket into the downlink ring with its doorbells held (the
        front wakes once for all the records of this read); return the bytes read."""
        ring = self.downlink
        ring.hold_doorbells()
        try:
            return self._recv_datagrams() if self.datagram else self._recv_stream(streaming)
        finally:
            ring.release_doorbells()

    def _read_plain(self, streaming: bool) -> int:
        """The hot read (a batch's tick, a pause the uplink ends) of a plain TCP link in active
        mode, lean: one recv into the downlink ring, one record, its doorbell rung at once.  A
        read that neither fills the record nor reaches the data area's end took all the kernel
        had (as ``_recv_stream`` takes a short read of a lone piece): no second recv only to
        hear EAGAIN; what lands meanwhile is read on the next wake-up.  Otherwise it reads on
        through ``_read_held``; so does a full ring, and any other link (TLS, UDP, passive
        mode).  Returns the bytes read."""
        sock = self.sock
        if type(sock) is not socket.socket or self.datagram or self.recv_window:
            return self._read_held(streaming)
        try:
            n = self.downlink.recv_behind(sock, self.chunk, *records.STREAM_DATA)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self._finish(f"receive failed: {exc.strerror or exc}")
            return 0
        if n < 0:
            return self._read_held(streaming)  # no room in one piece: nothing read (a full ring waits for space)
        if n == 0:
            self._flush_on_fin()
            self._finish("peer closed")
            return 0
        self.stats["down"] += n
        # A whole record, or one the data area's end cut short (the write index wrapped to 0):
        # more may wait.  Only a read short of what recv_behind asked says the kernel had no more.
        if n == self.chunk or not self.downlink.write_index & self._ring_mask:
            n += self._read_held(streaming)
        return n

    # -- receiving ----------------------------------------------------------------------

    def _recv_stream(self, streaming: bool) -> int:
        """Receive into the downlink ring; return the byte count (the hot path: keep it lean).

        While data streams in, read until the kernel says EAGAIN (more keeps
        arriving meanwhile); a lone piece is read once.
        """
        sock, ring, recv_window = self.sock, self.downlink, self.recv_window
        if sock is None:
            return 0  # a call_soon'd read after the socket was dropped
        tls = isinstance(sock, ssl.SSLSocket)
        got = 0
        for _ in range(_RECORDS_PER_WAKEUP):
            limit = self.chunk
            if recv_window:
                # Passive mode: the unread data must stay within the receive
                # window, so the peer's TCP window closes once it is full.
                limit = min(limit, recv_window - ring.available())
            try:
                n = records.recv_record(ring, sock, limit, datagram=False, fill=tls) if limit > 0 else -1
            except (BlockingIOError, *_TLS_AGAIN):
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                n = 0
            except OSError as exc:
                self._finish(f"receive failed: {exc.strerror or exc}")
                break
            if n == 0:
                self._flush_on_fin()
                self._finish("peer closed")
                break
            if n < 0:
                self._pause_reading()
                self._stop_batching()
                # A full receive window waits for a read to make room in it.
                need = recv_window_need(ring.capacity, recv_window) if recv_window and limit <= 0 else _MIN_NEED
                self._wait_space(self._resume_reading, need=need)
                break
            got += n
            if n < limit and not (streaming or tls):
                break  # a short read of a lone piece: another recv would only say EAGAIN
        else:
            if tls and sock.pending():
                # Decrypted bytes wait inside OpenSSL: no fd event will announce them.
                self.loop.call_soon(self._on_readable)
        self.stats["down"] += got
        return got

    def _recv_datagrams(self) -> int:
        """Receive datagrams into the downlink ring; return the payload byte count.

        ``_more_datagrams`` says whether the wake-up's bound stopped it with more
        waiting: no pause then, or a backlog would come 16 datagrams a pause."""
        got = 0
        ring = self.downlink
        self._more_datagrams = True
        for _ in range(_RECORDS_PER_WAKEUP):
            if self.sock is None:
                break
            room = ring.capacity // 2  # every datagram we keep fits in this
            if not self.recv_window and ring.free() < room:
                # Active mode: wait for the front rather than drop.
                self._pause_reading()
                self._wait_space(self._resume_reading, need=room)
                break
            try:
                n, sender = self.sock.recvfrom_into(self._dgram_buf)
            except BlockingIOError:
                self._more_datagrams = False
                break
            except OSError as exc:
                log.warning("receive_failed", reason=failure_reason(exc))
                break
            if not self.fence.open and not self.fence.admit(sender, "receive"):
                continue  # from a refused address: neither delivered nor a new remote
            self._retarget(sender)
            if not n:
                # Nothing to deliver (active mode printed nothing for it); kept,
                # it would be a passive read of 0 bytes after a notice of more.
                continue
            unread = ring.available()
            if not keeps_datagram(n, ring.capacity, self.recv_window, unread):
                log.debug("datagram_dropped", length=n, unread=unread)
                continue
            with memoryview(self._dgram_buf) as view:
                records.put_record(ring, records.DATA, view[:n], sender)
            got += n
        self.stats["down"] += got
        return got

    def _retarget(self, sender: tuple) -> None:
        """AT+CIPSTART's UDP <mode>: 1 moves the remote once, 2 to every sender."""
        if self.udp_mode == 0 or sender[:2] == self.remote[:2]:
            return
        if self.udp_mode == 1 and self.retargeted:
            return
        self.remote, self.retargeted = sender, True
        self._reply(RemoteChanged(self.conn_id, sender[0], sender[1]))

    # -- the read gate ------------------------------------------------------------------

    def _pause_reading(self) -> None:
        self._gate.shut()

    def _resume_reading(self) -> None:
        if self.sock is not None and not self._gate.is_open:
            self._gate.open(self.sock.fileno())
            if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
                # Decrypted bytes wait inside OpenSSL: no fd event will announce them.
                self.loop.call_soon(self._on_readable)

    def _stop_reading(self) -> None:
        """The socket is being dropped: no more reads, no batching, no pause."""
        self._gate.shut()
        self._lowat_raised = False  # the socket closes: no need to lower it first
        self._stop_batching()
        if self._pause is not None:
            self._pause.cancel()
            self._pause = None

    # -- waiting for ring space -----------------------------------------------------------

    def _wait_space(self, then: Callable[[], None], need: int = _MIN_NEED) -> None:
        """Call ``then`` once the front has freed ``need`` bytes of the downlink ring."""
        self._waiting_space = then
        self._space_need = need
        self.downlink.want_space_doorbell(True)
        self.downlink.clear_space_doorbell()
        self.loop.add_reader(self.downlink.space_fd, self._on_space)
        self._poll_space()

    def _poll_space(self) -> None:
        """Look at the free space now and every _SPACE_POLL while waiting: the
        front may have consumed before it saw that we want its doorbell."""
        self._space_poll = None
        if self._waiting_space is None:
            return
        if self.downlink.free() >= self._space_need:
            self.loop.call_soon(self._on_space)
        else:
            self._space_poll = self.loop.call_later(_SPACE_POLL, self._poll_space)

    def _on_space(self) -> None:
        if self._waiting_space is not None:
            # Cleared before the look: a consume after the look rings again (cleared
            # after it, that consume's doorbell was lost until the next poll).
            self.downlink.clear_space_doorbell()
            if self.downlink.free() < self._space_need:
                return  # some room, not enough yet (a datagram needs half the ring): keep waiting
        self.loop.remove_reader(self.downlink.space_fd)
        self.downlink.want_space_doorbell(False)
        if self._space_poll is not None:
            self._space_poll.cancel()
            self._space_poll = None
        then, self._waiting_space = self._waiting_space, None
        self._flush_eofs()
        if then is not None:
            then()

    # -- the end of a connection ----------------------------------------------------------

    def _put_eof(self, conn_id: int, why: str) -> None:
        self._pending_eof.append(f"{conn_id} {why}".encode())
        self._flush_eofs()

    def _flush_eofs(self) -> None:
        while self._pending_eof:
            if not records.put_record(self.downlink, records.EOF, self._pending_eof[0]):
                if self._waiting_space is None:
                    self._wait_space(lambda: None)
                return
            self._pending_eof.pop(0)
