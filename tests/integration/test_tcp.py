"""TCP end to end: pty <-> daemon <-> loopback peers, hashes compared."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import threading
import time

import pytest

from tests.harness import Daemon, Demux, EchoServer, Timeout


@pytest.fixture
def host(shared_host):
    """The module's tests that need only a booted host share one daemon (conftest.shared_host)."""
    return shared_host


def _open(host, link_id: int | None, port: int) -> bytes:
    target = b"%d," % link_id if link_id is not None else b""
    return host.ask(b'AT+CIPSTART=' + target + b'"TCP","127.0.0.1",%d' % port)


def test_single_connection_echo(host, echo_server):
    """CIPSTART answers CONNECT then OK; CIPSEND sends exactly <length> bytes; the echo comes back as +IPD."""
    assert _open(host, None, echo_server.port) == b"CONNECT\r\n\r\nOK\r\n"
    assert host.command(b"AT+CIPSEND=5", b">") == b"\r\nOK\r\n\r\n>"
    host.write(b"hello")
    assert host.expect(b"SEND OK\r\n") == b"\r\nRecv 5 bytes\r\n\r\nSEND OK\r\n"
    assert host.read_ipd() == (None, b"hello")
    assert host.command(b"AT+CIPCLOSE") == b"CLOSED\r\n\r\nOK\r\n"
    assert echo_server.closed_by_peer.wait(5)


def test_cipdinfo_adds_the_remote(host, echo_server):
    """With AT+CIPDINFO=1, +IPD carries the quoted remote IP and port."""
    host.command(b"AT+CIPDINFO=1")
    _open(host, None, echo_server.port)
    host.command(b"AT+CIPSEND=3", b">")
    host.write(b"abc")
    host.expect(b"SEND OK\r\n")
    assert host.expect(b"abc") == b'\r\n+IPD,3,"127.0.0.1",%d:abc' % echo_server.port


def test_cipstate_and_cipstatus(host, echo_server):
    """Links show with type, remote, ports and tetype; STATUS moves 2 -> 3 -> 4."""
    assert host.ask(b"AT+CIPSTATUS") == b"STATUS:2\r\n\r\nOK\r\n"
    host.command(b"AT+CIPMUX=1")
    _open(host, 2, echo_server.port)
    conn = echo_server.wait_connections(1)[0]
    local_port = conn.getpeername()[1]
    line = b'2,"TCP","127.0.0.1",%d,%d,0\r\n' % (echo_server.port, local_port)
    assert host.ask(b"AT+CIPSTATE?") == b"+CIPSTATE:" + line + b"\r\nOK\r\n"
    assert host.ask(b"AT+CIPSTATUS") == b"STATUS:3\r\n+CIPSTATUS:" + line + b"\r\nOK\r\n"
    host.command(b"AT+CIPCLOSE=2")
    assert host.ask(b"AT+CIPSTATUS") == b"STATUS:4\r\n\r\nOK\r\n"
    assert host.ask(b"AT+CIPSTATE?") == b"\r\nOK\r\n"


def test_five_links_move_a_megabyte_each_way(host, echo_server):
    """Five links at once in multi mode, 1 MB up and 1 MB back on each, hashes equal."""
    host.command(b"AT+CIPMUX=1")
    for link_id in range(5):
        assert _open(host, link_id, echo_server.port) == b"%d,CONNECT\r\n\r\nOK\r\n" % link_id
    size, chunk = 1 << 20, 8192
    payloads = {i: os.urandom(size) for i in range(5)}
    demux = Demux(host)
    for offset in range(0, size, chunk):
        for link_id in range(5):
            result = demux.send(link_id, payloads[link_id][offset : offset + chunk])
            assert result.endswith(b"\r\nSEND OK\r\n"), result
    for link_id in range(5):
        got = demux.wait_data(link_id, size, timeout=60)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payloads[link_id]).digest()
    assert host.command(b"AT+CIPCLOSE=5") == b"".join(b"%d,CLOSED\r\n" % i for i in range(5)) + b"\r\nOK\r\n"


