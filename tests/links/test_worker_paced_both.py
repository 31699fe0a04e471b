"""A link worker in this process with real rings and a real TCP peer, both
directions paced at UART rates (the MCU's 2 KiB sends every 20 ms, the peer's
1 KiB pieces every 10 ms): read batching goes on while both stream, so the
front's doorbell rings about once per read window, not once per piece; an
echo of each send is still read at once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time

from bridged.ipc import records
from bridged.ipc.control import send_message
from bridged.ipc.messages import Close, Connect, Connected
from tests.links.control import recv_control as _recv
from tests.links.workers import LiveWorker, drive_worker

PIECES = 100  # the peer's, 1 KiB every 10 ms
UP = 2048  # the front's uplink writes, every 20 ms


class _PacedPeer:
    """Sends PIECES 1 KiB pieces 10 ms apart; keeps what it got."""

    def __init__(self, server: socket.socket) -> None:
        self.server = server
        self.sent_hash = hashlib.sha256()
        self.got = bytearray()
        self.done = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(0.001)
            start = time.monotonic()
            for i in range(PIECES):
                piece = bytes([i % 251]) * 1024
                conn.sendall(piece)
                self.sent_hash.update(piece)
                while time.monotonic() < start + (i + 1) * 0.01:
                    self._take(conn)
            self.done.set()
            while not self.stop.is_set():
                self._take(conn)

    def _take(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except (TimeoutError, BlockingIOError):
            return
        if not data:
            self.stop.set()
        self.got += data


def _drain(ring, got) -> int:
    n = 0
    while (record := records.get_record(ring)) is not None:
        got.update(record.payload)
        n += len(record.payload)
    return n


def test_a_stream_paced_both_ways_rings_the_front_once_per_window():
    """With a 20 ms read window the worker reads the peer's pieces on the
    window's ticks although the MCU keeps sending: the downlink's data
    doorbell rings at most 0.7 times per piece (once per piece without it,
    about half that with it),
    and every byte arrives both ways, in order."""
    server = socket.create_server(("127.0.0.1", 0))
    peer = _PacedPeer(server)

    async def main(live: LiveWorker) -> int:
        up, down = live.up, live.down
        send_message(live.control, Connect(1, "TCP", "127.0.0.1", server.getsockname()[1]))
        assert isinstance(await _recv(live.control), Connected)
        got, received, uplink = hashlib.sha256(), 0, bytearray()
        os.eventfd_write(down.data_fd, 1)
        os.eventfd_read(down.data_fd)  # the count starts now
        async with asyncio.timeout(20):
            i, start = 0, time.monotonic()
            while not peer.done.is_set():
                payload = bytes([i % 256]) * UP
                up.stage(0, payload)
                up.commit(len(payload))
                uplink += payload
                i += 1
                while time.monotonic() < start + i * 0.02:  # the front's sends on a 20 ms grid
                    await asyncio.sleep(0.002)
                    received += _drain(down, got)
            doorbells = os.eventfd_read(down.data_fd)
            while received < PIECES * 1024:  # the tail: the next tick reads it
                await asyncio.sleep(0.005)
                received += _drain(down, got)
            while len(peer.got) < len(uplink):
                await asyncio.sleep(0.01)
        assert got.digest() == peer.sent_hash.digest()
        assert bytes(peer.got) == bytes(uplink)
        send_message(live.control, Close(1))
        return doorbells

    try:
        doorbells = drive_worker(main, up_size=65536, down_size=65536, read_window_ms=20)
        assert doorbells <= PIECES * 0.7, doorbells
    finally:
        peer.stop.set()
        server.close()


def test_an_echo_of_each_steady_send_is_read_at_once():
    """The MCU sends 600 bytes every 20 ms and the peer echoes each at once:
    the peer never sends twice without being asked, so no read window holds
    the echoes (with a 100 ms window each would wait 0-100 ms for its tick)."""
    server = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()

    async def main(live: LiveWorker) -> list[float]:
        up, down = live.up, live.down
        send_message(live.control, Connect(1, "TCP", "127.0.0.1", server.getsockname()[1]))
        assert isinstance(await _recv(live.control), Connected)
        rtts = []
        async with asyncio.timeout(20):
            for i in range(40):
                payload = bytes([i]) * 600
                started = time.monotonic()
                up.stage(0, payload)
                up.commit(len(payload))
                echoed = bytearray()
                while len(echoed) < len(payload):
                    await asyncio.sleep(0.0005)
                    while (record := records.get_record(down)) is not None:
                        echoed += record.payload
                rtts.append(time.monotonic() - started)
                assert bytes(echoed) == payload
                await asyncio.sleep(max(0.0, started + 0.02 - time.monotonic()))
        send_message(live.control, Close(1))
        return rtts

    try:
        rtts = drive_worker(main, up_size=65536, down_size=65536, read_window_ms=100)
        assert sorted(rtts)[30] < 0.04, rtts  # held for a tick: ~100 ms; under the suite's load reads run late
    finally:
        server.close()
        thread.join(5)
