"""Framed records on a ring: put/get, wrap-around, zero-copy receive from sockets."""

from __future__ import annotations

import os
import select
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridged.ipc.records import (
    DATA,
    EOF,
    HEADER_SIZE,
    Record,
    RecordError,
    get_record,
    peek_record_header,
    put_record,
    recv_record,
)
from bridged.ipc.rings import Ring
from tests.ringtools import new_ring

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0
ADDRS = [None, ("192.0.2.1", 5000), ("2001:db8::1", 65535)]


@pytest.fixture
def ring():
    with new_ring() as ring:
        yield ring


def advance(ring: Ring, n: int) -> None:
    """Move both indices forward by n on an empty ring."""
    while n:
        step = ring.put_nowait(bytes(min(n, ring.capacity)))
        assert ring.get_nowait(step) == bytes(step)
        n -= step


def to_slot(ring: Ring, slot: int) -> None:
    """Advance an empty ring until its write index sits at `slot`."""
    advance(ring, (slot - ring.write_index) % ring.capacity)


def wait_readable(sock: socket.socket) -> None:
    assert select.select([sock], [], [], WAIT)[0], "socket not readable in time"


def addr_size(addr) -> int:
    return 0 if addr is None else 4 if "." in addr[0] else 16


# -- put / get -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", [DATA, EOF])
@pytest.mark.parametrize("addr", ADDRS, ids=["noaddr", "v4", "v6"])
@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 3], ids=["0", "1", "768"])
def test_round_trip(ring, kind, addr, payload):
    """Every kind, with no, IPv4 and IPv6 addresses, comes back as it was put."""
    assert put_record(ring, kind, payload, addr)
    assert ring.available() == HEADER_SIZE + addr_size(addr) + len(payload)
    assert get_record(ring) == Record(kind, payload, addr)
    assert get_record(ring) is None
    assert ring.available() == 0


def test_memoryview_payload_and_scope_id(ring):
    """A memoryview payload is accepted; an IPv6 scope id is dropped from the wire."""
    data = bytearray(b"abcdef")
    assert put_record(ring, DATA, memoryview(data)[1:4], ("fe80::1%lo", 7, 0, 1))
    assert get_record(ring) == Record(DATA, b"bcd", ("fe80::1", 7))


def test_eof_reason(ring):
    """An EOF record carries a short UTF-8 reason."""
    put_record(ring, DATA, b"last bytes")
    put_record(ring, EOF, "peer closed ✓".encode())
    assert get_record(ring).payload == b"last bytes"
    record = get_record(ring)
    assert record.kind == EOF and record.payload.decode() == "peer closed ✓"


def test_peek_does_not_consume(ring):
    """peek_record_header describes the next record and leaves it in place."""
    put_record(ring, DATA, b"hello", ("10.0.0.1", 80))
    header = peek_record_header(ring)
    assert (header.kind, header.length, header.addr) == (DATA, 5, ("10.0.0.1", 80))
    assert header.size == HEADER_SIZE + 4 and header.total == HEADER_SIZE + 9
    assert ring.available() == header.total
    assert b"".join(ring.readable_views(header.length, skip=header.size)) == b"hello"
    assert get_record(ring).payload == b"hello"


def test_peek_walks_records_without_consuming(ring):
    """peek_record_header(skip=sum of totals) visits each record in turn, consuming none."""
    to_slot(ring, ring.capacity - 30)
    sent = [Record(DATA, b"one", ("10.0.0.1", 1)), Record(EOF, b""), Record(DATA, b"three")]
    for record in sent:
        put_record(ring, record.kind, record.payload, record.addr)
    skip, seen = 0, []
    while (header := peek_record_header(ring, skip)) is not None:
        seen.append((header.kind, header.addr, ring.peek(header.length, skip + header.size)))
        skip += header.total
    assert seen == [(r.kind, r.addr, r.payload) for r in sent]
    assert skip == ring.available()
    assert [get_record(ring) for _ in sent] == sent


@pytest.mark.parametrize("addr", ADDRS, ids=["noaddr", "v4", "v6"])
def test_wrap_at_every_split(ring, addr):
    """A record starting at any slot near the end (header, address or payload split) round-trips."""
    payload = os.urandom(40)
    total = HEADER_SIZE + addr_size(addr) + len(payload)
    for slot in range(ring.capacity - total - 1, ring.capacity + 1):
        to_slot(ring, slot)
        assert put_record(ring, DATA, payload, addr)
        assert get_record(ring) == Record(DATA, payload, addr), slot
        assert ring.available() == 0


