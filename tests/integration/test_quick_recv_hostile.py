"""AT+CIPRECVDATA's remembered lines (commands.recv.quick_recv) attacked: odd spellings of a
length, a link closed and reopened on the same id (UDP from another sender), AT faults armed
on demand later: each answer is the one the registry's path gives in the same state."""

from __future__ import annotations

import re
import socket

import pytest

from tests.harness import free_port, udp_peer
from tests.integration.test_faults_at import fault_cli
from tests.integration.test_passive import server  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(120)


def _open_passive_tcp(host, server, link_id: int = 0) -> socket.socket:  # noqa: F811
    host.command(b"AT+CIPRECVTYPE=%d,1" % link_id)
    host.command(b'AT+CIPSTART=%d,"TCP","127.0.0.1",%d' % (link_id, server.getsockname()[1]))
    conn, _ = server.accept()
    return conn


def _fill(host, conn, data: bytes, link_id: int = 0) -> None:
    conn.sendall(data)
    host.expect(b"+IPD,%d," % link_id)
    host.expect(b"\r\n")


def test_odd_spellings_answer_the_second_time_as_the_first(daemon, host, server):  # noqa: F811
    """Leading zeros, '+', spaces, a sign, quotes, a bad id, 2**31: each line twice in a row
    reads the next bytes both times or is ERROR both times, with its command_error event."""
    host.command(b"AT+CIPMUX=1")
    conn = _open_passive_tcp(host, server)
    data = bytes(range(48, 123)) * 2
    _fill(host, conn, data)
    at = 0
    lines = {b"AT+CIPRECVDATA=0,03": 3, b"AT+CIPRECVDATA=00,3": 3, b"AT+CIPRECVDATA=0,+3": 0,
             b"AT+CIPRECVDATA=0, 3": 0, b"AT+CIPRECVDATA=0,3 ": 0, b"AT+CIPRECVDATA=0,-3": 0,
             b'AT+CIPRECVDATA=0,"3"': 0, b"AT+CIPRECVDATA=5,3": 0, b"AT+CIPRECVDATA=0,2147483648": 0}
    for line, n in lines.items():
        for _ in range(2):
            errors = len(daemon.events("command_error"))
            answer = host.ask(line)
            if n:
                assert answer == b"+CIPRECVDATA:%d,%s\r\nOK\r\n" % (n, data[at:at + n]), line
                at += n
                host.expect(b"\r\n+IPD,0,%d\r\n" % (len(data) - at))  # the notice of what is left
            else:
                assert answer == b"\r\nERROR\r\n", line
                daemon.wait_event("command_error", count=errors + 1)
    conn.close()


def test_a_remembered_line_that_now_fails_logs_why_as_the_registry_does(daemon, host, server):  # noqa: F811
    """The remembered line after its link has nothing left: ERROR and a command_error event
    saying "no data", the same event as the first, registry-bound line would log."""
    host.command(b"AT+CIPMUX=1")
    conn = _open_passive_tcp(host, server)
    _fill(host, conn, b"abc")
    assert host.ask(b"AT+CIPRECVDATA=0,3") == b"+CIPRECVDATA:3,abc\r\nOK\r\n"
    errors = len(daemon.events("command_error"))
    assert host.ask(b"AT+CIPRECVDATA=0,3") == b"\r\nERROR\r\n"
    event = daemon.wait_event("command_error", count=errors + 1)[-1]
    assert "no data" in event["why"] and event.get("command") == "+CIPRECVDATA", event
    conn.close()


