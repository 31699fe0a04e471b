"""The passthrough tick (bridged.uart.reading: a stream read every 8 ms, the tick draining
the tty past its 4 KiB buffer), attacked: a drain into a full ring, +++ timing around it."""

from __future__ import annotations

import os
import select
import signal
import socket
import time

from tests.harness import Host
from tests.integration.test_escape_full_ring import read_all
from tests.integration.test_passthrough_tick import _passthrough

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
