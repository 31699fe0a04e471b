"""SEND OK on ring admission: the uplink ring plus the socket buffer are the
"protocol stack" ESP-AT's SEND OK refers to.

A stopped link worker (SIGSTOP) takes nothing from its uplink ring, so what
gets SEND OK meanwhile was admitted, not sent.  The watchdog's heartbeats
are slowed so it does not kill the stopped worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import struct
import threading
import time

import pytest

from tests.harness import Daemon, Timeout, udp_peer

_RING = 65536  # [links] ring_size
_PIECE = 2048
_CONFIG = f"[links]\nring_size = {_RING}\n[watchdog]\nheartbeat_ms = 60000\n"


@pytest.fixture
def peer():
    """A TCP server whose accepted socket the test reads only when it wants."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield server
    server.close()


@contextlib.contextmanager
def _stopped(pid: int):
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _connect(make_daemon, peer):
    daemon: Daemon = make_daemon(_CONFIG)
    host = daemon.host()
    host.boot()
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % peer.getsockname()[1]) == b"CONNECT\r\n\r\nOK\r\n"
    conn, _ = peer.accept()
    return daemon, host, conn


def _send(host, payload: bytes, timeout: float) -> bytes:
    host.write(b"AT+CIPSEND=%d\r\n" % len(payload))
    host.expect(b">")
    host.write(payload)
    host.expect(b"\r\nRecv %d bytes\r\n" % len(payload))
    return host.expect(b"\r\nSEND ", timeout) + host.expect(b"\r\n")


