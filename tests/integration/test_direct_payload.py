"""AT+CIPSEND's payload read straight into the uplink ring (bridged.uart.direct), as drivers send it."""

from __future__ import annotations

import hashlib
import random
import socket
import time

import pytest

from tests.harness import SinkServer


def _open(host, port: int) -> None:
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % port) == b"CONNECT\r\n\r\nOK\r\n"


def _sink_holds(sink: SinkServer, n: int, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while sum(sink.counts.values()) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"the sink holds {sum(sink.counts.values())} of {n} bytes")
        time.sleep(0.01)
    assert sum(sink.counts.values()) == n
    (digest,) = sink.hashes.values()
    return digest.hexdigest()


def _peer_gets(conn: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    """The next ``n`` bytes the peer receives (an EOF or the deadline before them fails)."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < n:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = conn.recv(n - len(got))
        assert chunk, f"the peer's connection ended after {len(got)} of {n} bytes"
        got += chunk
    return got


def _accepting_peer(host) -> tuple[socket.socket, socket.socket]:
    """A loopback server, the host's link to it open: (listener, the peer's end)."""
    server = socket.create_server(("127.0.0.1", 0))
    _open(host, server.getsockname()[1])
    conn, _ = server.accept()
    return server, conn


@pytest.fixture
def small_ring_host(make_daemon):
    """A host on a daemon whose uplink rings are the smallest allowed (4 KiB): sends wrap often."""
    host = make_daemon("[links]\nring_size = 4096\n").host()
    host.boot()
    yield host
    host.close()


def test_sends_across_the_rings_end_arrive_whole(small_ring_host):
    """Sends of every size up to 3 KiB into a 4 KiB ring, each written at once: every byte, in order."""
    host = small_ring_host
    sink = SinkServer()
    try:
        _open(host, sink.port)
        rng = random.Random(7)
        whole = hashlib.sha256()
        total = 0
        for _ in range(60):  # the write index passes the ring's end about 20 times
            payload = rng.randbytes(rng.randint(1, 3072))
            answer = host.send_data(b"AT+CIPSEND=%d" % len(payload), payload)
            assert answer == b"\r\nRecv %d bytes\r\n\r\nSEND OK\r\n" % len(payload)
            whole.update(payload)
            total += len(payload)
        assert _sink_holds(sink, total) == whole.hexdigest()
    finally:
        sink.close()


def test_a_payload_written_in_pieces_with_plus_signs_is_data(small_ring_host):
    """A driver writing its payload in 64-byte pieces, and in 1-3 byte pieces of '+' without the
    guard silence: all of it is data, in order (short reads go through the +++ rules)."""
    host = small_ring_host
    sink = SinkServer()
    try:
        _open(host, sink.port)
        pieces = [bytes([65 + i % 26]) * 64 for i in range(20)]
        pieces[3:3] = [b"+", b"++", b"+++"]
        pieces[10:10] = [b"+++", b"x", b"++"]
        payload = b"".join(pieces)
        host.write(b"AT+CIPSEND=%d\r\n" % len(payload))
        host.expect(b">")
        for piece in pieces:
            host.write(piece)
            time.sleep(0.002)  # well under the 20 ms guard time
        assert host.expect(b"SEND OK\r\n") == b"\r\nRecv %d bytes\r\n\r\nSEND OK\r\n" % len(payload)
        assert _sink_holds(sink, len(payload)) == hashlib.sha256(payload).hexdigest()
    finally:
        sink.close()


def test_plus_escape_after_part_of_the_payload_sends_none_of_it(host):
    """+++ after 100 bytes of a 1000-byte AT+CIPSEND: SEND Canceled, and the 100 bytes that
    were already in the ring's free area never reach the peer, not even with the next send."""
    server, conn = _accepting_peer(host)
    try:
        host.command(b"AT+CIPSEND=1000", b">")
        host.write(b"x" * 100)
        time.sleep(0.05)
        host.write(b"+++")
        assert host.expect(b"\r\nSEND Canceled\r\n", timeout=3) == b"\r\nSEND Canceled\r\n"
        assert host.send_data(b"AT+CIPSEND=5", b"after") == b"\r\nRecv 5 bytes\r\n\r\nSEND OK\r\n"
        assert _peer_gets(conn, 5) == b"after"
        conn.close()
    finally:
        server.close()


def test_surplus_in_the_payloads_last_read_is_refused_busy(host):
    """A payload with a command line behind it in one write: busy p..., Recv, SEND OK; the
    peer gets the payload only, and the command was not run (an AT+CIPCLOSE here)."""
    server, conn = _accepting_peer(host)
    try:
        host.command(b"AT+CIPSEND=600", b">")
        host.write(b"p" * 600 + b"AT+CIPCLOSE\r\n")
        assert host.expect(b"SEND OK\r\n") == b"\r\nbusy p...\r\n\r\nRecv 600 bytes\r\n\r\nSEND OK\r\n"
        assert _peer_gets(conn, 600) == b"p" * 600
        assert host.ask(b"AT+CIPSTATUS").count(b"+CIPSTATUS:") == 1  # still connected
        conn.close()
    finally:
        server.close()


def test_the_peer_closing_mid_payload_fails_the_send_and_sends_nothing(host):
    """The peer closes while half of an AT+CIPSEND's payload is read: the rest still gets
    read, then SEND FAIL, as no byte of it could be admitted to a closed link."""
    server, conn = _accepting_peer(host)
    try:
        host.command(b"AT+CIPSEND=2000", b">")
        host.write(b"a" * 1000)
        conn.close()
        host.expect(b"CLOSED\r\n", timeout=5)
        host.write(b"b" * 1000)
        assert host.expect(b"SEND FAIL\r\n", timeout=5).endswith(b"\r\nRecv 2000 bytes\r\n\r\nSEND FAIL\r\n")
        assert host.command(b"AT") == b"\r\nOK\r\n"
    finally:
        server.close()