def test_full_ring_publishes_nothing(ring):
    """A record that does not fit now returns False: no index move, no doorbell."""
    ring.put_nowait(bytes(ring.capacity - 20))
    ring.clear_data_doorbell()
    write = ring.write_index
    assert not put_record(ring, DATA, bytes(13))  # 8 + 13 = 21 > 20
    assert ring.write_index == write and not ring.clear_data_doorbell()
    assert put_record(ring, DATA, bytes(12))  # exactly fills it
    assert ring.free() == 0


@pytest.mark.parametrize(
    "kind, payload, addr",
    [
        (3, b"", None),
        (0, b"", None),
        (DATA, bytes(4096), None),
        (DATA, b"", ("not-an-ip", 1)),
        (DATA, b"", ("1.2.3.4", 70000)),
    ],
)
def test_bad_records_are_refused(ring, kind, payload, addr):
    """Unknown kinds, oversized records and bad addresses raise ValueError."""
    with pytest.raises(ValueError):
        put_record(ring, kind, payload, addr)
    assert ring.write_index == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"\x05\x00\x00",  # shorter than a header
        b"\x00\x00\x00\x00\x00\x00\x01\x07",  # address length 7
        b"\x00\x00\x00\x00\x00\x00\x09\x00",  # kind 9
        b"\x64\x00\x00\x00\x00\x00\x01\x00abc",  # says 100 bytes, holds 3
    ],
)
def test_corrupt_ring_raises(ring, raw):
    """Bytes that are not a record raise RecordError instead of being misread."""
    ring.put_nowait(raw)
    with pytest.raises(RecordError):
        get_record(ring)


record_st = st.tuples(
    st.sampled_from([DATA, EOF]), st.integers(0, 1500), st.sampled_from(ADDRS)
)


@settings(max_examples=100, deadline=None)
@given(
    start=st.integers(0, 4095),
    steps=st.lists(st.one_of(record_st, st.integers(0, 3)), max_size=40),
)
def test_random_records(start, steps):
    """Any mix of puts and gets at any start slot yields the records in order, whole."""
    with new_ring(4096) as ring:
        advance(ring, start)
        pending: list[Record] = []
        for i, step in enumerate(steps):
            if isinstance(step, int):
                for _ in range(step):
                    assert get_record(ring) == (pending.pop(0) if pending else None)
                continue
            kind, size, addr = step
            record = Record(kind, bytes([i % 256]) * size, addr)
            fits = ring.free() >= HEADER_SIZE + addr_size(addr) + size
            assert put_record(ring, kind, record.payload, addr) == fits
            if fits:
                pending.append(record)
        while pending:
            assert get_record(ring) == pending.pop(0)
        assert get_record(ring) is None


# -- recv_record from a stream socket ------------------------------------------------------


@pytest.fixture
def stream():
    a, b = socket.socketpair()
    b.setblocking(False)
    with a, b:
        yield a, b


def test_stream_receive(ring, stream):
    """Bytes on a stream socket become DATA records; max_payload caps each one."""
    a, b = stream
    with pytest.raises(BlockingIOError):
        recv_record(ring, b, 1024)
    assert ring.available() == 0
    data = os.urandom(3000)
    a.sendall(data)
    assert recv_record(ring, b, 1024) == 1024
    assert recv_record(ring, b, 2048) == 1976
    assert get_record(ring) == Record(DATA, data[:1024])
    assert get_record(ring) == Record(DATA, data[1024:])


