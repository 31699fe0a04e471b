"""The read window both ways with the MCU's payloads on its ticks, then the MCU goes quiet
(the peer streams on) and asks something two windows and more later: the request reaches
the peer at once and the answer comes back at once (README: a send after two windows of
quiet ends the batching), not held to a tick each way."""

from __future__ import annotations

import socket
import threading
import time

from tests.harness import Demux
from tests.integration.both_ways import link_zero

GAP = 0.0205  # the MCU's 2 KiB sends, drifting against the 20 ms grid
REQUEST = b"=" * 1000 + b"REQUEST"  # bulk: it rings for the quiet before it, not for being small
ANSWER = b"\xff" * 16  # the peer's stream has no 0xff


class _Peer:
    """Streams 1 KiB every 10 ms; answers REQUEST at once, noting when it came."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.received = bytearray()
        self.asked_at = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.conn.setblocking(False)
        deadline = time.monotonic() + 20
        next_piece, i = time.monotonic(), 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            if time.monotonic() >= next_piece:
                self.conn.send(bytes([i % 250]) * 1024)
                i, next_piece = i + 1, next_piece + 0.010
            try:
                self.received += self.conn.recv(65536)
            except BlockingIOError:
                time.sleep(0.0003)
                continue
            if not self.asked_at and self.received.endswith(REQUEST):
                self.asked_at = time.monotonic()
                self.conn.send(ANSWER)


def test_a_request_after_two_windows_of_quiet_goes_and_is_answered_at_once(make_daemon):
    """The last payload of the stream just after a tick, the request 45 ms after its SEND OK
    (the polling flag was still on then: until two empty ticks after the one that sent the
    payload): the request reaches the peer within 8 ms of its SEND OK, and the answer the
    peer sends at once is on the UART within 12 ms (5 on main: the UART backlog; a window each way before)."""
    daemon = make_daemon("[links]\nread_window_ms = 20\n")
    server, host, conn = link_zero(daemon)
    peer = None
    try:
        peer = _Peer(conn)
        demux = Demux(host)
        # Timing on a loaded machine: up to three tries, each a whole stream, quiet and request
        # (the rule itself is checked without clocks: tests/ipc/test_ring_polling.py, the
        # worker's batching ending in tests/links/test_worker_uplink_ticks.py).
        for attempt in range(3):
            reached, back = _stream_then_ask(demux, peer)
            print(f"try {attempt + 1}: request reached the peer {reached * 1000:.1f} ms after its SEND OK, "
                  f"the answer on the UART {back * 1000:.1f} ms after the peer sent it")
            if reached < 0.008 and back < 0.012:
                break
        assert reached < 0.008, reached
        assert back < 0.012, back
    finally:
        if peer is not None:
            peer.stop.set()
            peer.thread.join(5)
        server.close()


def _stream_then_ask(demux: Demux, peer: _Peer) -> tuple[float, float]:
    """Stream both ways, the last payload just after a tick, 45 ms of quiet, the request:
    how long it took to reach the peer, and the peer's answer to reach the UART."""
    start = time.monotonic()
    for i in range(50):
        assert b"SEND OK" in demux.send(0, bytes([(i * 7 + 1) % 256]) * 2048)
        while time.monotonic() < start + (i + 1) * GAP:
            demux.pump(0.002)
    while not 0.0005 <= time.monotonic() % 0.020 <= 0.002:
        demux.pump(0.0005)
    assert b"SEND OK" in demux.send(0, b"\x01" * 2048)
    last = time.monotonic()
    while time.monotonic() < last + 0.045:
        demux.pump(0.001)
    answers = demux.data.get(0, b"").count(ANSWER[:1])
    peer.asked_at = 0.0
    assert b"SEND OK" in demux.send(0, REQUEST)
    asked = time.monotonic()
    while demux.data.get(0, b"").count(ANSWER[:1]) <= answers:
        assert time.monotonic() < asked + 2, "no answer"
        demux.pump(0.0005)
    answered = time.monotonic()
    assert peer.asked_at, "the peer saw no request"
    return peer.asked_at - asked, answered - peer.asked_at
