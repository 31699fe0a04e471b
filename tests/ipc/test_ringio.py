"""Ring.send_to and Ring.recv_behind (bridged.ipc.ringio): the one-call stream moves of a link
worker's hot paths, on real rings and real sockets (a socketpair, a loopback TCP pair)."""

from __future__ import annotations

import os
import select
import socket
import struct

import pytest

from bridged.ipc import records, ringio, rings
from bridged.ipc.rings import Ring
from tests.ringtools import new_ring

pytestmark = pytest.mark.timeout(60)

HEAD = struct.Struct("<IHBB")


def rung(fd: int) -> int:
    """The doorbell's count, cleared (0: not ringing)."""
    if not select.select([fd], [], [], 0)[0]:
        return 0
    return os.eventfd_read(fd)


def advance(ring: Ring, n: int) -> None:
    """Move both indices forward by n on an empty ring."""
    while n:
        step = ring.put_nowait(bytes(min(n, ring.capacity)))
        assert ring.get_nowait(step) == bytes(step)
        n -= step
    rung(ring.data_fd)
    rung(ring.space_fd)


def stream_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_the_index_layout_is_the_rings():
    """ringio's copies of the header's index items are rings' own."""
    assert (ringio._WRITE, ringio._READ, ringio._QUIET) == (rings._WRITE, rings._READ, rings._QUIET)


# -- send_to ------------------------------------------------------------------------


def test_send_to_sends_what_is_published_and_consumes_it():
    """All the published bytes go in one send, the ring is empty after, and the space
    doorbell rings (the producer did not say it need not)."""
    a, b = stream_pair()
    with new_ring(4096) as ring, a, b:
        ring.put_nowait(b"x" * 1000)
        assert ring.send_to(a) == (1000, 0)
        assert b.recv(4096) == b"x" * 1000
        assert ring.available() == 0
        assert rung(ring.space_fd) == 1


def test_send_to_with_nothing_published_sends_nothing():
    a, b = stream_pair()
    with new_ring(4096) as ring, a, b:
        assert ring.send_to(a) == (0, 0)
        with pytest.raises(BlockingIOError):
            b.recv(10)
        assert rung(ring.space_fd) == 0


def test_send_to_leaves_data_that_wraps_to_the_general_path():
    """Published bytes that wrap around the end go nowhere: (0, n), nothing consumed."""
    a, b = stream_pair()
    with new_ring(4096) as ring, a, b:
        advance(ring, 4000)
        ring.put_nowait(b"y" * 200)
        assert ring.send_to(a) == (0, 200)
        assert ring.available() == 200
        with pytest.raises(BlockingIOError):
            b.recv(10)


def test_send_to_consumes_only_what_the_socket_took():
    """A socket with little room takes part: that part is consumed, the rest stays in order."""
    a, b = stream_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with new_ring(1 << 16) as ring, a, b:
        data = os.urandom(60000)
        ring.put_nowait(data)
        got = bytearray()
        sent, left = ring.send_to(a)
        assert 0 < sent < len(data) and left == len(data) - sent
        assert ring.available() == left
        while ring.available():
            got += b.recv(65536)
            try:
                ring.send_to(a)
            except BlockingIOError:
                pass
        while len(got) < len(data):
            got += b.recv(65536)
        assert bytes(got) == data


def test_send_to_on_a_full_socket_raises_and_consumes_nothing():
    a, b = stream_pair()
    with new_ring(4096) as ring, a, b:
        with pytest.raises(BlockingIOError):
            while True:
                a.send(bytes(65536))
        ring.put_nowait(b"z" * 100)
        with pytest.raises(BlockingIOError):
            ring.send_to(a)
        assert ring.available() == 100


def test_send_to_on_a_reset_socket_raises_and_consumes_nothing():
    a, b = stream_pair()
    with new_ring(4096) as ring, a:
        b.close()
        ring.put_nowait(b"z" * 100)
        with pytest.raises(OSError):
            ring.send_to(a)
        assert ring.available() == 100


def test_send_to_rings_no_space_doorbell_when_told_not_to_and_owes_it_while_held():
    a, b = stream_pair()
    with new_ring(4096) as ring, a, b:
        ring.want_space_doorbell(False)
        ring.put_nowait(b"q" * 10)
        assert ring.send_to(a) == (10, 0)
        assert rung(ring.space_fd) == 0
        ring.want_space_doorbell(True)
        ring.hold_doorbells()
        ring.put_nowait(b"q" * 10)
        assert ring.send_to(a) == (10, 0)
        assert rung(ring.space_fd) == 0
        ring.release_doorbells()
        assert rung(ring.space_fd) == 1
        assert b.recv(100) == b"q" * 20


