"""+++ heard while a stream's uplink ring is full (a peer that never reads): passthrough and AT+CIPSENDL."""

from __future__ import annotations

import hashlib
import os
import select
import socket
import time

import psutil

from tests.harness import Host

_LIMIT = 64 << 20  # bytes: a stream that never stalls is a failure, not an endless test


class _DeafPeer:
    """A TCP server with a small receive buffer that accepts and reads nothing until told."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the accepted socket
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.port = self.server.getsockname()[1]
        self.conn: socket.socket | None = None

    def accept(self) -> socket.socket:
        self.server.settimeout(5)
        self.conn, _ = self.server.accept()
        return self.conn

    def read_all(self, count: int, timeout: float = 30.0) -> bytes:
        """Start reading at last: the next ``count`` bytes (fewer if the link ends)."""
        return read_all(self.conn, count, timeout)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


def read_all(conn: socket.socket, count: int, timeout: float = 30.0) -> bytes:
    """The next ``count`` bytes of ``conn`` (fewer if it ends, or by ``timeout``)."""
    conn.settimeout(1)
    got = bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        try:
            chunk = conn.recv(1 << 20)
        except TimeoutError:
            continue
        if not chunk:
            break
        got += chunk
    return bytes(got)


def _stream_until_stalled(host: Host, stall: float = 0.3) -> bytes:
    """Write random data as fast as the daemon takes it until a write makes no progress for
    ``stall`` s (the ring, the socket and the pty are full); what was written.  (Not 0.1 s: a
    front that a loaded machine left unscheduled that long passed for a full ring, and the
    test then escaped with room left in it.)"""
    sent = bytearray()
    piece = os.urandom(4096)
    deadline = time.monotonic() + 30
    while len(sent) < _LIMIT and time.monotonic() < deadline:
        try:
            n = os.write(host.fd, piece)
        except BlockingIOError:
            _, writable, _ = select.select([], [host.fd], [], stall)
            if not writable:
                return bytes(sent)
            continue
        sent += piece[:n]
        piece = piece[n:] + os.urandom(n)  # each byte different: a reorder changes the hash
    raise AssertionError(f"the stream never stalled ({len(sent)} bytes)")


def _escape_when_heard(host: Host) -> float:
    """+++ with its guard times, once the pty takes bytes again (the daemon listens for it); when sent."""
    _, writable, _ = select.select([], [host.fd], [], 5.0)
    assert writable, "the daemon never read the port again: +++ cannot reach it"
    time.sleep(0.05)
    host.write(b"+++")
    sent_at = time.monotonic()
    time.sleep(0.05)
    return sent_at


def _enter_passthrough(host: Host, peer: _DeafPeer) -> None:
    host.command(b"AT+SYSMSG=1")  # +QUITT on leaving passthrough: the answer to wait for
    host.command(b"AT+CIPMODE=1")
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % peer.port) == b"CONNECT\r\n\r\nOK\r\n"
    peer.accept()
    host.write(b"AT+CIPSEND\r\n")
    host.expect(b"\r\nOK\r\n\r\n>")


def test_passthrough_escape_with_the_ring_full(daemon, host):
    """A passthrough stream stalls on a peer that never reads; +++ still leaves it (+QUITT) within a bounded
    time, commands work and AT+CIPCLOSE closes."""
    peer = _DeafPeer()
    try:
        _enter_passthrough(host, peer)
        sent = _stream_until_stalled(host)
        assert len(sent) > 65536  # more than the ring: it is full
        sent_at = _escape_when_heard(host)
        host.expect(b"\r\n+QUITT\r\n", timeout=3)
        assert time.monotonic() - sent_at < 3
        assert host.ask(b"AT") == b"\r\nOK\r\n"
        assert host.ask(b"AT+CIPMODE?") == b"+CIPMODE:1\r\n\r\nOK\r\n"
        assert host.ask(b"AT+CIPCLOSE", timeout=10).endswith(b"\r\nOK\r\n")
        assert host.ask(b"AT+CIPSTATUS").find(b"+CIPSTATUS:") < 0  # no link left
        assert daemon.events("uart_listening")
    finally:
        peer.close()


def test_bytes_before_escape_reach_a_late_reader_intact(daemon, host):
    """Every byte streamed before +++ reaches the peer once it starts reading, in order (hash equal),
    those still held in the front when +++ came included."""
    peer = _DeafPeer()
    try:
        _enter_passthrough(host, peer)
        sent = _stream_until_stalled(host)
        _escape_when_heard(host)
        host.expect(b"\r\n+QUITT\r\n", timeout=3)
        assert host.ask(b"AT") == b"\r\nOK\r\n"
        got = peer.read_all(len(sent))
        assert len(got) == len(sent)
        assert hashlib.sha256(got).digest() == hashlib.sha256(sent).digest()
        assert daemon.events("escaped_bytes_kept")  # some waited outside the ring: the leftover path ran
        assert daemon.wait_event("escaped_bytes_sent")
    finally:
        peer.close()


def test_cipsendl_cancel_with_the_ring_full(daemon, host):
    """AT+CIPSENDL stalls on a peer that never reads; +++ still cancels it (SEND CANCELLED), then the
    link works and every byte before +++ reaches the peer once it reads."""
    peer = _DeafPeer()
    try:
        assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % peer.port) == b"CONNECT\r\n\r\nOK\r\n"
        peer.accept()
        host.write(b"AT+CIPSENDL=%d\r\n" % (1 << 30))
        host.expect(b"\r\nOK\r\n\r\n>")
        sent = _stream_until_stalled(host)
        _escape_when_heard(host)
        answer = host.expect(b"\r\nSEND CANCELLED\r\n", timeout=3)
        assert b"ERROR" not in answer and b"SEND OK" not in answer
        assert host.ask(b"AT") == b"\r\nOK\r\n"
        host.write(b"AT+CIPSEND=5\r\n")
        host.expect(b">")
        host.write(b"after")  # a send after the cancel goes behind what the cancelled one left
        got = peer.read_all(len(sent) + 5)
        host.expect(b"SEND OK\r\n", timeout=10)
        assert hashlib.sha256(got).digest() == hashlib.sha256(sent + b"after").digest()
    finally:
        peer.close()


def test_front_idles_while_a_stream_waits_for_room(daemon, host):
    """While a passthrough stream waits for room (ring full, port held), the front sleeps: no timer
    re-armed at once for bytes that cannot go (it used to spin a whole core)."""
    peer = _DeafPeer()
    try:
        _enter_passthrough(host, peer)
        _stream_until_stalled(host)
        front_pid = daemon.front_pid()
        front = psutil.Process(front_pid)
        before = sum(front.cpu_times()[:2])
        time.sleep(1.0)
        assert sum(front.cpu_times()[:2]) - before < 0.3
    finally:
        peer.close()


def test_listening_for_escape_takes_a_bounded_amount(daemon, host):
    """An MCU that keeps streaming into a full ring gets at most the +++ buffer (32 KiB) past its first
    stall, then is held for good (its writes make no progress) and the log says why (the front holds
    at most 32 KiB more than when it began listening: a tick's drain may have left up to a pty's
    20 KiB behind the ring then)."""
    peer = _DeafPeer()
    try:
        _enter_passthrough(host, peer)
        _stream_until_stalled(host)
        more = _stream_until_stalled(host, stall=2.0)  # the daemon listens again after 1 s: then stops
        # The +++ buffer, plus what the pty held when the stall began and what went to the ring meanwhile.
        assert 0 < len(more) <= 32768 + 24576 + 4096
        held = daemon.wait_event("uart_input_held")[-1]
        began = daemon.events("uart_listening")[-1]["held"]
        # What listening began with is what the read that filled the ring left over: a tick's drain
        # takes what the pty holds (~20 KiB) and what the MCU wrote meanwhile (24880 seen under a
        # loaded make test), never more than a tty's flip buffers (64 KiB) and n_tty's 4 KiB.
        assert held["flow"] == "pty" and began <= 65536 + 4096 and held["held"] <= began + 32768
        assert _stream_until_stalled(host, stall=0.3) == b""  # still held: nothing more is taken
    finally:
        peer.close()