def test_peer_close_after_data(host):
    """Data the peer sent before closing arrives first, then CLOSED."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        host.command(b"AT+CIPMUX=1")
        _open(host, 1, server.getsockname()[1])
        conn, _ = server.accept()
        conn.sendall(b"last words")
        conn.close()
        assert host.expect(b"1,CLOSED\r\n") == b"\r\n+IPD,1,10:last words1,CLOSED\r\n"
        assert host.ask(b"AT+CIPSTATE?") == b"\r\nOK\r\n"
        assert host.ask(b"AT+CIPCLOSE=1") == b"\r\nERROR\r\n"
    finally:
        server.close()


def test_single_mode_peer_close(host):
    """In single-connection mode the message is a bare CLOSED."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        _open(host, None, server.getsockname()[1])
        conn, _ = server.accept()
        conn.close()
        assert host.expect(b"CLOSED\r\n") == b"CLOSED\r\n"
    finally:
        server.close()


def test_connect_refused_and_errors(host, echo_server):
    """Refused connects, ids in use or out of range, and wrong modes answer a plain ERROR."""
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert _open(host, None, port) == b"\r\nERROR\r\n"
    assert _open(host, 0, echo_server.port) == b"\r\nERROR\r\n"  # an id in single mode
    host.command(b"AT+CIPMUX=1")
    assert _open(host, 5, echo_server.port) == b"\r\nERROR\r\n"
    assert _open(host, 0, echo_server.port) == b"0,CONNECT\r\n\r\nOK\r\n"
    assert _open(host, 0, echo_server.port) == b"\r\nERROR\r\n"  # already connected
    assert host.ask(b"AT+CIPMUX=0") == b"\r\nERROR\r\n"  # links are open
    assert host.ask(b"AT+CIPSEND=3,4") == b"\r\nERROR\r\n"  # link 3 is not connected
    assert host.ask(b"AT+CIPSEND=0,0") == b"\r\nERROR\r\n"
    assert host.ask(b"AT+CIPSEND=0,8193") == b"\r\nERROR\r\n"
    assert host.ask(b"AT+CIPCLOSE") == b"\r\nERROR\r\n"  # needs an id in multi mode
    assert host.ask(b'AT+CIPSTART=1,"TCPv6","::1",%d' % echo_server.port) == b"\r\nERROR\r\n"  # CIPV6=0


def test_cipstartex_takes_the_lowest_free_id(host, echo_server):
    """AT+CIPSTARTEX picks the lowest free link id and reports it."""
    host.command(b"AT+CIPMUX=1")
    _open(host, 0, echo_server.port)
    assert host.ask(b'AT+CIPSTARTEX="TCP","127.0.0.1",%d' % echo_server.port) == b"1,CONNECT\r\n\r\nOK\r\n"


def test_sysmsg_link_conn(host, echo_server):
    """AT+SYSMSG bit 1 replaces CONNECT by the +LINK_CONN line lwESP waits for."""
    host.command(b"AT+SYSMSG=2")
    host.command(b"AT+CIPMUX=1")
    answer = _open(host, 3, echo_server.port)
    local_port = echo_server.wait_connections(1)[0].getpeername()[1]
    assert answer == b'+LINK_CONN:0,3,"TCP",0,"127.0.0.1",%d,%d\r\n\r\nOK\r\n' % (echo_server.port, local_port)


def test_ipv6_echo(host):
    """With AT+CIPV6=1, TCPv6 links reach ::1 and show the IPv6 remote."""
    server = EchoServer(socket.AF_INET6, "::1")
    try:
        host.command(b"AT+CIPV6=1")
        assert host.ask(b'AT+CIPSTART="TCPv6","::1",%d' % server.port) == b"CONNECT\r\n\r\nOK\r\n"
        assert host.ask(b"AT+CIPSTATE?").startswith(b'+CIPSTATE:0,"TCPv6","::1",%d,' % server.port)
        host.command(b"AT+CIPSEND=2", b">")
        host.write(b"v6")
        host.expect(b"SEND OK\r\n")
        assert host.read_ipd() == (None, b"v6")
    finally:
        server.close()


def test_surplus_payload_bytes_get_busy(host, echo_server):
    """Bytes beyond <length> are refused with busy p..., then Recv and SEND OK, as ESP-AT does."""
    _open(host, None, echo_server.port)
    host.command(b"AT+CIPSEND=4", b">")
    host.write(b"abcd\r\n")
    assert host.expect(b"SEND OK\r\n") == b"\r\nbusy p...\r\n\r\nRecv 4 bytes\r\n\r\nSEND OK\r\n"
    assert host.read_ipd() == (None, b"abcd")
    assert host.command(b"AT") == b"\r\nOK\r\n"


