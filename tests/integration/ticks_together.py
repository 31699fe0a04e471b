"""A loopback peer streaming at UART pace while it keeps what the MCU sends, and the
MCU's passthrough stream: the parts of test_ticks_together*.py (the front's passthrough
tick, the link worker's uplink on its read window's ticks, the command share, together)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

ANSWER = b"\xff" * 16  # the peers' streams have no 0xff
REQUEST = b"=" * 1000 + b"REQUEST"  # bulk: it rings only for the quiet before it, not for being small


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


class Peer:
    """A TCP peer streaming 1 KiB every ``gap`` seconds (its own stream: read batching holds
    it), keeping all it receives; answers REQUEST with ANSWER at once, noting when."""

    def __init__(self, conn: socket.socket, gap: float = 0.020) -> None:
        self.conn, self.gap = conn, gap
        self.received = bytearray()
        self.sent = bytearray()
        self.asked_at = 0.0
        self.answered = 0  # REQUESTs answered
        self.fin_at = 0.0  # when set: at that time, stop streaming and send a FIN (reading on)
        self.eof = False
        self.reset = False  # the connection ended with a reset (a read's OSError)
        self.streaming = threading.Event()
        self.streaming.set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.conn.setblocking(False)
        deadline = time.monotonic() + 60
        next_piece, i = time.monotonic(), 0
        while not self.stop.is_set() and not self.eof and time.monotonic() < deadline:
            if self.fin_at and time.monotonic() >= self.fin_at and self.streaming.is_set():
                self.streaming.clear()
                self.conn.shutdown(socket.SHUT_WR)
            if self.streaming.is_set() and time.monotonic() >= next_piece:
                piece = bytes([i % 250]) * 1024
                try:
                    self.sent += piece[: self.conn.send(piece)]
                except BlockingIOError:
                    pass
                except OSError:  # reset: what came before it is still to be read
                    self.streaming.clear()
                i, next_piece = i + 1, max(next_piece + self.gap, time.monotonic() - self.gap)
            try:
                data = self.conn.recv(65536)
            except BlockingIOError:
                time.sleep(0.0003)
                continue
            except OSError:
                self.reset = True
                return
            if not data:
                self.eof = True
            self.received += data
            if self.received.count(REQUEST) > self.answered:
                self.answered += 1
                self.asked_at = time.monotonic()
                try:
                    self.conn.send(ANSWER)
                except OSError:
                    continue  # reset: read on
                self.sent += ANSWER

    def join(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "peer stuck"


def passthrough_on(host, server: socket.socket, window_extra: bytes = b"") -> socket.socket:
    host.command(b"AT+SYSMSG=1")  # +QUITT on leaving passthrough
    host.command(b"AT+CIPMODE=1")
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % server.getsockname()[1]).endswith(b"OK\r\n")
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    host.command(b"AT+CIPSEND", b">")
    return conn


def stream_up(host, pieces: int, gap: float, tag: int) -> bytes:
    """The MCU's passthrough stream: 1 KiB every ``gap`` (paced to the start), what the
    peer sends meanwhile kept in host.buf; what was written."""
    sent = bytearray()
    start = time.monotonic()
    for i in range(pieces):
        piece = bytes([(tag + i) % 250]) * 1024
        host.write(piece)
        sent += piece
        while time.monotonic() < start + (i + 1) * gap:
            host._fill(0.001)
    return bytes(sent)


def wait_for(predicate, timeout: float, what: str, pump=None) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        if pump is not None:
            pump()
        else:
            time.sleep(0.0005)
    return time.monotonic()

