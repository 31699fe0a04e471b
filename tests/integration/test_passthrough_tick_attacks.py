"""The passthrough tick (bridged.uart.reading: a stream read every 8 ms, the tick draining
the tty past its 4 KiB buffer), attacked: a drain into a nearly full ring, then +++; the peer
resetting and a serial port unplugged while ticks read the stream."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import time

from tests.harness import Host
from tests.integration.test_escape_full_ring import read_all
from tests.integration.test_passthrough_tick import _passthrough, _recv_exactly, _stream
from tests.integration.test_replug import device, start  # noqa: F401 - fixtures: a serial port that unplugs

RING = "[links]\nring_size = 4096\n[watchdog]\nheartbeat_ms = 60000\n"  # a stopped worker is no hang


def _write_until_stalled(host: Host, data: bytes, stall: float = 0.3) -> int:
    """Write ``data`` as fast as the pty takes it until a write makes no progress for ``stall`` s;
    how much was written."""
    view = memoryview(data)
    sent = 0
    while sent < len(data):
        try:
            sent += os.write(host.fd, view[sent:])
        except BlockingIOError:
            _, writable, _ = select.select([], [host.fd], [], stall)
            if not writable:
                return sent
    return sent


def test_a_tick_drained_into_a_full_ring_still_hears_the_escape(make_daemon):
    """The stalled worker's ring has 1 KiB of room when a tick drains a full pty (20 KiB) at
    once: most of it waits in the front. The MCU, stopped, writes on until the pty is full,
    waits, and sends +++: the front, listening after 1 s, must read up to it (the +++ buffer is
    for what a tty holds, beyond what the stall left), and every byte before it reaches the peer."""
    daemon = make_daemon(RING)
    host = daemon.host()
    host.boot()
    server = socket.create_server(("127.0.0.1", 0))
    try:
        _passthrough(host, server.getsockname()[1])
        conn, _ = server.accept()
        worker = daemon.worker_pid(0)
        os.kill(worker, signal.SIGSTOP)
        payload = os.urandom(1 << 20)
        try:
            for i in range(3):  # 1 KiB every 3 ms: a stream at UART rate, read on ticks
                host.write(payload[i * 1024:(i + 1) * 1024])
                time.sleep(0.003)
            sent = 3072 + _write_until_stalled(host, payload[3072:])
            time.sleep(1.5)  # the front listens for +++ from 1 s on
            host.write(b"+++")
            host.expect(b"\r\n+QUITT\r\n", timeout=3)
        finally:
            os.kill(worker, signal.SIGCONT)
        assert read_all(conn, sent, timeout=20) == payload[:sent]
        assert host.ask(b"AT") == b"\r\nOK\r\n"
        conn.close()
    finally:
        server.close()
        host.close()


def test_a_peer_reset_mid_stream_reconnects_with_only_the_new_bytes(daemon, host):
    """The peer resets while a UART-rate stream is read on ticks (the port paused, a tick due);
    the MCU streams on until CLOSED, the link reconnects (AT+CIPRECONNINTV): the new peer gets
    exactly what the MCU streams after CONNECT, twice over; then +++ leaves."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        host.command(b"AT+SYSMSG=5")  # +QUITT, and CONNECT/CLOSED inside passthrough
        host.command(b"AT+CIPRECONNINTV=1")
        host.command(b"AT+CIPMODE=1")
        assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % server.getsockname()[1]) == b"CONNECT\r\n\r\nOK\r\n"
        host.command(b"AT+CIPSEND", b">")
        server.settimeout(5)
        conn, _ = server.accept()
        for round_ in range(2):
            _stream(host, 100, tag=round_)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST while the ticks read on
            deadline = time.monotonic() + 3
            while b"CLOSED\r\n" not in host.buf and time.monotonic() < deadline:
                host.write(bytes(1024))
                time.sleep(0.002)
                host._fill(0)  # (what came, kept for expect)
            host.expect(b"CLOSED\r\n", timeout=3)
            conn, _ = server.accept()
            host.expect(b"CONNECT\r\n", timeout=5)
            sent = _stream(host, 200, tag=round_ + 50)
            assert _recv_exactly(conn, len(sent)) == sent
        time.sleep(1.0)
        host.write(b"+++")
        host.expect(b"\r\n+QUITT\r\n", timeout=3)
        assert host.ask(b"AT") == b"\r\nOK\r\n"
        conn.close()
    finally:
        server.close()


def _random_stream(host: Host, pieces: int) -> bytes:
    """1 KiB of random bytes every 2 ms (paced to the start); what was sent."""
    sent = bytearray()
    start = time.monotonic()
    for i in range(pieces):
        piece = os.urandom(1024)
        host.write(piece)
        sent += piece
        time.sleep(max(0.0, start + (i + 1) * 0.002 - time.monotonic()))
    return bytes(sent)


def test_unplugged_mid_stream_on_a_serial_port(start, device):
    """A serial port (pyserial's tty: VMIN 0, so a tick that finds nothing reads empty) unplugged
    while a passthrough stream is read on ticks: one hang-up heard each time (an empty tick read
    is none), and once back the session streams on: the peer gets what was read before (what the
    hang-up flushed from the tty is lost, as on a wire) and all that came after; +++ leaves."""
    daemon = start("[links]\nring_size = 65536\n")
    host = Host(None, fd=device.master)
    host.boot()
    server = socket.create_server(("127.0.0.1", 0))
    try:
        _passthrough(host, server.getsockname()[1])
        conn, _ = server.accept()
        for round_ in range(3):
            before = _random_stream(host, 150)
            device.unplug()  # 2 ms after the last piece: a pause under way, its tick due
            daemon.wait_event("port_lost", count=round_ + 1)
            host = device.plug()
            daemon.wait_event("port_back", count=round_ + 1)
            after = _random_stream(host, 150)
            got = read_all(conn, len(before) + len(after), timeout=3)
            kept = len(got) - len(after)
            assert kept > len(before) - 8192 and got == before[:kept] + after
        time.sleep(1.0)
        host.write(b"+++")
        host.expect(b"\r\n+QUITT\r\n", timeout=3)
        assert host.ask(b"AT") == b"\r\nOK\r\n"
        assert len(daemon.events("port_lost")) == 3  # no empty tick read taken for a hang-up
        conn.close()
    finally:
        server.close()
