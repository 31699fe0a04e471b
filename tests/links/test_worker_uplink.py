"""A link worker in this process with a real TCP peer: the uplink's sends (bridged.links.uplink)
keep every byte in order through a small ring that wraps, a peer that reads slowly (partial
sends, a full socket) and one that reads at once."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time

import pytest

from bridged.ipc.control import send_message
from bridged.ipc.messages import Close, Connect, Connected
from tests.links.control import recv_control as _recv
from tests.links.workers import LiveWorker, drive_worker

pytestmark = pytest.mark.timeout(60)

TOTAL = 512 * 1024


class _Sink:
    """Accepts one connection and keeps what it reads, in ``piece``-byte reads ``pause`` s apart."""

    def __init__(self, piece: int, pause: float) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the accepted socket's too
        self.got = bytearray()
        self.piece, self.pause = piece, pause
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.getsockname()[1]

    def _run(self) -> None:
        self.server.settimeout(10)
        conn, _ = self.server.accept()
        with conn:
            conn.settimeout(10)
            time.sleep(self.pause * 200)  # a slow reader starts late: the socket fills up
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                data = conn.recv(self.piece)
                if not data:
                    return
                self.got += data
                if self.pause:
                    time.sleep(self.pause)

    def close(self) -> None:
        self.server.close()
        self.thread.join(10)


def _stream(piece: int, pause: float, seed: int) -> tuple[bytes, bytes]:
    """(what the front put in a 4 KiB uplink ring in odd-sized writes, what the peer received)."""
    sink = _Sink(piece, pause)
    data = random.Random(seed).randbytes(TOTAL)

    async def main(live: LiveWorker) -> None:
        send_message(live.control, Connect(1, "TCP", "127.0.0.1", sink.port))
        assert isinstance(await _recv(live.control), Connected)
        if pause:  # a small send buffer: it fills, and sends take part of what they are given
            live.worker.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sizes = random.Random(seed + 1)
        at = 0
        async with asyncio.timeout(20):
            while at < len(data):  # odd sizes: the ring wraps at every offset
                at += live.up.put_nowait(data[at:at + sizes.randint(1, 3000)])
                await asyncio.sleep(0)
            while live.up.available() or len(sink.got) < len(data):
                await asyncio.sleep(0.005)
        send_message(live.control, Close(1, flush=True))

    try:
        drive_worker(main, up_size=4096)
    finally:
        sink.close()
    return data, bytes(sink.got)


@pytest.mark.parametrize("piece, pause", [(65536, 0.0), (700, 0.001)])
def test_every_byte_in_order_through_a_wrapping_ring(piece, pause):
    """Half a MiB through a 4 KiB uplink ring in odd-sized writes reaches a fast and a slow
    reader (a full socket, partial sends) whole and in order."""
    sent, got = _stream(piece, pause, seed=piece)
    assert len(got) == len(sent)
    assert got == sent

