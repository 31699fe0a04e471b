"""A link worker in this process with real rings and a real TCP peer: the lean paths of a
plain TCP link (``Downlink._read_plain``, one recv into the ring on a tick or when the
uplink ends a pause; ``Uplink._send_whole``, one send of what the uplink ring holds) called
while the peer has done something hostile: data then a reset or a FIN, more than the
downlink ring holds, a reset before the MCU's data goes.  Each is called directly with
the loop held (no other callback of the worker runs first), then the loop runs on."""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import threading

import pytest

from bridged.ipc import records
from bridged.ipc.control import send_message
from bridged.ipc.messages import Connect, Connected, Ended
from tests.links.control import recv_control, recv_until
from tests.links.workers import LiveWorker, drive_worker

pytestmark = pytest.mark.timeout(60)


class _Peer:
    """Accepts one connection; once ``go`` is set, sends ``data`` then ends as ``end`` says:
    "fin" (shutdown), "rst" (SO_LINGER 0 close), "open"; keeps what it receives."""

    def __init__(self, data: bytes, end: str) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.data, self.end = data, end
        self.go = threading.Event()
        self.ended = threading.Event()
        self.got = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.server.settimeout(10)
        conn, _ = self.server.accept()
        self.go.wait(10)
        conn.sendall(self.data)
        if self.end == "rst":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        elif self.end == "fin":
            conn.shutdown(socket.SHUT_WR)
        self.ended.set()
        if self.end != "rst":
            conn.settimeout(10)
            while chunk := conn.recv(65536):
                self.got += chunk
            conn.close()

    def close(self) -> None:
        self.server.close()
        self.thread.join(10)


async def _connected(live: LiveWorker, peer: _Peer) -> socket.socket:
    """Connect the worker to the peer; return the worker's socket (the loop is ours again)."""
    send_message(live.control, Connect(1, "TCP", "127.0.0.1", peer.port))
    assert isinstance(await recv_control(live.control), Connected)
    return live.worker.sock


def _hold_until_ended(peer: _Peer, sock: socket.socket) -> None:
    """Blocks the loop (no worker callback runs) until the peer has sent and ended, and it landed."""
    peer.go.set()
    assert peer.ended.wait(10)
    assert select.select([sock], [], [], 5.0)[0]
    select.select([], [], [], 0.05)  # the FIN or RST behind the data lands too


def _records(ring) -> list[records.Record]:
    out = []
    while (record := records.get_record(ring)) is not None:
        out.append(record)
    return out


@pytest.mark.parametrize("end, reason", [("rst", "1 receive failed: Connection reset by peer"),
                                         ("fin", "1 peer closed")])
def test_data_then_the_peers_end_come_in_order_from_the_lean_read(end, reason):
    """The lean read takes the peer's data as one record (a short read: no second recv), the
    next one finds the reset or the FIN and ends the link: Ended, then the EOF record after
    the data, with the reason the general path gives."""
    peer = _Peer(b"d" * 700, end)

    async def script(live: LiveWorker) -> None:
        sock = await _connected(live, peer)
        worker = live.worker
        _hold_until_ended(peer, sock)
        assert worker._read_plain(False) == 700
        assert worker.sock is sock  # still open: the end was not read yet
        assert worker._read_plain(True) == 0
        assert worker.sock is None
        assert isinstance(await recv_until(live.control, Ended), Ended)
        got = _records(live.down)
        assert [(r.kind, r.payload) for r in got] == [(records.DATA, b"d" * 700),
                                                      (records.EOF, reason.encode())]

    try:
        drive_worker(script, down_size=4096)
    finally:
        peer.close()


