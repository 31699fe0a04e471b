"""A peer that streams into passthrough while the MCU streams out (one thread,
non-blocking, so a TLS socket is never read and written from two threads); a
booted host with link 0 connected to a loopback peer (``link_zero``), and link 0 reopened
after its worker was killed (``reopened_link_sends_alone``)."""

from __future__ import annotations

import socket
import ssl
import threading
import time

from tests.harness import Demux

_AGAIN = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class BothWays:
    """Sends ``down`` in 1 KiB pieces every ``gap`` seconds, then ``tail`` right
    away and (``fin``) closes; keeps every byte the MCU sends until ``expect_up``."""

    def __init__(self, sock, down: bytes, tail: bytes, expect_up: int, gap: float = 0.002,
                 fin: bool = False) -> None:
        self.sock, self.down, self.tail, self.expect_up = sock, down, tail, expect_up
        self.gap, self.fin = gap, fin
        self.received = bytearray()
        self.tail_sent_at = 0.0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            assert time.monotonic() < deadline, "peer send stuck"
            try:
                view = view[self.sock.send(view):]
            except _AGAIN:
                self._recv()
                time.sleep(0.0005)

    def _recv(self) -> None:
        try:
            data = self.sock.recv(65536)
        except _AGAIN:
            return
        if data:
            self.received += data

    def _run(self) -> None:
        try:
            self.sock.setblocking(False)
            deadline = time.monotonic() + 20
            start = time.monotonic()
            for i in range(0, len(self.down), 1024):
                self._send(self.down[i : i + 1024], deadline)
                while time.monotonic() < start + (i // 1024 + 1) * self.gap:
                    self._recv()
                    time.sleep(0.0003)
            self._send(self.tail, deadline)
            self.tail_sent_at = time.monotonic()
            while len(self.received) < self.expect_up:
                assert time.monotonic() < deadline, f"peer got {len(self.received)} of {self.expect_up}"
                self._recv()
                time.sleep(0.0005)
            if self.fin:
                self.sock.close()
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc

    def join(self, timeout: float = 25) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "peer thread stuck"
        if self.error is not None:
            raise self.error


def mcu_stream(host, pieces: int, gap: float = 0.002) -> bytes:
    """Writes ``pieces`` 1 KiB pieces every ``gap`` seconds, keeping what comes back in host.buf."""
    up = bytearray()
    start = time.monotonic()
    for i in range(pieces):
        piece = bytes([(i + 7) % 253]) * 1024
        host.write(piece)
        up += piece
        host._fill(0)
        time.sleep(max(0.0, start + (i + 1) * gap - time.monotonic()))
    return bytes(up)


def link_zero(daemon):
    """Boot ``daemon``'s host and connect link 0 (AT+CIPMUX=1) to a loopback server: the
    server (the caller closes it; it may accept again), the host, and the peer's end
    (TCP_NODELAY: its pieces go as it sends them)."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        host = daemon.host()
        host.boot()
        host.command(b"AT+CIPMUX=1")
        host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % server.getsockname()[1])
        conn, _ = server.accept()
    except BaseException:
        server.close()
        raise
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server, host, conn


def reopened_link_sends_alone(host, server, size: int):
    """After link 0's worker was killed and its CLOSED came: reopen link 0 (on the restarted
    worker, the same rings) to ``server`` and send two ``size``-byte payloads back to back;
    the new peer gets them at once (each read within 0.5 s, not left for ticks nobody arms)
    and alone (nothing of the old link's ring). Returns the new peer's end (0.5 s timeout)."""
    deadline = time.monotonic() + 10
    while b"CONNECT" not in host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % server.getsockname()[1]):
        assert time.monotonic() < deadline, "the link's worker did not come back"
        time.sleep(0.2)
    conn, _ = server.accept()
    conn.settimeout(0.5)
    for fill in (b"A", b"B"):
        assert b"SEND OK" in Demux(host).send(0, fill * size)
    got = bytearray()
    while len(got) < 2 * size:
        got += conn.recv(65536)  # each within 0.5 s (the timeout), not never
    assert bytes(got) == b"A" * size + b"B" * size
    return conn
