"""Passive receive mode (AT+CIPRECVTYPE / AT+CIPRECVMODE=1) end to end."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import threading
import time

import pytest


@pytest.fixture
def host(shared_or_own_host):
    """A test needing only a booted host shares the module's daemon; one that reads its
    daemon has its own (conftest.shared_or_own_host)."""
    return shared_or_own_host


@pytest.fixture
def server():
    srv = socket.create_server(("127.0.0.1", 0))
    yield srv
    srv.close()


def _connect(host, server, link_id=None):
    target = b"%d," % link_id if link_id is not None else b""
    host.command(b'AT+CIPSTART=' + target + b'"TCP","127.0.0.1",%d' % server.getsockname()[1])
    conn, _ = server.accept()
    return conn


def _recvdata(host, command: bytes) -> bytes:
    """Send AT+CIPRECVDATA; return the payload, checking the reply's frame."""
    host.write(command + b"\r\n")
    before = host.expect(b"+CIPRECVDATA:", timeout=10)[: -len(b"+CIPRECVDATA:")]
    # Only notices may come first: +IPD is unsolicited and may be on its way.
    assert re.fullmatch(rb"(\r\n\+IPD,\d+\r\n)*", before), before
    head = b"+CIPRECVDATA:" + host.expect(b",", timeout=10)
    m = re.fullmatch(rb"\+CIPRECVDATA:(\d+),", head)
    assert m, head
    n = int(m.group(1))
    body = host.expect(b"\r\nOK\r\n")
    assert len(body) == n + 6, (n, body[-20:])
    return body[:n]


def test_notice_read_in_parts_and_re_announce(host, server):
    """+IPD,<len> announces the data; a partial read leaves the rest announced again."""
    host.command(b"AT+CIPRECVTYPE=1")
    conn = _connect(host, server)
    conn.sendall(b"x" * 100)
    assert host.expect(b"\r\n+IPD,100\r\n") == b"\r\n+IPD,100\r\n"
    assert host.ask(b"AT+CIPRECVLEN?") == b"+CIPRECVLEN:100\r\n\r\nOK\r\n"
    assert _recvdata(host, b"AT+CIPRECVDATA=40") == b"x" * 40
    assert host.expect(b"\r\n+IPD,60\r\n") == b"\r\n+IPD,60\r\n"
    assert _recvdata(host, b"AT+CIPRECVDATA=1000") == b"x" * 60
    assert host.ask(b"AT+CIPRECVDATA=10") == b"\r\nERROR\r\n"  # nothing buffered
    assert host.read_quiet(0.2) == b""
    conn.close()


def test_no_new_notice_until_read(host, server):
    """While a notice is unanswered, more data adds to the total without a second notice."""
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPRECVTYPE=5,1")
    conn = _connect(host, server, 2)
    conn.sendall(b"a" * 10)
    assert host.expect(b"\r\n+IPD,2,10\r\n") == b"\r\n+IPD,2,10\r\n"
    conn.sendall(b"b" * 5)
    assert host.read_quiet(0.3) == b""
    assert host.ask(b"AT+CIPRECVLEN?") == b"+CIPRECVLEN:0,0,15,0,0\r\n\r\nOK\r\n"
    assert _recvdata(host, b"AT+CIPRECVDATA=2,15") == b"a" * 10 + b"b" * 5
    assert host.ask(b"AT+CIPRECVTYPE?") == b"".join(b"+CIPRECVTYPE:%d,1\r\n" % i for i in range(5)) + b"\r\nOK\r\n"
    conn.close()


def test_window_holds_back_a_fast_peer_and_loses_nothing(host, server):
    """A peer sending 2 MB: the unread data never exceeds the 5760-byte window; every byte arrives."""
    host.command(b"AT+CIPRECVMODE=1")
    conn = _connect(host, server)
    payload = os.urandom(2 << 20)
    sender = threading.Thread(target=conn.sendall, args=(payload,), daemon=True)
    sender.start()
    got = bytearray()
    host.expect(b"+IPD,")
    while len(got) < len(payload):
        answer = host.ask(b"AT+CIPRECVLEN?")
        unread = int(re.search(rb"\+CIPRECVLEN:(\d+)\r\n", answer).group(1))  # notices may precede it
        assert unread <= 5760
        if unread:
            got += _recvdata(host, b"AT+CIPRECVDATA=%d" % 4096)
    sender.join(10)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    conn.close()


