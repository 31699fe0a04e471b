"""Five links flooding tiny pieces at a host that reads its UART slowly, in 64-byte pieces:
every byte arrives, in order per link, while the front takes their records in batches."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from tests.harness import Demux
from tests.integration.test_passive import server  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(180)

_LINKS = 5
_PER_LINK = 6000  # counters of 6 bytes: 36 KB a link, over the output's 32 KiB high mark in all


def _stream(link_id: int) -> bytes:
    return b"".join(b"%d%04d," % (link_id, i % 10000) for i in range(_PER_LINK))


def _flood(conn: socket.socket, data: bytes, sizes: int) -> None:
    """Writes ``data`` in pieces of 1..``sizes`` bytes, no Nagle: many tiny records."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    i, n = 0, 1
    while i < len(data):
        conn.sendall(data[i : i + n])
        i += n
        n = n % sizes + 1


def _slow_pump(demux: Demux, until: float) -> None:
    """The MCU's driver: 64 bytes a read, a pause between reads."""
    host = demux.host
    while time.monotonic() < until:
        try:
            chunk = os.read(host.fd, 64)
        except BlockingIOError:
            chunk = b""
        host.buf += chunk
        demux._parse()
        time.sleep(0.0005)


def test_five_links_of_tiny_pieces_at_a_slow_uart_lose_nothing_and_keep_order(host, server):  # noqa: F811
    """Five peers write 36 KB each in 1..7-byte pieces while the host reads 64 bytes at a time:
    each link's +IPD payloads, AT+CIPDINFO heads and all, are exactly its peer's stream."""
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPDINFO=1")
    conns = []
    for link_id in range(_LINKS):
        host.command(b'AT+CIPSTART=%d,"TCP","127.0.0.1",%d' % (link_id, server.getsockname()[1]))
        conns.append(server.accept()[0])
    demux = Demux(host)
    streams = [_stream(i) for i in range(_LINKS)]
    writers = [threading.Thread(target=_flood, args=(c, s, 7), daemon=True) for c, s in zip(conns, streams)]
    for writer in writers:
        writer.start()
    _slow_pump(demux, time.monotonic() + 3.0)  # slow for a while: the output backs up
    for link_id, stream in enumerate(streams):
        got = demux.wait_data(link_id, len(stream), timeout=90)
        assert got == stream, f"link {link_id}: first difference at {_diff(got, stream)}"
    for writer in writers:
        writer.join(5)
    assert b"CLOSED" not in demux.text and b"ERROR" not in demux.text
    assert host.ask(b"AT") == b"\r\nOK\r\n"  # commands held by the backlog are answered after it
    for conn in conns:
        conn.close()


def _diff(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
