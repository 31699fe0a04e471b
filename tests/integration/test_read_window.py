"""The read window ([links] read_window_ms): a stream paced at UART rates is
read once per window (or per +IPD chunk), a lone piece at once, and nothing
is held longer than the window or lost."""

from __future__ import annotations

import hashlib
import socket
import time

from tests.harness import Daemon, Demux, Timeout
from tests.integration.both_ways import link_zero


def _connected(daemon: Daemon):
    server, host, conn = link_zero(daemon)
    server.close()
    return host, conn


def _paced(conn: socket.socket, pieces: int, size: int, every: float) -> bytes:
    sent = bytearray()
    start = time.monotonic()
    for i in range(pieces):
        piece = bytes([i % 251]) * size
        conn.sendall(piece)
        sent += piece
        time.sleep(max(0.0, start + (i + 1) * every - time.monotonic()))
    return bytes(sent)


def _frames(host, length: int, timeout: float = 10.0) -> list[bytes]:
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while sum(map(len, frames)) < length:
        if time.monotonic() > deadline:
            raise Timeout(f"{sum(map(len, frames))} of {length} bytes")
        link_id, data = host.read_ipd(timeout=max(0.1, deadline - time.monotonic()))
        assert link_id == 0
        frames.append(data)
    return frames


def test_a_paced_stream_is_read_once_per_window(make_daemon):
    """60 pieces of 600 bytes 5 ms apart: a read per +IPD chunk (2920 bytes)
    or per 50 ms window instead of one per piece."""
    reads = {}
    for window in (0, 50):
        host, conn = _connected(make_daemon(f"[links]\nread_window_ms = {window}\n"))
        sent = _paced(conn, 60, 600, 0.005)
        frames = _frames(host, len(sent))
        assert hashlib.sha256(b"".join(frames)).digest() == hashlib.sha256(sent).digest()
        # A read becomes 2920-byte +IPD frames and a shorter last one.
        reads[window] = sum(len(f) < 2920 for f in frames)
        conn.close()
        host.close()
    # 36 KB in 300 ms: about 13 chunks' worth (plus the first pieces, read at once).
    assert reads[50] <= 25, reads
    assert reads[0] >= 2 * reads[50], reads


def test_a_lone_piece_is_read_at_once(make_daemon):
    host, conn = _connected(make_daemon("[links]\nread_window_ms = 100\n"))
    _frames(host, len(_paced(conn, 30, 600, 0.005)))  # a stream opens a window...
    delays = []
    for _ in range(5):
        time.sleep(0.25)  # ...that a quiet spell closes
        started = time.monotonic()
        conn.sendall(b"ping")
        assert b"".join(_frames(host, 4)) == b"ping"
        delays.append(time.monotonic() - started)
    # Held by a window, a piece would wait for its tick (0-100 ms, evenly).
    assert sorted(delays)[3] < 0.03, delays


def test_the_tail_of_a_stream_comes_within_the_window(make_daemon):
    """Bytes below the +IPD chunk (SO_RCVLOWAT) are read by the window's tick."""
    host, conn = _connected(make_daemon("[links]\nread_window_ms = 100\n"))
    sent = _paced(conn, 8, 600, 0.005)  # its last pieces are less than a chunk
    ended = time.monotonic()
    frames = _frames(host, len(sent), timeout=5)
    assert b"".join(frames) == sent
    assert time.monotonic() - ended < 0.6


def test_a_close_in_a_window_delivers_everything_then_closed(make_daemon):
    host, conn = _connected(make_daemon("[links]\nread_window_ms = 100\n"))
    sent = _paced(conn, 8, 600, 0.005)
    conn.close()
    assert b"".join(_frames(host, len(sent), timeout=5)) == sent
    host.expect(b"0,CLOSED\r\n", timeout=2)


def test_answers_to_the_mcu_are_not_held(make_daemon, echo_server):
    """Request and response: data the MCU sent ends a window, so the peer's
    answer comes at once (an echo 20 times in a row, 600 and 1 bytes)."""
    daemon = make_daemon("[links]\nread_window_ms = 100\n")
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % echo_server.port)
    demux = Demux(host)
    for size in (600, 1):
        rtts = []
        received = 0
        for i in range(20):
            payload = bytes([i]) * size
            started = time.monotonic()
            assert demux.send(0, payload).endswith(b"SEND OK\r\n")
            received += size
            demux.wait_data(0, received, timeout=5)
            rtts.append(time.monotonic() - started)
        # Held by a window, each answer would wait for its tick (0-100 ms).
        assert sorted(rtts)[10] < 0.03, (size, rtts)


def test_an_answer_during_a_window_is_read_at_once(make_daemon):
    """The peer streams (a window opens), then answers what the MCU sent:
    sending ended the window, so the answer is not held for its tick."""
    host, conn = _connected(make_daemon("[links]\nread_window_ms = 100\n"))
    demux = Demux(host)
    delays = []
    total = 0
    for i in range(5):
        # 500 ms of stream: the MCU's last send is four windows old, a window opens.
        total += len(_paced(conn, 100, 600, 0.005))
        demux.wait_data(0, total, timeout=5)
        assert demux.send(0, b"ping").endswith(b"SEND OK\r\n")
        assert conn.recv(16) == b"ping"
        started = time.monotonic()
        conn.sendall(b"pong" * 150)
        total += 600
        demux.wait_data(0, total, timeout=5)
        delays.append(time.monotonic() - started)
    # Held by the window, an answer would wait for its tick (0-100 ms, evenly).
    assert sorted(delays)[3] < 0.03, delays