def test_a_full_window_waits_without_spinning(daemon, host, server):
    """With the receive window full and nothing read, the link worker sleeps
    until a read makes room (the ring itself has room: waiting for that spun)."""
    import psutil

    host.command(b"AT+CIPRECVMODE=1")
    conn = _connect(host, server)
    payload = os.urandom(256 * 1024)  # far beyond the window: the peer's sendall blocks
    sender = threading.Thread(target=conn.sendall, args=(payload,), daemon=True)
    sender.start()
    assert host.expect(b"\r\n+IPD,5760\r\n", timeout=10) == b"\r\n+IPD,5760\r\n"
    tree = [psutil.Process(daemon.proc.pid)] + psutil.Process(daemon.proc.pid).children(recursive=True)
    before = {p.pid: sum(p.cpu_times()[:2]) for p in tree}
    time.sleep(2.0)  # the CPU is measured over this
    used = sum(sum(p.cpu_times()[:2]) - before[p.pid] for p in tree)
    assert used < 0.5, f"the daemon used {used:.2f} s of CPU in 2 s waiting for a read"
    got = bytearray()
    while len(got) < len(payload):  # every read makes room: the peer's data keeps coming
        answer = host.ask(b"AT+CIPRECVLEN?")
        if int(re.search(rb"\+CIPRECVLEN:(\d+)\r\n", answer).group(1)):  # notices may precede it
            got += _recvdata(host, b"AT+CIPRECVDATA=%d" % 2048)
    sender.join(10)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    conn.close()


def test_data_stays_readable_after_peer_close(host, server):
    """The peer closes: its data can still be read, and CLOSED comes only after that."""
    host.command(b"AT+CIPRECVTYPE=1")
    conn = _connect(host, server)
    conn.sendall(b"bye now")
    conn.close()
    assert host.expect(b"\r\n+IPD,7\r\n") == b"\r\n+IPD,7\r\n"
    assert host.read_quiet(0.3) == b""  # no CLOSED while data waits
    assert host.ask(b"AT+CIPSTATUS").startswith(b"STATUS:3\r\n")
    assert _recvdata(host, b"AT+CIPRECVDATA=3") == b"bye"
    assert host.expect(b"\r\n+IPD,4\r\n") == b"\r\n+IPD,4\r\n"
    assert host.ask(b"AT+CIPSEND=4") == b"\r\nERROR\r\n"  # the socket is gone
    assert _recvdata(host, b"AT+CIPRECVDATA=3") == b" no"
    host.expect(b"\r\n+IPD,1\r\n")
    assert _recvdata(host, b"AT+CIPRECVDATA=3") == b"w"
    assert host.expect(b"CLOSED\r\n") == b"CLOSED\r\n"


def test_cipdinfo_in_recvdata(host, server):
    """With AT+CIPDINFO=1 the reply names the remote IP and port."""
    host.command(b"AT+CIPDINFO=1")
    host.command(b"AT+CIPRECVTYPE=1")
    conn = _connect(host, server)
    conn.sendall(b"hi")
    host.expect(b"\r\n+IPD,2\r\n")
    port = server.getsockname()[1]
    host.write(b"AT+CIPRECVDATA=10\r\n")
    assert host.expect(b"\r\nOK\r\n") == b'+CIPRECVDATA:2,"127.0.0.1",%d,hi\r\nOK\r\n' % port
    conn.close()