def test_killed_worker_is_restarted(daemon: Daemon, echo_server):
    """kill -9 of a link worker: its link reports CLOSED, the others keep working, a new worker serves the slot."""
    daemon.expected_errors |= {"worker_died", "child_died"}
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    _open(host, 0, echo_server.port)
    _open(host, 1, echo_server.port)
    old_pid = daemon.worker_pid(1)
    os.kill(old_pid, signal.SIGKILL)
    assert host.expect(b"1,CLOSED\r\n", timeout=2) == b"1,CLOSED\r\n"
    demux = Demux(host)
    assert demux.send(0, b"still here").endswith(b"SEND OK\r\n")
    assert demux.wait_data(0, 10) == b"still here"
    deadline = time.monotonic() + 1.0
    while daemon.worker_pid(1) == old_pid:
        assert time.monotonic() < deadline, "worker 1 not restarted within 1 s"
        time.sleep(0.02)
    assert _open(host, 1, echo_server.port) == b"1,CONNECT\r\n\r\nOK\r\n"
    assert demux.send(1, b"new worker").endswith(b"SEND OK\r\n")
    assert demux.wait_data(1, 10) == b"new worker"


def test_a_link_reopened_right_after_its_worker_died_waits_for_the_new_worker(daemon: Daemon, echo_server):
    """The MCU reopens a link as soon as it sees CLOSED: AT+CIPSTART waits the
    moment it takes the supervisor to restart the worker, it does not fail."""
    daemon.expected_errors |= {"worker_died", "child_died"}
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    _open(host, 1, echo_server.port)
    os.kill(daemon.worker_pid(1), signal.SIGKILL)
    assert host.expect(b"1,CLOSED\r\n", timeout=2) == b"1,CLOSED\r\n"
    assert _open(host, 1, echo_server.port) == b"1,CONNECT\r\n\r\nOK\r\n"
    demux = Demux(host)
    assert demux.send(1, b"new worker").endswith(b"SEND OK\r\n")
    assert demux.wait_data(1, 10) == b"new worker"


