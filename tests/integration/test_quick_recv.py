"""The short paths of the receive side give the bytes of the normal ones: a repeated
AT+CIPRECVDATA line (commands.recv.quick_recv) and +IPD frames taken in batches
(records.take_records), with AT+CIPDINFO=1 over IPv6, several links, odd lengths."""

from __future__ import annotations

import os
import re
import socket

import pytest

from tests.harness import udp_peer
from tests.integration.test_passive import _recvdata, server  # noqa: F401 (a fixture)


@pytest.fixture
def host(shared_or_own_host):
    """A test needing only a booted host shares the module's daemon; one that reads its
    daemon has its own (conftest.shared_or_own_host)."""
    return shared_or_own_host


@pytest.fixture
def server6():
    srv = socket.create_server(("::1", 0), family=socket.AF_INET6)
    yield srv
    srv.close()


def _connect6(host, server, link_id: int) -> socket.socket:
    host.command(b"AT+CIPV6=1")
    host.command(b'AT+CIPSTART=%d,"TCPv6","::1",%d' % (link_id, server.getsockname()[1]))
    conn, _ = server.accept()
    return conn


def test_a_repeated_read_line_answers_as_the_first_did_with_cipdinfo_over_ipv6(host, server6):
    """The same odd-length read line again and again (the short path after the first): every
    reply names the IPv6 peer, the pieces add up to what the peer sent, the last is short."""
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPDINFO=1")
    host.command(b"AT+CIPRECVTYPE=3,1")
    conn = _connect6(host, server6, 3)
    payload = os.urandom(1000)
    conn.sendall(payload)
    host.expect(b"\r\n+IPD,3,1000\r\n")
    head = b'+CIPRECVDATA:%d,"::1",' + b"%d," % server6.getsockname()[1]
    got = b""
    while len(got) < len(payload):
        host.write(b"AT+CIPRECVDATA=3,7\r\n")
        before = host.expect(b"+CIPRECVDATA:", timeout=10)
        n = min(7, len(payload) - len(got))
        reply = host.expect(b"\r\nOK\r\n", timeout=10)
        assert b"+CIPRECVDATA:" + reply == head % n + payload[len(got):len(got) + n] + b"\r\nOK\r\n", before
        got += payload[len(got):len(got) + n]
    assert host.ask(b"AT+CIPRECVDATA=3,7") == b"\r\nERROR\r\n"  # nothing left: the normal path's ERROR
    conn.close()


def test_a_remembered_read_line_fails_as_the_normal_path_once_the_link_is_active(host, server):
    """A read line answered before gets ERROR after AT+CIPRECVTYPE=0, and the held data goes
    out as +IPD; back in passive mode the same line reads again."""
    host.command(b"AT+CIPRECVTYPE=1")
    host.command(b'AT+CIPSTART="TCP","127.0.0.1",%d' % server.getsockname()[1])
    conn, _ = server.accept()
    conn.sendall(b"abcdef")
    host.expect(b"\r\n+IPD,6\r\n")
    assert _recvdata(host, b"AT+CIPRECVDATA=2") == b"ab"
    host.expect(b"\r\n+IPD,4\r\n")
    host.command(b"AT+CIPRECVTYPE=0")
    assert host.read_ipd() == (None, b"cdef")
    assert host.ask(b"AT+CIPRECVDATA=2") == b"\r\nERROR\r\n"
    host.command(b"AT+CIPRECVTYPE=1")
    conn.sendall(b"gh")
    host.expect(b"\r\n+IPD,2\r\n")
    assert _recvdata(host, b"AT+CIPRECVDATA=2") == b"gh"
    conn.close()