def test_a_reopened_id_as_udp_from_another_sender_reads_as_a_fresh_line_would(host, server):  # noqa: F811
    """A line remembered on TCP link 0, the link closed and 0 reopened as UDP: with
    AT+CIPDINFO=1 the remembered line names the new sender and cuts datagrams exactly as
    fresh lines (bound by the registry) do on the same datagrams."""
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPDINFO=1")
    conn = _open_passive_tcp(host, server)
    _fill(host, conn, b"tcp!")
    tcp_port = server.getsockname()[1]
    assert host.ask(b"AT+CIPRECVDATA=0,3") == b'+CIPRECVDATA:3,"127.0.0.1",%d,tcp\r\nOK\r\n' % tcp_port
    host.command(b"AT+CIPCLOSE=0")
    conn.close()
    peer = udp_peer()
    port = peer.getsockname()[1]
    host.command(b"AT+CIPRECVTYPE=0,1")
    local = ("127.0.0.1", free_port(socket.SOCK_DGRAM))
    assert host.ask(b'AT+CIPSTART=0,"UDP","127.0.0.1",%d,%d' % (port, local[1])).endswith(b"OK\r\n")
    answers = {}
    for line in (b"AT+CIPRECVDATA=0,3", b"AT+CIPRECVDATA=00,3"):  # remembered; never seen (the registry's)
        for datagram in (b"hello", b"xy"):
            peer.sendto(datagram, local)
        host.expect(b"\r\n+IPD,0,")
        host.expect(b"\r\n")
        answers[line] = []
        while (answer := host.ask(line)) != b"\r\nERROR\r\n":  # to the end: the short path after the first
            answers[line].append(re.sub(rb"^\r\n\+IPD,0,\d+\r\n", b"", answer))  # a notice before it
            assert len(answers[line]) < 10
        host.read_quiet(0.1)
    assert answers[b"AT+CIPRECVDATA=0,3"] == answers[b"AT+CIPRECVDATA=00,3"]
    assert answers[b"AT+CIPRECVDATA=0,3"][0].startswith(b'+CIPRECVDATA:3,"127.0.0.1",%d,hel' % port)
    peer.close()


def test_an_at_fault_armed_later_reaches_a_remembered_line(daemon, host, server):  # noqa: F811
    """`bridged fault at_errcode` after the line was remembered: that line gets the injected
    ERR CODE (the short path steps aside), reads nothing, and the next one reads on."""
    host.command(b"AT+CIPMUX=1")
    conn = _open_passive_tcp(host, server)
    _fill(host, conn, b"abcdef")
    assert host.ask(b"AT+CIPRECVDATA=0,2") == b"+CIPRECVDATA:2,ab\r\nOK\r\n"
    done = fault_cli(daemon, "at_errcode", "code=0x01020304")
    assert done.returncode == 0, done.stderr
    answer = host.ask(b"AT+CIPRECVDATA=0,2")
    assert b"0x01020304" in answer and answer.endswith(b"\r\nERROR\r\n"), answer
    assert host.ask(b"AT+CIPRECVDATA=0,2") == b"+CIPRECVDATA:2,cd\r\nOK\r\n"
    conn.close()


def test_a_remembered_line_inside_a_send_data_phase_is_payload(host, server):  # noqa: F811
    """The read line typed as AT+CIPSEND's data goes to the peer as bytes, reads nothing;
    after SEND OK the same line reads the next bytes."""
    host.command(b"AT+CIPMUX=1")
    conn = _open_passive_tcp(host, server)
    _fill(host, conn, b"abcdef")
    line = b"AT+CIPRECVDATA=0,2\r\n"
    assert host.ask(line[:-2]) == b"+CIPRECVDATA:2,ab\r\nOK\r\n"
    host.read_quiet(0.1)  # the notice of what is left
    host.command(b"AT+CIPSEND=0,%d" % len(line), b">")
    host.write(line)
    assert host.expect(b"SEND OK\r\n").endswith(b"\r\nSEND OK\r\n")
    conn.settimeout(5)
    got = b""
    while len(got) < len(line):
        got += conn.recv(100)
    assert got == line
    assert host.ask(line[:-2]) == b"+CIPRECVDATA:2,cd\r\nOK\r\n"
    conn.close()
