"""Framed records on a Ring: the downlink from a link worker to the front.

Theory of operation
-------------------
The worker is the ring's only producer and the front its only consumer (see
``rings``). Records are packed back to back and wrap freely around the end
of the data area::

    u32 payload length | u16 remote port | u8 kind | u8 address length
    address (0, 4 or 16 bytes: packed IPv4 / IPv6) | payload

all little-endian (``struct "<IHBB"``). A record is staged completely in the
free area and published by one ``commit()``, so the consumer sees all of it or
none of it; a published header therefore always has its payload behind it,
and anything else is a corrupt ring (``RecordError``).

``recv_record`` is the zero-copy path: it reserves the header, lets the
kernel write the payload straight into the ring, then writes the header in
front of it and commits. A stream socket receives into the first contiguous
payload segment only (a plain ``recv_into``, so TLS sockets work too; the
next call continues after the wrap). A datagram must land whole, so when its
room wraps it is received with ``recvmsg_into`` into both segments.

Kinds: ``DATA`` (payload bytes from the peer) and ``EOF`` (peer or link
closed; the payload may carry a short UTF-8 reason).
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

from bridged.ipc.rings import Ring

__all__ = [
    "DATA",
    "EOF",
    "HEADER_SIZE",
    "Record",
    "RecordError",
    "RecordHeader",
    "STREAM_DATA",
    "get_record",
    "peek_record_header",
    "put_record",
    "recv_record",
    "take_records",
]

DATA = 1
EOF = 2
_KINDS = frozenset({DATA, EOF})
_HEADER = struct.Struct("<IHBB")
HEADER_SIZE = _HEADER.size
# A stream's DATA record through Ring.recv_behind (the lean read): ring.recv_behind(sock, limit, *STREAM_DATA).
STREAM_DATA = (_HEADER, 0, DATA, 0)  # the header's struct, then its fields after the length: port, kind, address length
_ADDR_LEN = {socket.AF_INET: 4, socket.AF_INET6: 16}

Addr = tuple[str, int]


class RecordError(ValueError):
    """The ring holds something that is not a well-formed record (a bug)."""


# Named tuples, not dataclasses: one is built for every record on the hot path.
class Record(NamedTuple):
    kind: int
    payload: bytes
    addr: Addr | None = None


class RecordHeader(NamedTuple):
    """A published record's header; ``size`` bytes precede the payload."""

    kind: int
    length: int
    addr: Addr | None
    size: int
    total: int  # size + length: the record's bytes in the ring


def _pack_addr(addr: tuple | None) -> tuple[bytes, int]:
    """(packed address, port) from an (host, port[, flow, scope]) tuple."""
    if addr is None:
        return b"", 0
    host, port = addr[0].split("%", 1)[0], addr[1]  # the scope id has no place on the wire
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.inet_pton(family, host), port
    except OSError as exc:
        raise ValueError(f"not an IP address: {host!r}") from exc


def _unpack_addr(packed: bytes, port: int) -> Addr:
    family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, packed), port


def _header(kind: int, length: int, addr: tuple | None) -> bytes:
    packed, port = _pack_addr(addr)
    return _HEADER.pack(length, port, kind, len(packed)) + packed


