"""A link worker in this process with real rings and a real TCP peer: on a
link streaming both ways, the uplink's wake-up also reads what the peer sent
meanwhile (one wake-up for both directions), and when the uplink stops the
downlink still comes within its pause."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time

from bridged.ipc import records
from bridged.ipc.control import send_message
from bridged.ipc.messages import Close, Connect, Connected
from bridged.ipc.rings import Ring
from tests.links.control import recv_control as _recv
from tests.links.workers import LiveWorker, drive_worker

PIECE = 1024  # the peer's pieces, every 2 ms (0.5 MB/s)
UP = 1536  # the front's uplink writes, every 3 ms
ROUNDS = 100


class _Peer:
    """Sends 1 KiB pieces every 2 ms until told to stop; counts what it sent, keeps what it got."""

    def __init__(self, server: socket.socket) -> None:
        self.server = server
        self.sent = 0
        self.sent_hash = hashlib.sha256()
        self.got = bytearray()
        self.stop = threading.Event()
        self.done_sending = threading.Event()  # ``sent`` and ``sent_hash`` are final
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            i = 0
            while not self.stop.is_set() and i < 5000:
                piece = bytes([i % 251]) * PIECE
                with self.lock:
                    conn.settimeout(5)  # a short timeout could cut sendall short, unseen
                    conn.sendall(piece)
                    self.sent += PIECE
                    self.sent_hash.update(piece)
                i += 1
                if not self._take(conn, time.monotonic() + 0.002):
                    return
            self.done_sending.set()
            # Sending stopped: keep taking the uplink until the worker closes (bounded).
            self._take(conn, time.monotonic() + 10)

    def _take(self, conn: socket.socket, deadline: float) -> bool:
        """Receive what comes until ``deadline``; False once the other side closed."""
        conn.settimeout(0.0005)
        while time.monotonic() < deadline:
            try:
                data = conn.recv(65536)
            except (TimeoutError, BlockingIOError):
                continue
            if not data:
                return False
            self.got += data
        return True


def test_the_uplink_wake_up_reads_the_downlink_too():
    """Each time the worker takes an uplink write, everything the peer had sent
    before it is already in the downlink ring (not left for a wake-up of its own);
    every byte arrives both ways, and the tail comes once the uplink stops."""
    server = socket.create_server(("127.0.0.1", 0))
    peer = _Peer(server)

    async def main(live: LiveWorker) -> tuple[int, int]:
        ours, up, down = live.control, live.up, live.down
        send_message(ours, Connect(1, "TCP", "127.0.0.1", server.getsockname()[1]))
        assert isinstance(await _recv(ours), Connected)
        got = hashlib.sha256()
        received = 0
        caught_up = 0
        uplink = bytearray()
        async with asyncio.timeout(30):
            await asyncio.sleep(0.05)  # the stream under way: the worker pauses between reads
            for i in range(ROUNDS):
                await asyncio.sleep(0.003)
                with peer.lock:  # nothing is sent while we look and write
                    sent_before = peer.sent
                    payload = bytes([i % 256]) * UP
                    up.stage(0, payload)
                    up.commit(len(payload))
                uplink += payload
                while up.available():
                    await asyncio.sleep(0)
                # The uplink's callback has run: it read the socket too.
                caught_up += _unread_payload(down) + received >= sent_before
                while (record := records.get_record(down)) is not None:
                    assert record.kind == records.DATA, record  # the peer closes only after the test
                    got.update(record.payload)
                    received += len(record.payload)
            peer.stop.set()
            assert await asyncio.to_thread(peer.done_sending.wait, 5)
            stopped = time.monotonic()
            while received < peer.sent:  # the tail, with no uplink to wake the worker
                while (record := records.get_record(down)) is not None:
                    assert record.kind == records.DATA, record
                    got.update(record.payload)
                    received += len(record.payload)
                await asyncio.sleep(0.001)
            tail = time.monotonic() - stopped
            assert got.digest() == peer.sent_hash.digest()
            while len(peer.got) < len(uplink):  # the peer keeps reading after it stopped sending
                await asyncio.sleep(0.01)
        assert bytes(peer.got) == bytes(uplink)
        send_message(ours, Close(1))
        return caught_up, round(tail * 1000)

    try:
        caught_up, tail_ms = drive_worker(main, up_size=65536, down_size=65536)
        # Without the shared wake-up, the worker reads on its own 4 ms timer and
        # the uplink finds about half the rounds behind.
        assert caught_up >= ROUNDS * 0.9, caught_up
        assert tail_ms < 500, tail_ms
    finally:
        peer.stop.set()
        server.close()


def _unread_payload(ring: Ring) -> int:
    """Payload bytes in the ring's unread records (headers not counted)."""
    total, skip = 0, 0
    while (header := records.peek_record_header(ring, skip)) is not None:
        total += header.length
        skip += header.total
    return total