def test_more_than_the_downlink_ring_holds_waits_for_room_and_loses_nothing():
    """The peer sends 40 KiB into a 4 KiB downlink ring that nobody drains: the lean read
    fills it (whole records read on), stops reading at a full ring, and once the front drains,
    everything arrives, in order, then the FIN's EOF."""
    data = bytes(range(256)) * 160
    peer = _Peer(data, "fin")

    async def script(live: LiveWorker) -> None:
        sock = await _connected(live, peer)
        worker = live.worker
        _hold_until_ended(peer, sock)
        first = worker._read_plain(True)
        assert 0 < first < len(data)
        assert not worker._gate.is_open  # a full ring: reading stopped, waiting for space
        got = bytearray()
        async with asyncio.timeout(20):
            while True:
                batch = _records(live.down)
                for record in batch:
                    if record.kind == records.EOF:
                        assert bytes(got) == data
                        assert record.payload == b"1 peer closed"
                        return
                    got += record.payload
                await asyncio.sleep(0.005)

    try:
        drive_worker(script, down_size=4096)
    finally:
        peer.close()


def test_a_reset_before_the_mcus_data_goes_ends_the_link_on_the_lean_send():
    """The peer resets; the lean send of what the uplink ring holds fails: Ended with the send's
    reason, then the EOF record (the data the peer sent first stays ahead of it)."""
    peer = _Peer(b"", "rst")

    async def script(live: LiveWorker) -> None:
        sock = await _connected(live, peer)
        worker = live.worker
        peer.go.set()
        assert peer.ended.wait(10)
        assert select.select([sock], [], [], 5.0)[0]
        live.up.put_nowait(b"u" * 500)
        assert worker._send_whole() is True
        assert worker.sock is None
        ended = await recv_until(live.control, Ended)
        assert ended.reason.startswith("send failed"), ended.reason
        eof = _records(live.down)
        assert [r.kind for r in eof] == [records.EOF]
        assert eof[0].payload.startswith(b"1 send failed")

    try:
        drive_worker(script, up_size=4096, down_size=4096)
    finally:
        peer.close()


def test_the_lean_send_takes_what_the_ring_holds_in_one_piece_and_leaves_a_wrap_to_sendmsg():
    """What the uplink ring holds in one piece goes in one send (True: that was all); what wraps
    around the end is left to the general loop (False), which sends it whole."""
    peer = _Peer(b"", "open")

    async def script(live: LiveWorker) -> None:
        await _connected(live, peer)
        peer.go.set()
        worker, up = live.worker, live.up
        up.put_nowait(b"a" * 4000)
        assert worker._send_whole() is True
        assert up.available() == 0
        up.put_nowait(b"b" * 200)  # from 4000 on: wraps at 4096
        assert worker._send_whole() is False
        assert up.available() == 200
        worker._on_uplink()
        assert up.available() == 0
        async with asyncio.timeout(10):
            while len(peer.got) < 4200:
                await asyncio.sleep(0.005)
        assert bytes(peer.got) == b"a" * 4000 + b"b" * 200

    try:
        drive_worker(script, up_size=4096, down_size=4096)
    finally:
        peer.close()


def test_a_lean_read_cut_short_by_the_end_of_the_ring_reads_on_from_its_start():
    """The downlink ring's write index sits 108 bytes before the end of its data area: the lean
    read's record holds 100 bytes, shorter than a record although the kernel has more.  That is
    no sign the socket is empty: the rest is read on at once, from the ring's start (else it
    waits for the pause's timer or the next tick, and a FIN behind it with it)."""
    data = bytes(range(256)) * 4  # 1024 bytes
    peer = _Peer(data, "fin")

    async def script(live: LiveWorker) -> None:
        sock = await _connected(live, peer)
        worker, down = live.worker, live.down
        assert records.put_record(down, records.DATA, b"x" * (4096 - 108 - records.HEADER_SIZE))
        assert len(_records(down)) == 1  # consumed: the write index is 108 bytes from the end
        _hold_until_ended(peer, sock)
        got = worker._read_plain(True)
        assert got == len(data)
        assert worker.sock is None  # streaming: read on until the FIN, as the general path does
        out = _records(down)
        assert b"".join(r.payload for r in out if r.kind == records.DATA) == data
        assert [r.payload for r in out if r.kind == records.EOF] == [b"1 peer closed"]

    try:
        drive_worker(script, down_size=4096)
    finally:
        peer.close()