def test_recvdata_refused_in_active_mode(host, server):
    """AT+CIPRECVDATA is for passive mode only; switching back to active delivers +IPD again."""
    conn = _connect(host, server)
    assert host.ask(b"AT+CIPRECVDATA=10") == b"\r\nERROR\r\n"
    host.command(b"AT+CIPRECVTYPE=1")
    conn.sendall(b"held")
    host.expect(b"\r\n+IPD,4\r\n")
    host.command(b"AT+CIPRECVTYPE=0")
    assert host.read_ipd() == (None, b"held")
    conn.sendall(b"live")
    assert host.read_ipd() == (None, b"live")
    conn.close()


def test_cipclose_discards_unread_data(host, server):
    """AT+CIPCLOSE on a passive link with unread data closes it and drops the data."""
    host.command(b"AT+CIPRECVTYPE=1")
    conn = _connect(host, server)
    conn.sendall(b"unread")
    host.expect(b"\r\n+IPD,6\r\n")
    assert host.command(b"AT+CIPCLOSE") == b"CLOSED\r\n\r\nOK\r\n"
    assert host.ask(b"AT+CIPRECVLEN?") == b"+CIPRECVLEN:0\r\n\r\nOK\r\n"
    conn.close()


def _partly_read(host, server) -> socket.socket:
    """A passive link whose peer sent 0123456789, of which a read took 0123."""
    host.command(b"AT+CIPRECVTYPE=1")
    conn = _connect(host, server)
    conn.sendall(b"0123456789")
    host.expect(b"\r\n+IPD,10\r\n")
    assert _recvdata(host, b"AT+CIPRECVDATA=4") == b"0123"
    host.expect(b"\r\n+IPD,6\r\n")
    return conn


def test_cipclose_after_a_partial_read_sends_none_of_the_rest(host, server):
    """AT+CIPCLOSE after a read took part of a segment: the rest is dropped with
    the link, never sent as a stray active-mode +IPD."""
    conn = _partly_read(host, server)
    assert host.command(b"AT+CIPCLOSE") == b"CLOSED\r\n\r\nOK\r\n"
    assert host.read_quiet(0.3) == b""
    conn.close()


def test_restart_after_a_partial_read_sends_none_of_the_rest(host, server):
    """AT+RST after a read took part of a segment: nothing of the link's data
    follows the boot messages."""
    conn = _partly_read(host, server)
    host.write(b"AT+RST\r\n")
    host.expect(b"\r\nready\r\n")
    assert b"456789" not in host.read_quiet(0.5)
    conn.close()


def test_a_dead_worker_owes_only_what_was_not_read(daemon, host, server):
    """The link worker dies after a read took part of a segment: its unread rest
    goes out (as +IPD, there is nothing left to read it from), not what was read."""
    daemon.expected_errors |= {"worker_died", "child_died"}
    conn = _partly_read(host, server)
    os.kill(daemon.worker_pid(0), signal.SIGKILL)
    assert host.expect(b"CLOSED\r\n", timeout=5) == b"\r\n+IPD,6:456789CLOSED\r\n"
    conn.close()


def test_back_to_active_and_passive_again_counts_only_the_new_data(host, server):
    """Held data goes out as +IPD when passive mode ends; passive again, the next 10 bytes are
    announced and counted alone (active mode's drain forgot the old counts and notice)."""
    host.command(b"AT+CIPRECVTYPE=1")
    conn = _connect(host, server)
    conn.sendall(b"x" * 100)
    assert host.expect(b"\r\n+IPD,100\r\n") == b"\r\n+IPD,100\r\n"
    host.command(b"AT+CIPRECVTYPE=0")
    assert host.expect(b"\r\n+IPD,100:" + b"x" * 100, timeout=10).endswith(b"x" * 100)
    host.command(b"AT+CIPRECVTYPE=1")
    conn.sendall(b"y" * 10)
    assert host.expect(b"\r\n+IPD,10\r\n") == b"\r\n+IPD,10\r\n"
    assert host.ask(b"AT+CIPRECVLEN?") == b"+CIPRECVLEN:10\r\n\r\nOK\r\n"
    assert _recvdata(host, b"AT+CIPRECVDATA=1000") == b"y" * 10
    conn.close()