def test_read_lengths_zero_huge_and_too_big_answer_as_before(host, server):
    """Length 0 and 2**31 are ERROR every time (never remembered); 2**31-1 reads what waits."""
    host.command(b"AT+CIPRECVTYPE=1")
    host.command(b'AT+CIPSTART="TCP","127.0.0.1",%d' % server.getsockname()[1])
    conn, _ = server.accept()
    conn.sendall(b"x" * 5)
    host.expect(b"\r\n+IPD,5\r\n")
    for _ in range(2):
        assert host.ask(b"AT+CIPRECVDATA=0") == b"\r\nERROR\r\n"
        assert host.ask(b"AT+CIPRECVDATA=2147483648") == b"\r\nERROR\r\n"
    assert _recvdata(host, b"AT+CIPRECVDATA=2147483647") == b"x" * 5
    conn.sendall(b"y" * 3)
    host.expect(b"\r\n+IPD,3\r\n")
    assert _recvdata(host, b"AT+CIPRECVDATA=2147483647") == b"y" * 3
    conn.close()


def test_a_read_line_of_single_connection_mode_is_not_reused_under_cipmux_1(host, server):
    """AT+CIPRECVDATA=1 reads link 0 under CIPMUX=0; under CIPMUX=1 the same line lacks its
    length (ERROR), as the registry's binding says."""
    host.command(b"AT+CIPRECVTYPE=1")
    host.command(b'AT+CIPSTART="TCP","127.0.0.1",%d' % server.getsockname()[1])
    conn, _ = server.accept()
    conn.sendall(b"zz")
    host.expect(b"\r\n+IPD,2\r\n")
    assert _recvdata(host, b"AT+CIPRECVDATA=1") == b"z"
    host.expect(b"\r\n+IPD,1\r\n")
    host.command(b"AT+CIPCLOSE")
    host.command(b"AT+CIPMUX=1")
    assert host.ask(b"AT+CIPRECVDATA=1") == b"\r\nERROR\r\n"
    conn.close()


def test_ipd_with_cipdinfo_over_ipv6_on_several_links_in_order(host, server6):
    """+IPD frames of two IPv6 links with AT+CIPDINFO=1: each names its link and peer, every
    byte arrives in order per link (several records per drain, batched)."""
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPDINFO=1")
    a = _connect6(host, server6, 0)
    b = _connect6(host, server6, 4)
    port = server6.getsockname()[1]
    sent = {0: b"", 4: b""}
    for i in range(20):
        for link, conn in ((0, a), (4, b)):
            piece = os.urandom(50 + i)
            conn.sendall(piece)
            sent[link] += piece
    got = {0: b"", 4: b""}
    while len(got[0]) < len(sent[0]) or len(got[4]) < len(sent[4]):
        head = host.expect(b'",%d:' % port, timeout=10)  # ends the address: its colons come first
        m = re.fullmatch(rb'\r\n\+IPD,([04]),(\d+),"::1",%d:' % port, head)
        assert m, head
        got[int(m.group(1))] += host.read_exactly(int(m.group(2)), timeout=10)
    assert got == sent
    a.close()
    b.close()


def test_udpv6_datagrams_with_cipdinfo_past_the_rings_wrap(host):
    """2000 IPv6 datagrams of odd sizes, 20 at a time (their records and 16-byte addresses
    wrap the 64 KiB ring more than once): one +IPD each naming the sender, none lost or joined."""
    peer = udp_peer("::1", socket.AF_INET6)
    port = peer.getsockname()[1]
    host.command(b"AT+CIPV6=1")
    host.command(b"AT+CIPDINFO=1")
    assert host.ask(b'AT+CIPSTART="UDPv6","::1",%d,0' % port) == b"CONNECT\r\n\r\nOK\r\n"
    host.command(b"AT+CIPSEND=1", b">")
    host.write(b"!")
    host.expect(b"SEND OK\r\n")
    _, addr = peer.recvfrom(10)
    for group in range(100):
        sent = [os.urandom(17 + (group * 20 + i) % 97) for i in range(20)]
        for datagram in sent:
            peer.sendto(datagram, addr)
        for datagram in sent:
            head = host.expect(b'",%d:' % port, timeout=10)
            assert head == b'\r\n+IPD,%d,"::1",%d:' % (len(datagram), port), (group, head)
            assert host.read_exactly(len(datagram), timeout=10) == datagram
    peer.close()
