"""The UART front's read coalescing (bridged.uart.reading) against a full uplink ring:
the coalescing tick ends only its own pause, never the ring's."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import termios
import time
import tty

import pytest

from tests.harness import Daemon, Host

_RING = 16384
_CONFIG = f"[links]\ncount = 1\nring_size = {_RING}\n[watchdog]\nheartbeat_ms = 60000\n"


def _unread(slave: int) -> int:
    """Bytes the MCU wrote that the daemon has not read from its end of the pty."""
    return struct.unpack("i", fcntl.ioctl(slave, termios.FIONREAD, b"\0" * 4))[0]


@pytest.mark.parametrize("attempt", range(3))
def test_a_full_ring_keeps_the_port_unread_through_coalescing_ticks(tmp_path, attempt):
    """AT+CIPSENDL streamed at UART pace into a ring the stopped worker never drains: once the
    ring is full, bytes the MCU writes later stay in the pty until room is made, or for the first
    second, after which the front listens for +++ (uart.reading: the coalescing tick used to reopen
    the read a full ring had shut at once: one more read), and then all arrive."""
    master, slave = os.openpty()
    tty.setraw(slave)
    server = socket.create_server(("127.0.0.1", 0))
    daemon = Daemon(tmp_path, _CONFIG, port=os.ttyname(slave)).start()
    try:
        host = Host(None, fd=master)
        host.boot()
        assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % server.getsockname()[1]) == b"CONNECT\r\n\r\nOK\r\n"
        conn, _ = server.accept()
        # Ring puts happen in the TRANSINTVL timer, inside the coalescing pauses of the reads.
        assert host.ask(b"AT+TRANSINTVL=1") == b"\r\nOK\r\n"
        payload = os.urandom(_RING * 3)
        worker = daemon.worker_pid(0)
        os.kill(worker, signal.SIGSTOP)
        try:
            host.write(b"AT+CIPSENDL=%d\r\n" % len(payload))
            host.expect(b">")
            sent = 0
            while sent < _RING:  # 512-byte pieces every 2 ms (coalesced reads) until the ring is full
                host.write(payload[sent:min(sent + 512, _RING)])
                sent = min(sent + 512, _RING)
                time.sleep(0.002)
            # The ring filled with the last piece, the pty is empty: a tick that reopened the read
            # leaves it open for the next bytes.
            time.sleep(0.3)
            before = _unread(slave)
            assert before + 1000 < 4096  # what FIONREAD can count (n_tty's buffer)
            host.write(payload[sent:sent + 1000])
            sent += 1000
            time.sleep(0.3)
            assert _unread(slave) == before + 1000, "the port was read while the ring was full"
        finally:
            os.kill(worker, signal.SIGCONT)
        host.write(payload[sent:])
        host.expect(b"SEND OK\r\n", timeout=20)
        got = bytearray()
        conn.settimeout(5)
        while len(got) < len(payload) and (data := conn.recv(1 << 20)):
            got += data
        assert bytes(got) == payload
        assert host.ask(b"AT") == b"\r\nOK\r\n"
        conn.close()
    finally:
        code = daemon.stop()
        server.close()
        os.close(master)
        os.close(slave)
    assert code == 0