def _reset(conn: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a peer that aborts."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _fill_the_ring(host) -> None:
    """With the worker stopped: sends that fill the uplink ring get SEND OK, the next one waits for room."""
    for _ in range(_RING // _PIECE):
        assert _send(host, os.urandom(_PIECE), timeout=2) == b"\r\nSEND OK\r\n"
    with pytest.raises(Timeout):
        _send(host, os.urandom(_PIECE), timeout=0.5)


def test_send_ok_while_the_peer_is_not_reading(make_daemon, peer):
    """With the worker stopped, every send that fits the ring gets SEND OK at once; the
    next one waits for room; the peer then gets every byte in order."""
    daemon, host, conn = _connect(make_daemon, peer)
    pieces = [os.urandom(_PIECE) for _ in range(_RING // _PIECE + 1)]
    with _stopped(daemon.worker_pid(0)):
        for piece in pieces[:-1]:
            assert _send(host, piece, timeout=2) == b"\r\nSEND OK\r\n"
        with pytest.raises(Timeout):  # the ring is full: the last one waits
            _send(host, pieces[-1], timeout=0.5)
    assert host.expect(b"\r\nSEND OK\r\n", timeout=5) == b"\r\nSEND OK\r\n"  # room again
    expected = b"".join(pieces)
    got = bytearray()
    conn.settimeout(5)
    while len(got) < len(expected):
        data = conn.recv(65536)
        assert data, len(got)
        got += data
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
    assert host.command(b"AT") == b"\r\nOK\r\n"
    conn.close()


def test_send_fail_when_the_link_closes_mid_admission(make_daemon, peer):
    """A send waiting for ring room whose link the peer resets ends with SEND FAIL, then CLOSED."""
    daemon, host, conn = _connect(make_daemon, peer)
    with _stopped(daemon.worker_pid(0)):
        _fill_the_ring(host)
        _reset(conn)  # the worker finds the reset when it runs again
    assert host.expect(b"CLOSED\r\n", timeout=5) == b"\r\nSEND FAIL\r\nCLOSED\r\n"
    assert host.command(b"AT") == b"\r\nOK\r\n"


def test_closed_after_admitted_data_is_lost_to_a_reset(make_daemon, peer):
    """Data that had SEND OK and then went down with a reset is reported as ESP-AT does: CLOSED, no SEND FAIL."""
    daemon, host, conn = _connect(make_daemon, peer)
    with _stopped(daemon.worker_pid(0)):
        for _ in range(3):
            assert _send(host, os.urandom(_PIECE), timeout=2) == b"\r\nSEND OK\r\n"
        _reset(conn)
    assert host.expect(b"CLOSED\r\n", timeout=5) == b"CLOSED\r\n"
    assert host.ask(b"AT+CIPSTATUS").startswith(b"STATUS:4\r\n")


def test_close_after_send_ok_delivers_what_was_admitted(make_daemon, peer):
    """AT+CIPCLOSE right after SEND OK hands the peer every admitted byte before the FIN,
    also the megabytes the socket could not take yet when the close came."""
    daemon: Daemon = make_daemon("[links]\ncount = 1\nring_size = 4194304\n[watchdog]\nheartbeat_ms = 60000\n")
    host = daemon.host()
    host.boot()
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % peer.getsockname()[1]) == b"CONNECT\r\n\r\nOK\r\n"
    conn, _ = peer.accept()  # reads nothing until the close
    payload = os.urandom((4 << 20) - 65536)  # more than a non-reading peer's socket takes (2.8 MB here)
    with _stopped(daemon.worker_pid(0)):
        host.write(b"AT+CIPSENDL=%d\r\n" % len(payload))
        host.expect(b">")
        host.write(payload)
        host.expect(b"SEND OK\r\n", timeout=10)
        host.write(b"AT+CIPCLOSE\r\n")
        time.sleep(0.1)  # the close waits in the stopped worker's control socket
    time.sleep(0.3)  # the worker fills the socket, then takes the close
    got = bytearray()
    conn.settimeout(5)
    while data := conn.recv(1 << 20):
        got += data
    assert len(got) == len(payload) and bytes(got) == payload
    assert host.expect(b"\r\nOK\r\n", timeout=5) == b"CLOSED\r\n\r\nOK\r\n"
    conn.close()


def test_so_sndtimeo_never_drops_what_had_send_ok(make_daemon, peer):
    """A send that times out for ring room (so_sndtimeo) fails alone: the sends ahead of
    it in the full ring had SEND OK, and every byte of them still reaches the peer, in
    order, once it reads (the timeout dropped everything unsent up to the failed send)."""
    daemon, host, conn = _connect(make_daemon, peer)
    host.command(b"AT+CIPTCPOPT=-1,0,300")
    sent = []
    deadline = time.monotonic() + 60
    while True:  # until the socket and then the ring are full: a send waits, and fails
        assert time.monotonic() < deadline
        payload = os.urandom(8000)  # does not divide the ring: the last send is admitted in part
        result = _send(host, payload, timeout=5)
        if result != b"\r\nSEND OK\r\n":
            break
        sent.append(payload)
    assert result == b"\r\nSEND FAIL\r\n"
    expected = b"".join(sent)
    got = bytearray()
    conn.settimeout(2)
    with contextlib.suppress(TimeoutError):
        while len(got) < len(expected) + len(payload) and (data := conn.recv(1 << 20)):
            got += data
    assert len(got) >= len(expected), f"{len(got)} of {len(expected)} bytes that had SEND OK"
    # What follows them, if anything, is a part of the failed send (as lwIP sends what it took).
    assert bytes(got[: len(expected)]) == expected
    assert payload.startswith(bytes(got[len(expected):]))
    assert host.command(b"AT") == b"\r\nOK\r\n"
    conn.close()


def test_so_sndtimeo_ends_a_cipsendl_that_gets_no_room(make_daemon, peer):
    """AT+CIPSENDL into a ring the stopped worker never drains, so_sndtimeo 300 ms: the rest of
    the payload is read and dropped, then SEND FAIL, and commands are answered again (the port
    stayed unread: the MCU could neither finish nor +++).  Its final +CIPSENDL <had sent len>
    is exactly what the peer then gets, in order, and nothing after it."""
    daemon, host, conn = _connect(make_daemon, peer)
    host.command(b"AT+CIPTCPOPT=-1,0,300")
    payload = os.urandom(_RING * 3)
    with _stopped(daemon.worker_pid(0)):
        host.write(b"AT+CIPSENDL=%d\r\n" % len(payload))
        host.expect(b">")
        started = time.monotonic()
        for at in range(0, len(payload), 4096):  # waits while the port is unread
            host.write(payload[at:at + 4096])
        answer = host.expect(b"\r\nSEND FAIL\r\n", timeout=5)
        assert time.monotonic() - started > 0.25  # the whole so_sndtimeo was waited for
        assert host.command(b"AT") == b"\r\nOK\r\n"
    reports = [tuple(map(int, line.split(b":")[1].split(b","))) for line in answer.split(b"\r\n")
               if line.startswith(b"+CIPSENDL:")]
    had_sent, port_recv = reports[-1]
    assert 0 < had_sent <= _RING and had_sent <= port_recv <= len(payload), reports
    got = bytearray()
    conn.settimeout(1)
    with contextlib.suppress(TimeoutError):
        while data := conn.recv(1 << 20):
            got += data
    assert len(got) == had_sent and bytes(got) == payload[:had_sent]
    conn.close()


def test_a_cipsendl_failed_by_so_sndtimeo_can_be_left_with_plus(make_daemon, peer):
    """After so_sndtimeo failed a CIPSENDL, the MCU need not send the rest of its length:
    +++ is heard (the port is read again) and ends the phase with SEND CANCELLED."""
    daemon, host, conn = _connect(make_daemon, peer)
    host.command(b"AT+CIPTCPOPT=-1,0,300")
    with _stopped(daemon.worker_pid(0)):
        host.write(b"AT+CIPSENDL=%d\r\n" % (1 << 30))
        host.expect(b">")
        host.write(os.urandom(_RING + 2048))
        time.sleep(0.6)  # so_sndtimeo passes; the port is read again
        host.write(b"+++")
        assert host.expect(b"\r\nSEND CANCELLED\r\n", timeout=5).endswith(b"\r\nSEND CANCELLED\r\n")
        time.sleep(1.1)  # the guard time after +++
        assert host.ask(b"AT") == b"\r\nOK\r\n"
    conn.close()


def test_so_sndtimeo_bounds_each_wait_of_a_cipsendl_not_the_whole(make_daemon, peer):
    """so_sndtimeo 400 ms bounds each wait for room, as each send() of ESP-AT's stream: a
    CIPSENDL whose worker stalls three times for 250 ms (750 ms of waiting in all) ends SEND OK,
    and the peer gets every byte (so_sndtimeo counted from the first wait failed it)."""
    daemon, host, conn = _connect(make_daemon, peer)
    host.command(b"AT+CIPTCPOPT=-1,0,400")
    piece = _RING + 2048  # more than the ring holds: each stall makes the stream wait
    payload = os.urandom(3 * piece)
    got = bytearray()

    def drain() -> None:
        conn.settimeout(10)
        while len(got) < len(payload) and (data := conn.recv(1 << 20)):
            got.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    host.write(b"AT+CIPSENDL=%d\r\n" % len(payload))
    host.expect(b">")
    for at in range(0, len(payload), piece):
        with _stopped(daemon.worker_pid(0)):
            host.write(payload[at:at + piece])  # the ring fills; the rest waits in the pty
            time.sleep(0.25)
        time.sleep(0.1)  # the worker drains the ring: the stream moves again
    answer = host.expect(b"\r\nSEND ", timeout=10) + host.expect(b"\r\n")
    assert answer.endswith(b"\r\nSEND OK\r\n"), answer[-200:]
    reader.join(10)
    assert bytes(got) == payload
    conn.close()


def test_a_datagram_larger_than_the_ring_fails_and_the_session_goes_on(make_daemon):
    """AT+CIPSEND on a UDP link of more than the uplink ring can ever hold (ring_size 4096,
    cipsend_max 8192) is SEND FAIL, and the next command is answered: the datagram could
    never be admitted, and trying raised inside the front's read of the UART."""
    daemon: Daemon = make_daemon("[links]\nring_size = 4096\n")
    host = daemon.host()
    host.boot()
    with udp_peer() as peer:
        port = peer.getsockname()[1]
        assert host.ask(b'AT+CIPSTART="UDP","127.0.0.1",%d' % port) == b"CONNECT\r\n\r\nOK\r\n"
        assert _send(host, os.urandom(5000), timeout=3) == b"\r\nSEND FAIL\r\n"
        assert host.command(b"AT") == b"\r\nOK\r\n"
        assert _send(host, b"small", timeout=3) == b"\r\nSEND OK\r\n"
        assert peer.recvfrom(65536)[0] == b"small"
    daemon.wait_event("datagram_too_big", length=5000)


def test_at_rst_is_heard_while_a_send_waits_for_ring_room(make_daemon, peer):
    """A complete send waiting for room the peer never makes (so_sndtimeo 0) leaves the UART
    read, as ESP-AT's receive task does while its AT task blocks in send(): a command gets
    busy p..., and AT+RST forces the restart a driver recovers with. The port was left unread,
    so nothing the MCU sent was ever heard again."""
    daemon, host, conn = _connect(make_daemon, peer)
    with _stopped(daemon.worker_pid(0)):
        _fill_the_ring(host)
        host.write(b"AT\r\n")
        assert host.expect(b"\r\nbusy p...\r\n", timeout=2) == b"\r\nbusy p...\r\n"
        host.write(b"AT+RST\r\n")
        assert host.expect(b"\r\nready\r\n", timeout=5).startswith(b"\r\nWill force to restart!!!\r\n")
    assert host.command(b"AT").endswith(b"\r\nOK\r\n")  # (after the rejoin's WIFI lines)
    conn.close()


def test_so_sndtimeo_set_after_a_send_bounds_the_next_sends(make_daemon, peer):
    """A send before AT+CIPTCPOPT (so_sndtimeo 0), then so_sndtimeo 300 ms: a send the full
    ring cannot admit fails within it (the data phase's Prompt is not reused across timeouts)."""
    daemon, host, conn = _connect(make_daemon, peer)
    assert _send(host, b"first", timeout=5) == b"\r\nSEND OK\r\n"
    host.command(b"AT+CIPTCPOPT=-1,0,300")
    deadline = time.monotonic() + 60
    while (result := _send(host, os.urandom(8000), timeout=5)) == b"\r\nSEND OK\r\n":
        assert time.monotonic() < deadline
    assert result == b"\r\nSEND FAIL\r\n"
    assert host.command(b"AT") == b"\r\nOK\r\n"
    conn.close()


def test_so_sndtimeo_does_not_bound_a_udp_send_on_its_link_id(make_daemon):
    """AT+CIPTCPOPT's so_sndtimeo belongs to a TCP/SSL socket (lwIP bounds TCP writes only): a
    UDP link opened on an id that has it waits for ring room as with so_sndtimeo 0 (no SEND FAIL
    at 300 ms), then every datagram reaches the peer; the id keeps the option for its next link."""
    daemon: Daemon = make_daemon(_CONFIG)
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPTCPOPT=-1,0,300")
    with udp_peer() as peer:
        port = peer.getsockname()[1]
        assert host.ask(b'AT+CIPSTART="UDP","127.0.0.1",%d' % port) == b"CONNECT\r\n\r\nOK\r\n"
        sent = []
        with _stopped(daemon.worker_pid(0)):
            for _ in range(_RING // _PIECE + 1):  # the ring holds fewer: the last waits for room
                payload = os.urandom(_PIECE)
                try:
                    result = _send(host, payload, timeout=1.0)
                except Timeout:
                    sent.append(payload)
                    break
                assert result == b"\r\nSEND OK\r\n", f"datagram {len(sent)}: {result!r}"
                sent.append(payload)
            else:
                pytest.fail("the ring never filled")
        assert host.expect(b"\r\nSEND OK\r\n", timeout=5) == b"\r\nSEND OK\r\n"
        assert [peer.recvfrom(65536)[0] for _ in sent] == sent
    assert host.ask(b"AT+CIPTCPOPT?") == b"+CIPTCPOPT:0,-1,0,300,0\r\n\r\nOK\r\n"
