"""A link worker's uplink: ring -> socket (a part of ``Worker``).

Theory of operation.  Bytes leave the uplink ring only as fast as
``sock.send`` accepts them: when the socket is full we wait for it to be
writable and the ring fills up behind it, which stops the front admitting
more (back-pressure without a queue of our own).  The ring and the socket
buffer are the "protocol stack" of the front's SEND OK (given once a send is
in the ring), so a host's Close first hands the socket what the ring still
holds (the closing flush, at most ``_CLOSE_FLUSH`` seconds), as lwIP's close
sends its buffer.

Consuming the ring rings its space doorbell for the front (when it asked
for it); one wake-up's sends ring it once (``hold_doorbells``), or twice when
a send of the lean path (``_send_whole``: a plain TCP link's usual wake-up,
what the ring holds in one piece and one send, at line rate the hot path)
is cut short by a full socket and the general loop goes on.  While read batching goes on and
the MCU streams too, the front rings no doorbell: its payloads go on the batch's ticks
(``Batching``'s uplink polling).  A link streaming both ways otherwise shares
the uplink's wake-ups: a downlink read pausing between a stream's pieces
ends when the uplink wakes us (``_end_pause_early``), not on its own timer.  A stream goes as the ring holds it
(``sendmsg`` over the wrap), TLS one record at a time; on a UDP link each
uplink record is one datagram, to its own address or the link's remote,
each destination checked against ``[links] allow / deny``; on a link whose
remote follows its senders (<mode> 1, 2) what the socket holds is read first
(``_senders_first``), so a new sender moves the remote before a send goes.  A bandwidth
fault meters the sends through the connection's ``Shaper``; while
net_latency is on, its ``Outbox`` (bridged.links.outbox) takes the ring's
bytes instead and sends each piece when due.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl

import structlog

from bridged.ipc import records
from bridged.links.batching import both_steady
from bridged.links.connecting import failure_reason
from bridged.links.downlink import STREAMING_BOTH

__all__ = ["Uplink"]

log = structlog.get_logger()

_TLS_WRITE = 16384  # one TLS record per write; a retry must repeat the same length
_TLS_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
# A host's close hands the socket what the front admitted (SEND OK said it was
# sent) before closing, as lwIP's close sends its buffer; a peer that never
# reads it gets the close after this many seconds anyway.
_CLOSE_FLUSH = 5.0


class Uplink:
    """Uplink ring -> socket; a part of ``bridged.links.worker.Worker`` (uses its attributes)."""

    def _init_uplink(self) -> None:
        self._tls_retry = 0  # length of a TLS write to repeat after WANT_WRITE
        self._last_send = 0.0  # when the MCU's data last went to the socket
        self._last_commit = 0  # ... and the front's commit of it (Ring.last_commit, ns)
        self._closing: asyncio.TimerHandle | None = None  # a host's Close waits for the uplink to flush
        self._closing_reason = ""

    def _on_uplink(self) -> None:
        try:  # the ring's data doorbell, cleared inline (clear_data_doorbell): every wake-up of the uplink
            os.eventfd_read(self.uplink.data_fd)
        except BlockingIOError:
            pass
        self._uplink_ready()

    def _uplink_ready(self) -> None:
        """Send what the ring holds (a doorbell's wake-up, or a tick's look while we poll it)."""
        read_first = self.udp_mode and self._senders_first()
        # The usual wake-up of a plain TCP link takes one send and one consume (at most
        # one doorbell): no more layers than that.  The rest goes through _pump_uplink.
        if self._closing is not None or not self._send_whole():
            self.uplink.hold_doorbells()  # one progress doorbell for all the sends below
            try:
                self._pump_uplink()
            finally:
                self.uplink.release_doorbells()
        if self._pause is not None and not read_first:
            self._end_pause_early()

    def _senders_first(self) -> bool:
        """A UDP link whose remote follows its senders (AT+CIPSTART <mode> 1 not yet moved, 2):
        datagrams the kernel holds are read before the MCU's sends go, so one from a new sender
        moves the remote first, as lwIP moves it on receipt (a read pause or the order of one
        wake-up's events would send to the old remote).  True when it read."""
        if (self.udp_mode == 1 and self.retargeted) or self.sock is None or self.shaper is not None:
            return False
        if self._pause is not None:
            self._end_pause_early()
            return True
        if self._gate.is_open:
            self._read_held(False)
            return True
        return False  # a full downlink ring: its datagrams wait for room, as all reads do

    def _end_pause_early(self) -> None:
        """Awake anyway (the uplink): read what gathered now, not on a wake-up of
        its own, and pause again while the stream goes on (both directions
        then share the uplink's wake-ups; the timer is the fallback)."""
        self._pause.cancel()
        self._pause = None
        if self.shaper is not None:  # a fault came meanwhile: the Shaper reads
            self._resume_reading()
            return
        self._last_read = self.loop.time()
        got = self._read_plain(True)
        if self.sock is None or self._waiting_space is not None:
            return  # ended, or a full ring: its space wait resumes reading
        if got and not (self.datagram and self._more_datagrams):
            self._pause = self.loop.call_later(STREAMING_BOTH, self._end_pause)
        else:
            # The peer went quiet (its next piece is read at once), or more
            # datagrams wait than one wake-up reads: read on until none do.
            self._resume_reading()

    def _pump_uplink(self) -> None:
        self._pump_ring()
        if self._closing is not None and (self.sock is None or not self._unsent()):
            self._finish(self._closing_reason)

    def _unsent(self) -> bool:
        """Admitted bytes wait in the ring, or in a latency fault's outbox."""
        return self.uplink.available() > 0 or (self.shaper is not None and self.shaper.outbox.pending())

    def _pump_ring(self) -> None:
        if self.shaper is not None:
            # net_latency: the Outbox sends (once a TLS write to repeat has gone as it must).
            if not self._tls_retry and self.shaper.outbox.active():
                self.shaper.outbox.pump()
                return
        if self.datagram:
            self._send_datagrams()
            return
        while self.sock is not None and self.uplink.available():
            size = self.uplink.available()
            if self.shaper is not None:  # a bandwidth cap (0: the Shaper pumps again later)
                size = self.shaper.up_allowance(size, self._tls_retry)
                if not size:
                    return
            views = self.uplink.readable_views(size)
            try:
                if isinstance(self.sock, ssl.SSLSocket):
                    sent = self._send_tls(views[0])
                else:
                    sent = self.sock.sendmsg(views) if len(views) > 1 else self.sock.send(views[0])
            except (BlockingIOError, *_TLS_AGAIN):
                sent = 0
            except OSError as exc:
                sent = -1
                why = f"send failed: {exc.strerror or exc}"
            finally:
                for view in views:
                    view.release()
            if sent < 0:
                self._finish(why)
                return
            if sent == 0:
                self.loop.add_writer(self.sock.fileno(), self._on_writable)
                return
            self.uplink.consume(sent)
            self.stats["up"] += sent
            if self.shaper is not None:
                self.shaper.sent(sent)
            self._sent_now(sent)

    def _send_whole(self) -> bool:
        """A plain TCP link's usual wake-up, lean: what the ring holds, in one piece,
        goes in one send.  True when that was all (sent, or the socket is full or
        failed); False leaves the rest to the general loop (not a plain TCP link
        with no Shaper, the data wraps, or the socket took part of it)."""
        sock = self.sock
        if type(sock) is not socket.socket or self.shaper is not None or self.datagram:
            return False
        try:
            sent, left = self.uplink.send_to(sock)
        except BlockingIOError:
            self.loop.add_writer(sock.fileno(), self._on_writable)
            return True
        except OSError as exc:
            self._finish(f"send failed: {exc.strerror or exc}")
            return True
        if not sent:
            return not left  # nothing published; or it wraps: both pieces in one sendmsg
        self.stats["up"] += sent
        committed = self.uplink.last_commit()  # _sent_now, inline (both_steady too)
        if self._batch_tick is not None:
            if committed - self._last_commit >= self._request_gap:
                self._stop_batching()
            elif not self._polling:
                self._poll_uplink()
        else:
            self._bulk_sent(sent, committed)
        self._last_send, self._last_commit = self.loop.time(), committed
        return not left

    def _sent_now(self, sent: int) -> None:
        """The MCU's data went to the socket: a send after a quiet spell may be a
        request (its answer is read at once); one of a steady stream is not.  The gap
        is the MCU's, from the front's commit times: a payload a tick sent (polled)
        went up to a period after it came, so the send's own time would shrink it.
        With read batching off, a bulk upload's sends poll the ring (``links.bulkpoll``)."""
        committed = self.uplink.last_commit()
        if self._batch_tick is not None:
            if not both_steady((committed - self._last_commit) / 1e9, self.batch_period):
                self._stop_batching()  # the peer may answer this at once: read it at once
            elif not self._polling:
                self._poll_uplink()  # a stream both ways: its next sends go on the ticks
        else:
            self._bulk_sent(sent, committed)
        self._last_send, self._last_commit = self.loop.time(), committed

    def _send_tls(self, view: memoryview) -> int:
        # OpenSSL wants a write retried after WANT_WRITE with the same length.
        size = self._tls_retry or min(len(view), _TLS_WRITE)
        self._tls_retry = size
        sent = self.sock.send(view[:size])
        self._tls_retry = 0
        return sent

    def _send_datagrams(self) -> None:
        """Each uplink record is one datagram, to its own address or the remote; a bulk
        upload's records polled as a stream's (``links.bulkpoll``: each was committed whole)."""
        up = self.stats["up"]
        self._send_each_datagram()
        if self.stats["up"] != up:
            committed = self.uplink.last_commit()
            self._bulk_sent(self.stats["up"] - up, committed)  # (no read batching on UDP)
            self._last_commit = committed

    def _send_each_datagram(self) -> None:
        while self.sock is not None:
            header = records.peek_record_header(self.uplink)
            if header is None:
                return
            target = header.addr or self.remote
            # The remote too, every time (the fence remembers verdicts for a
            # second): "self" grows when the gateway takes a new address.
            if not self.fence.open and not self._may_send(target):
                self.uplink.consume(header.total)  # lost, as a datagram to an unreachable host
                continue
            if self.shaper is not None and not self.shaper.up_allowance(1):
                return  # a bandwidth cap: a datagram goes whole once the bucket holds some
            payload = self.uplink.peek(header.length, header.size)
            try:
                self.sock.sendto(payload, target)
            except BlockingIOError:
                self.loop.add_writer(self.sock.fileno(), self._on_writable)
                return
            except OSError as exc:
                # A datagram that cannot go is lost, as lwIP would lose it.
                log.warning("datagram_dropped", to=str(header.addr or self.remote), reason=failure_reason(exc))
            self.uplink.consume(header.total)
            self.stats["up"] += header.length
            if self.shaper is not None:
                self.shaper.sent(header.length)

    def _may_send(self, target: tuple) -> bool:
        """A datagram from a loopback source can reach only this host (a group's
        too, on lo): it must also pass as sent to that source."""
        if not self.fence.admit(target, "send"):
            return False
        return self.loopback_source is None or self.fence.admit((self.loopback_source, target[1]), "send")

    def _on_writable(self) -> None:
        if self.sock is not None:
            self.loop.remove_writer(self.sock.fileno())
        self._on_uplink()

    # -- the closing flush ----------------------------------------------------------------

    def _must_flush(self) -> bool:
        """Admitted bytes wait in the ring, and so_linger 0 does not ask for a reset."""
        return self.sock is not None and self._unsent() and self.options.linger != 0

    def _flush_then_finish(self, why: str) -> None:
        """A host's Close: send what the ring holds, then finish (``_pump_uplink``),
        or finish after _CLOSE_FLUSH whatever is left."""
        self._closing_reason = why
        self._closing = self.loop.call_later(_CLOSE_FLUSH, self._finish, why)
        self._on_uplink()  # finishes once the ring is empty

    def _end_flush(self) -> None:
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None

    def _stop_sending(self) -> None:
        """The socket is being dropped: no writability wait, no TLS write to repeat, no polling."""
        self.loop.remove_writer(self.sock.fileno())
        self._tls_retry = 0
        self._end_bulk()
