"""The read window while passthrough streams both ways at paced rates (the
peer's 1 KiB pieces 8 ms apart, the MCU's every 15 ms: read batching goes on
while both stream): every byte both ways, a small piece after both went quiet
within about a window (no raised low-water mark left stranded), the FIN as CLOSED."""

from __future__ import annotations

import hashlib
import socket
import time

from tests.integration.both_ways import BothWays, mcu_stream

PIECES = 80


def _switches(pid: int, seconds: float) -> int:
    """The process's voluntary context switches (its wake-ups) over ``seconds``."""
    def count() -> int:
        with open(f"/proc/{pid}/status", "rb") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(b"voluntary_ctxt_switches"))
    before = count()
    time.sleep(seconds)
    return count() - before


def test_passthrough_paced_both_ways_with_the_read_window_loses_nothing(make_daemon):
    """Passthrough both ways paced for read batching (pieces over 4 ms apart,
    sends within two windows): the peer's 80 KiB and the MCU's come out whole
    and in order; after 30 ms of quiet both ways the peer's 100-byte tail
    comes within 60 ms (a 20 ms window, the front's tick, load) with no FIN
    to wake the worker, and the idle worker is not woken by ticks; then CLOSED
    (AT+SYSMSG bit 2) for its FIN."""
    server = socket.create_server(("127.0.0.1", 0))
    daemon = make_daemon("[links]\nread_window_ms = 20\n")
    host = daemon.host()
    host.boot()
    try:
        host.command(b"AT+SYSMSG=4")
        assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % server.getsockname()[1]).endswith(b"OK\r\n")
        host.command(b"AT+CIPMODE=1")
        host.command(b"AT+CIPSEND", b">")
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        down = b"".join(bytes([i % 250]) * 1024 for i in range(PIECES))
        tail = b"T" * 100
        up_pieces = int(PIECES * 0.008 / 0.015)
        peer = BothWays(conn, down, b"", up_pieces * 1024, gap=0.008)
        peer.start()
        up = mcu_stream(host, up_pieces, gap=0.015)
        got = host.read_exactly(len(down), 10)
        assert hashlib.sha256(got).digest() == hashlib.sha256(down).digest()
        peer.join()
        # The tail after both went quiet for 1.5 windows: the batching that
        # held the low-water mark raised must have ended (or its tick reads it).
        time.sleep(max(0.0, peer.tail_sent_at + 0.03 - time.monotonic()))
        conn.sendall(tail)
        sent_at = time.monotonic()
        assert host.read_exactly(len(tail), 5) == tail
        arrived = time.monotonic()
        assert hashlib.sha256(bytes(peer.received)).digest() == hashlib.sha256(up).digest()
        assert arrived - sent_at < 0.06, arrived - sent_at
        wakeups = _switches(daemon.worker_pid(0), 0.5)
        print("idle worker wake-ups in 0.5 s:", wakeups)
        assert wakeups <= 10, wakeups  # a tick every window: about 25
        conn.close()  # the FIN while the read window may hold the low-water mark raised
        host.expect(b"CLOSED\r\n", timeout=5)
    finally:
        server.close()