# -- recv_behind ------------------------------------------------------------------------


def test_recv_behind_publishes_one_record_and_rings_once():
    """What the socket holds becomes one DATA record, read back whole by the consumer."""
    a, b = stream_pair()
    with new_ring(4096) as ring, a, b:
        b.send(b"hello" * 100)
        assert ring.recv_behind(a, 1024, *records.STREAM_DATA) == 500
        assert rung(ring.data_fd) == 1
        assert records.get_record(ring) == records.Record(records.DATA, b"hello" * 100, None)


def test_recv_behind_takes_at_most_the_limit():
    a, b = stream_pair()
    with new_ring(4096) as ring, a, b:
        b.send(bytes(range(256)) * 8)
        assert ring.recv_behind(a, 1000, *records.STREAM_DATA) == 1000
        assert ring.recv_behind(a, 1000, *records.STREAM_DATA) == 1000
        assert ring.recv_behind(a, 1000, *records.STREAM_DATA) == 48
        payload = b"".join(records.get_record(ring).payload for _ in range(3))
        assert payload == bytes(range(256)) * 8


def test_recv_behind_with_nothing_to_read_raises_and_publishes_nothing():
    a, b = stream_pair()
    with new_ring(4096) as ring, a, b:
        with pytest.raises(BlockingIOError):
            ring.recv_behind(a, 1024, *records.STREAM_DATA)
        assert ring.available() == 0
        assert rung(ring.data_fd) == 0


def test_recv_behind_at_eof_returns_0_and_publishes_nothing():
    a, b = stream_pair()
    with new_ring(4096) as ring, a:
        b.close()
        assert ring.recv_behind(a, 1024, *records.STREAM_DATA) == 0
        assert ring.available() == 0
        assert rung(ring.data_fd) == 0


def test_recv_behind_after_a_reset_gives_the_data_then_raises():
    """A TCP peer's data, then its reset: the data comes as a record, then ECONNRESET, nothing more."""
    server = socket.create_server(("127.0.0.1", 0))
    with server, new_ring(4096) as ring:
        a = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with a:
            a.setblocking(False)
            peer.sendall(b"d" * 700)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()  # RST
            select.select([a], [], [], 5.0)
            assert ring.recv_behind(a, 1024, *records.STREAM_DATA) == 700
            with pytest.raises(ConnectionResetError):
                ring.recv_behind(a, 1024, *records.STREAM_DATA)
            assert records.get_record(ring).payload == b"d" * 700
            assert ring.available() == 0


def test_recv_behind_with_no_room_reads_nothing():
    """A ring too full for a header and a byte: -1, the socket's data stays for later."""
    a, b = stream_pair()
    with new_ring(4096) as ring, a, b:
        ring.put_nowait(bytes(4096 - HEAD.size))
        b.send(b"w" * 10)
        assert ring.recv_behind(a, 1024, *records.STREAM_DATA) == -1
        assert ring.available() == 4096 - HEAD.size
        assert a.recv(100) == b"w" * 10


def test_recv_behind_leaves_a_head_that_would_wrap_to_the_general_path():
    """A header that would straddle the end of the data area: -1, nothing read;
    recv_record (the general path) puts the same record across the wrap."""
    a, b = stream_pair()
    with new_ring(4096) as ring, a, b:
        advance(ring, 4096 - 3)
        b.send(b"v" * 50)
        assert ring.recv_behind(a, 1024, *records.STREAM_DATA) == -1
        assert ring.available() == 0
        assert records.recv_record(ring, a, 1024) == 50
        assert records.get_record(ring).payload == b"v" * 50


def test_recv_behind_stops_at_the_end_of_the_data_area():
    """Room that wraps: the record takes what fits up to the end, the rest comes with the next call."""
    a, b = stream_pair()
    with new_ring(4096) as ring, a, b:
        advance(ring, 4096 - 100)
        b.send(bytes(range(200)))
        assert ring.recv_behind(a, 1024, *records.STREAM_DATA) == 100 - HEAD.size
        assert ring.recv_behind(a, 1024, *records.STREAM_DATA) == 200 - (100 - HEAD.size)
        assert b"".join(records.get_record(ring).payload for _ in range(2)) == bytes(range(200))


def test_recv_behind_owes_its_doorbell_while_held():
    a, b = stream_pair()
    with new_ring(4096) as ring, a, b:
        ring.hold_doorbells()
        b.send(b"h" * 10)
        assert ring.recv_behind(a, 1024, *records.STREAM_DATA) == 10
        assert rung(ring.data_fd) == 0
        ring.release_doorbells()
        assert rung(ring.data_fd) == 1