def test_killed_worker_during_send_fails_the_send(daemon: Daemon):
    """A worker killed while a send waits for the network ends it with SEND FAIL, never a hang."""
    daemon.expected_errors |= {"worker_died", "child_died"}
    server = socket.create_server(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        host = daemon.host()
        host.boot()
        host.command(b"AT+CIPMUX=1")
        _open(host, 0, server.getsockname()[1])
        conn, _ = server.accept()  # never reads: the socket fills up
        demux = Demux(host)
        deadline = time.monotonic() + 20
        while True:  # fill the peer's window and our socket buffer until a send stalls
            assert time.monotonic() < deadline
            host.write(b"AT+CIPSEND=0,8192\r\n")
            demux.expect(b">")
            host.write(os.urandom(8192))
            demux.expect(b"Recv 8192 bytes\r\n")
            try:
                demux.expect(b"SEND OK\r\n", timeout=1.0)
            except Timeout:
                break
        os.kill(daemon.worker_pid(0), signal.SIGKILL)
        demux.expect(b"\r\nSEND FAIL\r\n", timeout=3)
        demux.expect(b"0,CLOSED\r\n", timeout=3)
        assert host.command(b"AT") == b"\r\nOK\r\n"
        conn.close()
    finally:
        server.close()


def test_sigterm_closes_links_and_exits_zero(daemon: Daemon, echo_server):
    """SIGTERM: every peer sees FIN, the daemon exits 0 within 5 s."""
    host = daemon.host()
    host.boot()
    _open(host, None, echo_server.port)
    echo_server.wait_connections(1)
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 5
    assert echo_server.closed_by_peer.wait(2)


def test_host_closes_and_reopens_the_port(daemon: Daemon, echo_server):
    """Closing and reopening the serial port loses nothing: links stay, AT answers."""
    host = daemon.host()
    host.boot()
    _open(host, None, echo_server.port)
    host.close()
    time.sleep(0.2)  # closed a moment: the daemon holds the slave open itself, nothing to wait for
    host = daemon.host()
    assert host.command(b"AT") == b"\r\nOK\r\n"
    assert host.ask(b"AT+CIPSTATUS").startswith(b"STATUS:3\r\n")
    host.command(b"AT+CIPSEND=4", b">")
    host.write(b"back")
    host.expect(b"SEND OK\r\n")
    assert host.read_ipd() == (None, b"back")


def test_ipd_frames_at_most_2920_bytes(host):
    """A large burst from the peer arrives as +IPD frames of at most 2920 bytes, in order."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        _open(host, None, server.getsockname()[1])
        conn, _ = server.accept()
        payload = os.urandom(100_000)
        conn.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            link_id, data = host.read_ipd()
            assert link_id is None and 0 < len(data) <= 2920
            got += data
        assert bytes(got) == payload
        conn.close()
    finally:
        server.close()


def test_local_ipv6_bind(host):
    """AT+CIPSTART's <local IP> works for TCPv6 too."""
    server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    try:
        host.command(b"AT+CIPV6=1")
        port = server.getsockname()[1]
        assert host.ask(b'AT+CIPSTART="TCPv6","::1",%d,,"::1"' % port) == b"CONNECT\r\n\r\nOK\r\n"
        conn, peer = server.accept()
        assert peer[0] == "::1"
        assert host.command(b"AT+CIPCLOSE") == b"CLOSED\r\n\r\nOK\r\n"
        conn.close()
        # An IPv6 local address cannot carry an IPv4 link.
        assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d,,"::1"' % port) == b"\r\nERROR\r\n"
    finally:
        server.close()


def test_killed_front_restarts_everything(daemon: Daemon):
    """kill -9 of the UART front: the supervisor starts it and the workers afresh on the same pty."""
    daemon.expected_errors |= {"child_died", "front_unreachable"}
    host = daemon.host()
    host.boot()
    front = daemon.wait_event("child_started", role="front")[-1]["pid"]
    os.kill(front, signal.SIGKILL)
    assert host.expect(b"\r\nready\r\n", timeout=10) == b"\r\nready\r\n"
    host.expect(b"WIFI GOT IP\r\n")  # the stored network is joined again
    assert host.command(b"AT") == b"AT\r\n\r\nOK\r\n"
    assert len(daemon.wait_event("child_started", role="front", count=2)) == 2
    died = [e for e in daemon.events("child_died") if e.get("role") == "link"]
    assert not died, died  # workers that end with their front are not reported as crashes


def test_a_peer_that_speaks_first_never_beats_connect(host):
    """A server that greets on accept (SMTP, MQTT brokers' retained messages, banners):
    over 20 quick opens, CONNECT and OK always come before the greeting's +IPD and
    the link's CLOSED, as on ESP-AT, in both connection modes."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def greet() -> None:
        conn, _ = server.accept()
        conn.sendall(b"220 hi")
        conn.close()

    try:
        for round_ in range(20):
            multi = round_ % 2 == 1
            host.command(b"AT+CIPMUX=%d" % multi)
            host.write(b'AT+CIPSTART=' + (b"3," if multi else b"") + b'"TCP","127.0.0.1",%d\r\n' % port)
            greet()  # the greeting is in the worker's socket before the front has answered
            closed = b"3,CLOSED\r\n" if multi else b"CLOSED\r\n"
            got = host.expect(closed)
            prefix = b"3," if multi else b""
            assert got == prefix + b"CONNECT\r\n\r\nOK\r\n\r\n+IPD," + prefix + b"6:220 hi" + closed, (round_, got)
    finally:
        server.close()


def test_a_peer_that_accepts_and_resets_at_once_gets_connect_then_closed(host):
    """A server that accepts and closes with RST at once (SO_LINGER 0): the connect itself
    succeeded, so AT+CIPSTART answers CONNECT then OK and the link's CLOSED follows, as on
    ESP-AT (not ERROR), in both connection modes, over 20 quick opens."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)  # a connect that never comes ends the thread (close() would not wake it)
    port = server.getsockname()[1]

    def reset_on_accept() -> None:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            return  # the expect below says what went wrong
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    try:
        for round_ in range(20):
            multi = round_ % 2 == 1
            host.command(b"AT+CIPMUX=%d" % multi)
            prefix = b"3," if multi else b""
            accepting = threading.Thread(target=reset_on_accept)
            accepting.start()  # waits in accept(): the reset follows the handshake at once
            host.write(b'AT+CIPSTART=' + prefix + b'"TCP","127.0.0.1",%d\r\n' % port)
            accepting.join(5)
            got = host.expect(prefix + b"CLOSED\r\n")
            assert got == prefix + b"CONNECT\r\n\r\nOK\r\n" + prefix + b"CLOSED\r\n", (round_, got)
            assert host.ask(b"AT+CIPSTATUS").startswith(b"STATUS:4\r\n")  # no link left open
    finally:
        server.close()