def test_fill_gathers_message_sized_reads_into_one_record(ring):
    """A socket that returns one message per read (as TLS returns one record):
    with fill, what is there now becomes one record, up to max_payload; the
    end still reads as 0 on the next call."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setblocking(False)
    with a, b:
        pieces = [os.urandom(300) for _ in range(4)]
        for piece in pieces:
            a.send(piece)
        assert recv_record(ring, b, 600, datagram=False) == 300  # one message without fill
        assert recv_record(ring, b, 600, datagram=False, fill=True) == 600  # two, then full
        a.send(b"tail")
        a.close()
        assert recv_record(ring, b, 600, datagram=False, fill=True) == 300 + 4
        assert recv_record(ring, b, 600, datagram=False, fill=True) == 0
        assert [r.payload for r in iter(lambda: get_record(ring), None)] == [
            pieces[0], pieces[1] + pieces[2], pieces[3] + b"tail"]


def test_stream_eof(ring, stream):
    """An orderly close reads as 0 and publishes nothing."""
    a, b = stream
    a.sendall(b"bye")
    a.shutdown(socket.SHUT_WR)
    assert recv_record(ring, b, 100) == 3
    assert recv_record(ring, b, 100) == 0
    assert get_record(ring) == Record(DATA, b"bye") and get_record(ring) is None


@pytest.mark.parametrize("gap", range(1, HEADER_SIZE + 1))
def test_stream_header_wrap(ring, stream, gap):
    """With the header split across the end, the payload lands after the wrap."""
    a, b = stream
    to_slot(ring, ring.capacity - gap)
    a.sendall(b"payload after the wrap")
    assert recv_record(ring, b, 100) == 22
    assert get_record(ring) == Record(DATA, b"payload after the wrap")


def test_stream_payload_wrap(ring, stream):
    """A payload room that wraps takes the contiguous part first, the rest next call."""
    a, b = stream
    to_slot(ring, ring.capacity - HEADER_SIZE - 5)
    a.sendall(b"0123456789")
    assert recv_record(ring, b, 100) == 5
    assert recv_record(ring, b, 100) == 5
    assert [get_record(ring), get_record(ring)] == [Record(DATA, b"01234"), Record(DATA, b"56789")]


def test_stream_no_room(ring, stream):
    """Without room for a header and one byte, -1 and the socket is not read."""
    a, b = stream
    ring.put_nowait(bytes(ring.capacity - HEADER_SIZE))
    a.sendall(b"waiting")
    assert recv_record(ring, b, 100) == -1
    ring.get_nowait(1)
    assert recv_record(ring, b, 100) == 1
    assert b.recv(100) == b"aiting"


def test_bad_arguments(ring, stream):
    """max_payload over half the ring, or an address from a stream socket, is refused."""
    with pytest.raises(ValueError):
        recv_record(ring, stream[1], ring.capacity // 2 + 1)
    with pytest.raises(ValueError):
        recv_record(ring, stream[1], 100, with_addr=True)


# -- recv_record from UDP -----------------------------------------------------------------


def udp_pair(family=socket.AF_INET, host="127.0.0.1"):
    rx = socket.socket(family, socket.SOCK_DGRAM)
    tx = socket.socket(family, socket.SOCK_DGRAM)
    rx.bind((host, 0))
    tx.bind((host, 0))
    rx.setblocking(False)
    return rx, tx


@pytest.fixture
def udp():
    rx, tx = udp_pair()
    with rx, tx:
        yield rx, tx


def test_udp_keeps_sender_address(ring, udp):
    """Each datagram is one record carrying the sender's IPv4 address and port."""
    rx, tx = udp
    for data in (b"first", b"second datagram"):
        tx.sendto(data, rx.getsockname())
    for data in (b"first", b"second datagram"):
        wait_readable(rx)
        assert recv_record(ring, rx, 1500, with_addr=True) == len(data)
    for data in (b"first", b"second datagram"):
        assert get_record(ring) == Record(DATA, data, tx.getsockname())


def test_udp_ipv6_address():
    """An IPv6 sender address is stored as 16 bytes and comes back as text."""
    try:
        rx, tx = udp_pair(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    with rx, tx, new_ring() as ring:
        tx.sendto(b"v6", rx.getsockname())
        wait_readable(rx)
        assert recv_record(ring, rx, 1500, with_addr=True) == 2
        assert ring.available() == HEADER_SIZE + 16 + 2
        assert get_record(ring) == Record(DATA, b"v6", ("::1", tx.getsockname()[1]))


@pytest.mark.parametrize("before_end", [3, HEADER_SIZE + 4 + 1, HEADER_SIZE + 4 + 700])
def test_udp_datagram_wrap(ring, udp, before_end):
    """A datagram whose room wraps is received whole into both segments."""
    rx, tx = udp
    data = os.urandom(1400)
    to_slot(ring, ring.capacity - before_end)
    tx.sendto(data, rx.getsockname())
    wait_readable(rx)
    assert recv_record(ring, rx, 1500, with_addr=True) == 1400
    assert get_record(ring) == Record(DATA, data, tx.getsockname())


def test_udp_needs_room_for_a_whole_datagram(ring, udp):
    """With less than header + max_payload free, -1 and the datagram stays queued."""
    rx, tx = udp
    ring.put_nowait(bytes(ring.capacity - 1000))
    tx.sendto(b"small", rx.getsockname())
    wait_readable(rx)
    assert recv_record(ring, rx, 1500, with_addr=True) == -1
    ring.discard_all()
    assert recv_record(ring, rx, 1500) == 5
    assert get_record(ring) == Record(DATA, b"small", None)


def test_udp_truncates_and_drops_empty(ring, udp):
    """A datagram over max_payload is cut to it; an empty one is dropped."""
    rx, tx = udp
    data = os.urandom(3000)
    tx.sendto(data, rx.getsockname())
    tx.sendto(b"", rx.getsockname())
    wait_readable(rx)
    assert recv_record(ring, rx, 1000, with_addr=True) == 1000
    assert recv_record(ring, rx, 1000, with_addr=True) == 0
    with pytest.raises(BlockingIOError):
        recv_record(ring, rx, 1000, with_addr=True)
    assert get_record(ring) == Record(DATA, data[:1000], tx.getsockname())
    assert get_record(ring) is None