def put_record(
    ring: Ring, kind: int, payload: bytes | memoryview = b"", addr: tuple | None = None
) -> bool:
    """Publish one record; return False (publishing nothing) if it does not fit now.

    Raises:
        ValueError: unknown kind, bad address, or a record larger than the ring.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown record kind {kind}")
    with memoryview(payload) as view, view.cast("B") as flat:
        head = _header(kind, len(flat), addr)
        total = len(head) + len(flat)
        if total > ring.capacity:
            raise ValueError(f"record of {total} bytes can never fit a {ring.capacity}-byte ring")
        if ring.free() < total:
            return False
        ring.stage(0, head)
        ring.stage(len(head), flat)
        ring.commit(total)  # the one publication: all or nothing
    return True


def recv_record(
    ring: Ring, sock: socket.socket, max_payload: int, with_addr: bool = False, datagram: bool | None = None,
    fill: bool = False,
) -> int:
    """Receive from a non-blocking socket straight into the ring as a DATA record.

    Args:
        max_payload: the largest payload to take (at most capacity / 2). A
            longer datagram is truncated to it, as ``recvfrom`` would.
        with_addr: store the sender's address (datagram sockets only).
        datagram: whether ``sock`` is a datagram socket, if the caller knows
            (asking the socket builds an enum on every call).
        fill: keep reading into the same record while the socket has more
            (a TLS socket returns one TLS record per read; a TCP socket
            returns all it has at once and needs no second read).

    Returns:
        The payload length published. 0 from a stream socket means orderly
        EOF (nothing published; the caller puts an EOF record); 0 from a
        datagram socket means an empty datagram, which is dropped. -1 means
        the ring has no room (header plus 1 byte for a stream, header plus
        ``max_payload`` for a datagram) and nothing was read.

    Raises:
        BlockingIOError: nothing to read. Other OSErrors propagate; in every
        error case nothing is published.
    """
    if not 0 < max_payload <= ring.capacity // 2:
        raise ValueError(f"max_payload must be in 1..{ring.capacity // 2}")
    if datagram is None:
        datagram = sock.type == socket.SOCK_DGRAM
    if not datagram and not with_addr:  # the hot path of every TCP link: few calls
        span = ring.reserve(HEADER_SIZE, max_payload)
        if span is None:
            return -1
        n = sock.recv_into(span)  # a wrapped rest comes with the next call
        if fill and n:
            n = _fill(sock, span, n)
        if n:
            ring.publish(_HEADER.pack(n, 0, DATA, 0), n)
        return n
    head_size = HEADER_SIZE + _addr_len(sock, datagram, with_addr) if with_addr else HEADER_SIZE
    views = ring.writable_views(max_payload, skip=head_size)
    if sum(len(v) for v in views) < max_payload:
        return -1  # (no views at all: the read index was mid-update, on CPUs without atomic 64-bit stores)
    n, addr = _recv_datagram(sock, views)
    if n == 0:
        return 0
    ring.stage(0, _header(DATA, n, addr) if with_addr else _HEADER.pack(n, 0, DATA, 0))
    ring.commit(head_size + n)
    return n


def _addr_len(sock: socket.socket, datagram: bool, with_addr: bool) -> int:
    if not with_addr:
        return 0
    if not datagram or sock.family not in _ADDR_LEN:
        raise ValueError("with_addr needs an AF_INET or AF_INET6 datagram socket")
    return _ADDR_LEN[sock.family]


def _fill(sock: socket.socket, span: memoryview, n: int) -> int:
    """Read on into ``span`` after ``n`` bytes until the socket has no more now."""
    while n < len(span):
        try:
            got = sock.recv_into(span[n:])
        except OSError:
            break  # nothing more yet (want-read), or an error the next read reports again
        if not got:
            break  # the end: the next read reports it
        n += got
    return n


def _recv_datagram(sock: socket.socket, views: list[memoryview]) -> tuple[int, tuple]:
    if len(views) == 1:
        return sock.recvfrom_into(views[0])
    # The room wraps: scatter the datagram over both segments, still no copy.
    n, _ancdata, _flags, addr = sock.recvmsg_into(views)
    return n, addr


def peek_record_header(ring: Ring, skip: int = 0) -> RecordHeader | None:
    """Return the header of the record ``skip`` bytes past the read index
    without consuming anything (None if no record starts there).

    ``skip`` must be 0 or the end of an earlier record (a sum of ``total``s).

    Raises:
        RecordError: the published bytes are not a well-formed record.
    """
    data, read, used = ring.published()
    available = used - skip
    if available <= 0:
        return None
    slot = (read + skip) & (len(data) - 1)
    if available >= HEADER_SIZE and slot + HEADER_SIZE <= len(data):  # the usual record, parsed inline
        length, _port, kind, addr_len = _HEADER.unpack_from(data, slot)
        if not addr_len and kind in _KINDS and available >= HEADER_SIZE + length:
            return tuple.__new__(RecordHeader, (kind, length, None, HEADER_SIZE, HEADER_SIZE + length))
    kind, length, addr, size = _parse(data, slot, available)
    return tuple.__new__(RecordHeader, (kind, length, addr, size, size + length))


def get_record(ring: Ring) -> Record | None:
    """Consume and return the next record (None if none); one copy of the payload."""
    header = peek_record_header(ring)
    if header is None:
        return None
    payload = ring.peek(header.length, header.size)
    ring.consume(header.total)
    return Record(header.kind, payload, header.addr)


def take_records(ring: Ring, budget: int, overhead: int = 0) -> tuple[list[Record], bool]:
    """Consume and return the next records in order: while their costs (payload
    length + ``overhead`` each) total less than ``budget`` (so one at least, if
    budget > 0), up to and including the first EOF; and whether more were
    published then.  ``overhead``: what the caller adds per record (the +IPD
    head), so that a flood of tiny records stays within the budget too.

    The lean form of ``get_record`` in a loop, for the front's +IPD delivery:
    the indices are loaded once, each header is parsed in place, each payload
    copied once, and one consume (one space doorbell) frees them all.

    Raises:
        RecordError: the first record is not well formed (after later ones, the
            ones before it are returned and the next call raises).
    """
    data, read, used = ring.published()
    capacity = len(data)
    mask = capacity - 1
    taken: list[Record] = []
    pos = 0
    while pos < used and budget > 0:
        slot = (read + pos) & mask
        left = used - pos
        if slot + HEADER_SIZE <= capacity and left >= HEADER_SIZE:  # the usual record, parsed inline
            length, _port, kind, addr_len = _HEADER.unpack_from(data, slot)
            size, addr = HEADER_SIZE, None
        else:
            addr_len = -1  # wrapped or short: _parse says which
        if addr_len or kind not in _KINDS or left < size + length:  # (or not parsed yet)
            try:
                kind, length, addr, size = _parse(data, slot, left)
            except RecordError:
                if taken:
                    break
                raise
        start = (slot + size) & mask
        end = start + length
        payload = data[start:end].tobytes() if end <= capacity else _wrapped(data, start, length)
        taken.append(tuple.__new__(Record, (kind, payload, addr)))  # Record(...) without its Python __new__
        pos += size + length
        budget -= length + overhead
        if kind == EOF:
            break  # what follows may be a new connection's: the caller ends this one first
    if pos:
        ring.consume(pos)
    return taken, pos < used


def _parse(data: memoryview, slot: int, available: int) -> tuple[int, int, Addr | None, int]:
    """(kind, payload length, address, header size) of the record at ``slot``."""
    if available < HEADER_SIZE:
        raise RecordError(f"{available} bytes published, shorter than a record header")
    if slot + HEADER_SIZE <= len(data):
        length, port, kind, addr_len = _HEADER.unpack_from(data, slot)
    else:
        length, port, kind, addr_len = _HEADER.unpack(_wrapped(data, slot, HEADER_SIZE))
    if kind not in _KINDS or addr_len not in (0, 4, 16):
        raise RecordError(f"bad record header: kind {kind}, address length {addr_len}")
    size = HEADER_SIZE + addr_len
    if available < size + length:
        raise RecordError(f"record of {size + length} bytes but {available} published")
    addr = None
    if addr_len:
        at = (slot + HEADER_SIZE) & (len(data) - 1)
        addr = _unpack_addr(_wrapped(data, at, addr_len), port)
    return kind, length, addr, size


def _wrapped(data: memoryview, slot: int, length: int) -> bytes:
    """``length`` bytes from ``slot`` of the data area, on past its end to its start."""
    first = min(length, len(data) - slot)
    return data[slot : slot + first].tobytes() + data[: length - first].tobytes()
