"""The MCU's payloads on the read window's ticks (README, "the read window"; a 100 ms
window here), then AT+CIPCLOSE at once: a payload the front put in the ring with no
doorbell reaches the peer before the connection's end; or the link's worker killed while
it polls: the restarted one's link rings again."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

from tests.harness import Demux
from tests.integration.both_ways import link_zero, reopened_link_sends_alone

WINDOW = 0.1
GAP = 0.05  # the MCU's 2 KiB sends: within two windows of each other, a steady stream


class _Peer:
    """Streams 1 KiB every 20 ms (its own: read batching holds it) and keeps all it
    receives until EOF or a reset, which it notes."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.received = bytearray()
        self.eof = False
        self.reset = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.conn.setblocking(False)
        deadline = time.monotonic() + 20
        next_piece, i = time.monotonic(), 0
        while not self.eof and time.monotonic() < deadline:
            if time.monotonic() >= next_piece:
                try:
                    self.conn.send(bytes([i % 250]) * 1024)
                except BlockingIOError:
                    pass
                except OSError:
                    next_piece = deadline  # closed under us: read on to the end
                i, next_piece = i + 1, next_piece + 0.020
            try:
                data = self.conn.recv(65536)
            except BlockingIOError:
                time.sleep(0.0005)
                continue
            except ConnectionResetError:
                self.reset = True
                return
            if not data:
                self.eof = True
            self.received += data

    def join(self) -> None:
        self.thread.join(25)
        assert not self.thread.is_alive(), "peer stuck"


def test_cipclose_right_after_a_polled_send_hands_the_peer_every_byte_before_the_fin(make_daemon):
    """Both ways stream for 1.5 s (the MCU's sends go on the ticks by then), then a last
    payload and AT+CIPCLOSE right behind its SEND OK, long before the next tick: the
    peer gets every byte in order, then the end (the close's flush, as lwIP's close sends
    its buffer), not an end with the last payload left in the ring."""
    daemon = make_daemon("[links]\nread_window_ms = 100\n")
    server, host, conn = link_zero(daemon)
    try:
        peer = _Peer(conn)
        demux, up = Demux(host), bytearray()
        start = time.monotonic()
        for i in range(30):
            payload = bytes([(i * 7 + 1) % 256]) * 2048
            assert b"SEND OK" in demux.send(0, payload)
            up += payload
            while time.monotonic() < start + (i + 1) * GAP:
                demux.pump(0.002)
        while not 0.01 <= time.monotonic() % WINDOW <= 0.04:  # just after a tick: the next is far
            demux.pump(0.001)
        last = b"last payload " * 160
        assert b"SEND OK" in demux.send(0, last)
        up += last
        host.write(b"AT+CIPCLOSE=0\r\n")
        demux.expect(b"0,CLOSED\r\n")
        demux.expect(b"OK\r\n")
        peer.join()
        # Its end: a FIN, or a reset for the peer's bytes read batching left unread (lwIP's
        # close resets such a connection too); either comes after every byte of the MCU's.
        assert peer.eof or peer.reset
        assert len(peer.received) == len(up)
        assert bytes(peer.received) == bytes(up)
        conn.close()
    finally:
        server.close()


def test_a_worker_killed_while_polling_leaves_its_restarted_successor_ringing(make_daemon):
    """SIGKILL the link's worker while both ways stream (its flag on the ring's header says
    it polls), reopen the link on the restarted worker (same ring), and send two bulk
    payloads back to back (the second within two windows of the first: the quiet rule
    would not ring for it): both reach the new peer at once, not left for ticks that no
    worker arms."""
    daemon = make_daemon("[links]\nread_window_ms = 100\n")
    daemon.expected_errors |= {"worker_died", "child_died"}
    server, host, conn = link_zero(daemon)
    try:
        peer = _Peer(conn)
        demux = Demux(host)
        start = time.monotonic()
        for i in range(30):
            assert b"SEND OK" in demux.send(0, bytes([i + 1]) * 2048)
            while time.monotonic() < start + (i + 1) * GAP:
                demux.pump(0.002)
        os.kill(daemon.worker_pid(0), signal.SIGKILL)
        demux.expect(b"0,CLOSED\r\n", timeout=5)
        peer.join()
        conn.close()
        reopened_link_sends_alone(host, server, 2048).close()
    finally:
        server.close()