def _udp_peer() -> socket.socket:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    return peer


async def _udp_link(live: LiveWorker, peer: socket.socket) -> tuple:
    """Link 1 of ``live`` connected to ``peer`` over UDP; the worker's address (its first datagram tells it)."""
    send_message(live.control, Connect(1, "UDP", "127.0.0.1", peer.getsockname()[1]))
    assert isinstance(await _recv(live.control), Connected)
    records.put_record(live.up, records.DATA, b"hello")
    _, where = await asyncio.to_thread(peer.recvfrom, 64)
    return where


def test_a_udp_link_streaming_both_ways_keeps_each_datagram_whole():
    """The uplink's wake-up reads a UDP link's datagrams as datagrams: each
    downlink record is one datagram with its sender, none merged or lost."""
    peer = _udp_peer()

    async def main(live: LiveWorker) -> list[records.Record]:
        up, down, where = live.up, live.down, await _udp_link(live, peer)
        got: list[records.Record] = []
        async with asyncio.timeout(20):
            for i in range(ROUNDS):
                for j in range(3):  # 600-byte datagrams 1 ms apart: a stream the worker pauses on
                    peer.sendto(bytes([(3 * i + j) % 256]) * 600, where)
                    await asyncio.sleep(0.001)
                records.put_record(up, records.DATA, b"up%d" % i)
                while (record := records.get_record(down)) is not None:
                    got.append(record)
            while len(got) < 3 * ROUNDS:
                while (record := records.get_record(down)) is not None:
                    got.append(record)
                await asyncio.sleep(0.002)
        send_message(live.control, Close(1))
        return got

    try:
        got = drive_worker(main, up_size=65536, down_size=65536)
        assert [r.payload for r in got] == [bytes([k % 256]) * 600 for k in range(3 * ROUNDS)]
        assert {r.addr[:2] for r in got} == {peer.getsockname()}
    finally:
        peer.close()


def test_a_udp_backlog_is_read_whole_while_the_uplink_streams():
    """A burst of 160 datagrams lands while a UDP link streaming both ways is
    paused: the uplink's next wake-up (and the reads it leads to) takes them
    all, not 16 per wake-up with a pause between (the rest would wait many
    pauses, or overflow the socket's buffer and be lost)."""
    peer = _udp_peer()

    async def main(live: LiveWorker) -> tuple[int, int]:
        up, down, where = live.up, live.down, await _udp_link(live, peer)
        got = 0
        async with asyncio.timeout(20):
            for i in range(10):  # a stream both ways: the worker pauses its reads
                records.put_record(up, records.DATA, b"up%d" % i)
                peer.sendto(b"s" * 600, where)
                await asyncio.sleep(0.001)
                peer.sendto(b"s" * 600, where)
                await asyncio.sleep(0.001)
            for _ in range(160):
                peer.sendto(b"b" * 100, where)
            # Counted in the uplink's steps, not timed: the worker runs in this loop, so
            # load stretches its pauses and these steps alike.
            last = -1  # the step by which the whole burst was in
            for i in range(40):  # the uplink goes on every 5 ms
                records.put_record(up, records.DATA, b"more%d" % i)
                await asyncio.sleep(0.005)
                while (record := records.get_record(down)) is not None:
                    if record.payload[:1] == b"b":
                        got += 1
                        last = i
        send_message(live.control, Close(1))
        return got, last

    try:
        got, steps = drive_worker(main, up_size=1 << 20, down_size=1 << 20)
        assert got == 160
        assert steps <= 3, steps  # 16 per wake-up: 160 / 16 = 10 uplink steps or more
    finally:
        peer.close()
