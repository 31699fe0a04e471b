"""The data modes end to end: AT+CIPSENDEX, AT+CIPSENDL, +++ and passthrough."""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import struct
import termios
import threading
import time

import psutil
import pytest

from tests.backlog import BacklogServer
from tests.harness import Daemon, Demux


@pytest.fixture
def host(shared_or_own_host):
    """A test needing only a booted host shares the module's daemon; one that reads its
    daemon has its own (conftest.shared_or_own_host)."""
    return shared_or_own_host


def _open(host, port: int) -> None:
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % port) == b"CONNECT\r\n\r\nOK\r\n"


def _escape(host, daemon: Daemon | None = None) -> None:
    """+++ as ESP-AT wants it: silence, three '+' at once, silence.  With ``daemon``: until it
    left passthrough (a front a loaded machine leaves unscheduled past the guard time would
    read +++ and the next command as one piece of data)."""
    time.sleep(0.05)
    left = len(daemon.events("passthrough_left")) if daemon is not None else 0
    host.write(b"+++")
    if daemon is None:
        time.sleep(0.05)
    else:
        daemon.wait_event("passthrough_left", count=left + 1)


def test_cipsendex_terminator_and_escapes(host, echo_server):
    """\\0 ends the data early; \\\\0 sends a literal \\0; Recv counts the bytes sent."""
    _open(host, echo_server.port)
    host.command(b"AT+CIPSENDEX=100", b">")
    host.write(b"ab\\\\0c\\,d\\0")
    assert host.expect(b"SEND OK\r\n") == b"\r\nRecv 7 bytes\r\n\r\nSEND OK\r\n"
    assert host.read_ipd() == (None, b"ab\\0c,d")
    host.command(b"AT+CIPSENDEX=3", b">")
    host.write(b"xyz")
    assert host.expect(b"SEND OK\r\n") == b"\r\nRecv 3 bytes\r\n\r\nSEND OK\r\n"
    assert host.read_ipd() == (None, b"xyz")


def test_plus_escape_cancels_cipsend(host):
    """+++ with guard times cancels AT+CIPSEND: SEND Canceled, nothing reaches the peer."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        _open(host, server.getsockname()[1])
        conn, _ = server.accept()
        host.command(b"AT+CIPSEND=10", b">")
        host.write(b"abc")
        _escape(host)
        assert host.expect(b"\r\nSEND Canceled\r\n") == b"\r\nSEND Canceled\r\n"
        assert host.command(b"AT") == b"\r\nOK\r\n"
        conn.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.recv(10)
        host.command(b"AT+CIPSEND=5", b">")
        host.write(b"a+++b")  # '+' bytes inside data are data
        host.expect(b"SEND OK\r\n")
        conn.settimeout(5)
        assert conn.recv(10) == b"a+++b"
        conn.close()
    finally:
        server.close()


def test_cipsendl_streams_a_large_payload(host, sink_server):
    """AT+CIPSENDL: 4 MB stream with progress reports, the peer's hash matches."""
    _open(host, sink_server.port)
    host.command(b"AT+CIPSENDLCFG=65536,2920")
    payload = os.urandom(4 << 20)
    demux = Demux(host)
    host.write(b"AT+CIPSENDL=%d\r\n" % len(payload))
    demux.expect(b">")
    for i in range(0, len(payload), 65536):
        host.write(payload[i : i + 65536])
        demux.pump(0)
    text = demux.expect(b"SEND OK\r\n", timeout=60)
    reports = [tuple(map(int, line.split(b":")[1].split(b","))) for line in text.split(b"\r\n")
               if line.startswith(b"+CIPSENDL:")]
    assert reports, text
    assert reports[-1] == (len(payload), len(payload))
    assert all(a[0] <= b[0] and a[1] <= b[1] and a[0] <= a[1] for a, b in zip(reports, reports[1:]))
    deadline = time.monotonic() + 10
    while sum(sink_server.counts.values()) < len(payload):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert next(iter(sink_server.hashes.values())).digest() == hashlib.sha256(payload).digest()


def test_cipsendl_cancel(host, sink_server):
    """+++ during AT+CIPSENDL ends it with SEND CANCELLED; the link stays usable."""
    _open(host, sink_server.port)
    host.command(b"AT+CIPSENDL=1000000", b">")
    host.write(b"z" * 5000)
    _escape(host)
    host.expect(b"\r\nSEND CANCELLED\r\n")
    assert host.command(b"AT") == b"\r\nOK\r\n"
    assert host.ask(b"AT+CIPSTATUS").startswith(b"STATUS:3")


def test_passthrough_both_ways_and_escape(make_daemon, echo_server):
    """Passthrough moves 1 MB each way raw; +++ returns to commands, data still comes raw until CIPMODE=0."""
    daemon = make_daemon()
    host = daemon.host()
    host.boot()
    host.command(b"AT+SYSMSG=1")
    _open(host, echo_server.port)
    assert host.ask(b"AT+CIPMODE=1") == b"\r\nOK\r\n"
    assert host.command(b"AT+CIPSEND", b">") == b"\r\nOK\r\n\r\n>"
    payload = os.urandom(1 << 20)
    got = bytearray()
    for i in range(0, len(payload), 16384):
        host.write(payload[i : i + 16384])
        host._fill(0)
        got += host.buf
        host.buf.clear()
    deadline = time.monotonic() + 30
    while len(got) < len(payload):
        assert time.monotonic() < deadline, len(got)
        host._fill(0.05)
        got += host.buf
        host.buf.clear()
    assert hashlib.sha256(bytes(got)).digest() == hashlib.sha256(payload).digest()
    _escape(host)
    assert host.expect(b"\r\n+QUITT\r\n") == b"\r\n+QUITT\r\n"
    assert host.command(b"AT") == b"\r\nOK\r\n"
    echo_server.conns[0].sendall(b"raw")  # CIPMODE is still 1: no +IPD framing
    assert host.expect(b"raw") == b"raw"
    assert host.command(b"AT+CIPSEND", b">") == b"\r\nOK\r\n\r\n>"  # and back in
    host.write(b"again")
    assert host.expect(b"again") == b"again"
    _escape(host)
    host.expect(b"+QUITT\r\n")
    host.command(b"AT+CIPMODE=0")
    echo_server.conns[0].sendall(b"framed")
    assert host.read_ipd() == (None, b"framed")


def test_passthrough_packs_by_transintvl(host):
    """Short data waits AT+TRANSINTVL before it goes; 2920 bytes go at once."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        _open(host, server.getsockname()[1])
        conn, _ = server.accept()
        host.command(b"AT+TRANSINTVL=300")
        assert host.ask(b"AT+TRANSINTVL?") == b"+TRANSINTVL:300\r\n\r\nOK\r\n"
        host.command(b"AT+CIPMODE=1")
        host.command(b"AT+CIPSEND", b">")
        started = time.monotonic()
        host.write(b"tiny")
        conn.settimeout(5)
        assert conn.recv(100) == b"tiny"
        assert time.monotonic() - started >= 0.25
        started = time.monotonic()
        host.write(b"B" * 2920)
        got = b""
        while len(got) < 2920:
            got += conn.recv(4096)
        assert time.monotonic() - started < 0.2
        conn.close()
    finally:
        server.close()


def test_passthrough_reconnects(daemon, host):
    """In passthrough a dropped client link reconnects by itself every AT+CIPRECONNINTV, silently."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        _open(host, server.getsockname()[1])
        first, _ = server.accept()
        host.command(b"AT+CIPRECONNINTV=2")
        host.command(b"AT+CIPMODE=1")
        host.command(b"AT+CIPSEND", b">")
        first.close()
        server.settimeout(5)
        second, _ = server.accept()  # the reconnection
        daemon.wait_event("passthrough_reconnected")  # the front sends again from here on
        host.write(b"after")
        second.settimeout(5)
        assert second.recv(100) == b"after"
        assert host.read_quiet(0.2) == b""  # no CLOSED / CONNECT inside passthrough
        second.close()
    finally:
        server.close()


def test_cipmode_rules(host, echo_server):
    """Passthrough only where the spec allows it; CIPMUX and CIPMODE refuse the other's state."""
    assert host.ask(b"AT+CIPSEND") == b"\r\nERROR\r\n"  # CIPMODE=0
    host.command(b"AT+CIPMODE=1")
    assert host.ask(b"AT+CIPSEND") == b"\r\nERROR\r\n"  # no link yet
    assert host.ask(b"AT+CIPMUX=1") == b"\r\nERROR\r\n"  # IPMODE != 0
    assert host.ask(b"AT+CIPSEND=4") == b"\r\nERROR\r\n"  # the set form needs CIPMODE=0
    host.command(b"AT+CIPMODE=0")
    host.command(b"AT+CIPMUX=1")
    assert host.ask(b"AT+CIPMODE=1") == b"\r\nERROR\r\n"  # multi mode without a one-client server
    host.command(b"AT+CIPMUX=0")
    port = echo_server.port
    assert host.ask(b'AT+CIPSTART="UDP","127.0.0.1",%d,%d,2' % (port, port + 1 if port < 65535 else 1025)).endswith(b"OK\r\n")
    assert host.ask(b"AT+CIPMODE=1") == b"\r\nERROR\r\n"  # UDP passthrough needs <mode> 0


def test_server_passthrough(host):
    """A server with one connection allowed can carry passthrough for its client."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPSERVERMAXCONN=1")
    host.command(b"AT+CIPSERVER=1,%d" % port)
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    host.expect(b"0,CONNECT\r\n")
    host.command(b"AT+CIPMODE=1")
    host.command(b"AT+CIPSEND", b">")
    host.write(b"to client")
    assert client.recv(100) == b"to client"
    client.sendall(b"to mcu")
    assert host.expect(b"to mcu") == b"to mcu"
    client.close()


def test_savetranslink_boots_into_passthrough(daemon: Daemon, echo_server):
    """AT+SAVETRANSLINK is stored; after a reset bridged connects and prints \\r\\n> by itself."""
    host = daemon.host()
    host.boot()
    assert host.ask(b'AT+SAVETRANSLINK=1,"127.0.0.1",%d,"TCP",60' % echo_server.port) == b"\r\nOK\r\n"
    host.reset_into_passthrough(echo_server)
    _escape(host, daemon)
    host.command(b"AT+SAVETRANSLINK=0")
    host.write(b"AT+RST\r\n")
    host.expect(b"\r\nready\r\n")
    assert host.read_quiet(0.5) == b"WIFI CONNECTED\r\nWIFI GOT IP\r\n"
    assert host.command(b"AT") == b"AT\r\n\r\nOK\r\n"


def test_savetranslink_passthrough_reconnects_after_a_server_client_held_link_0(daemon: Daemon, echo_server):
    """A server's client held link 0 before the reset into AT+SAVETRANSLINK's passthrough: that
    passthrough is still a client's, and its link reconnects when it drops."""
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    host.command(b"AT+CIPSERVER=1,%d" % port)
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        host.expect(b"0,CONNECT\r\n")
        assert host.ask(b'AT+SAVETRANSLINK=1,"127.0.0.1",%d,"TCP"' % echo_server.port) == b"\r\nOK\r\n"
        host.reset_into_passthrough(echo_server)
        echo_server.conns[0].shutdown(socket.SHUT_RDWR)  # the peer drops the passthrough link
        echo_server.wait_connections(2)  # the reconnection
        daemon.wait_event("passthrough_reconnected", count=2)  # the boot's connect, then this
        host.write(b"again")
        assert host.expect(b"again") == b"again"
        _escape(host, daemon)
        host.command(b"AT+SAVETRANSLINK=0")
    finally:
        client.close()


def _queued(sock: socket.socket, request: int) -> int:
    """The bytes in the socket's send (TIOCOUTQ) or receive (FIONREAD) queue."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]


def _backed_up(queued, quiet: float = 0.5, timeout: float = 3.0) -> None:
    """Until everything between the stream's ends is full (``queued()`` bytes, non-zero and
    unchanged for ``quiet`` s) or ``timeout``: the slow side then reads nothing no longer
    than it takes to fill the way, instead of a fixed 3 s."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        size = queued()
        if size != last:
            last, since = size, time.monotonic()
        elif size and time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def test_slow_host_loses_nothing(host):
    """The host stops reading while the peer sends 50 MB, until all the way back to the peer is full: every byte arrives, hash equal."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        host.command(b"AT+CIPMODE=1")  # raw bytes: the hash covers exactly the peer's stream
        _open(host, server.getsockname()[1])
        conn, _ = server.accept()
        payload = os.urandom(50 << 20)
        sender = threading.Thread(target=conn.sendall, args=(payload,), daemon=True)
        sender.start()
        _backed_up(lambda: _queued(conn, termios.TIOCOUTQ))  # the host reads nothing: the UART, rings and socket fill up
        digest = hashlib.sha256()
        total = 0
        deadline = time.monotonic() + 120
        while total < len(payload):
            assert time.monotonic() < deadline, total
            host._fill(0.05)
            digest.update(host.buf)
            total += len(host.buf)
            host.buf.clear()
        sender.join(10)
        assert total == len(payload)
        assert digest.digest() == hashlib.sha256(payload).digest()
        conn.close()
    finally:
        server.close()


def test_slow_peer_loses_nothing(host):
    """The peer stops reading while the host streams 50 MB through AT+CIPSENDL, until the way is full: nothing lost."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        _open(host, server.getsockname()[1])
        conn, _ = server.accept()
        payload = os.urandom(50 << 20)
        received = hashlib.sha256()
        count = [0]

        def read_later() -> None:
            _backed_up(lambda: _queued(conn, termios.FIONREAD))  # the peer reads nothing at first
            while count[0] < len(payload):
                data = conn.recv(1 << 20)
                if not data:
                    return
                received.update(data)
                count[0] += len(data)

        reader = threading.Thread(target=read_later, daemon=True)
        reader.start()
        demux = Demux(host)
        host.write(b"AT+CIPSENDL=%d\r\n" % len(payload))
        demux.expect(b">")
        for i in range(0, len(payload), 1 << 16):
            host.write(payload[i : i + (1 << 16)])  # blocks while the daemon holds off
            demux.pump(0)
        demux.expect(b"SEND OK\r\n", timeout=120)
        reader.join(60)
        assert count[0] == len(payload)
        assert received.digest() == hashlib.sha256(payload).digest()
        conn.close()
    finally:
        server.close()


def test_escape_after_a_stream_at_uart_rate(host):
    """+++ after data streamed at UART speed (reads coalesced) still escapes; +++ inside it is data.

    The escape waits until the peer has the whole stream: the front judges +++'s silence by when
    it reads, so a front the loaded machine left behind read the stream's tail and the +++ as one
    piece of data (2 suite runs of 11 here), which a chip timing the wire would not."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        _open(host, server.getsockname()[1])
        conn, _ = server.accept()
        host.command(b"AT+SYSMSG=1")
        host.command(b"AT+CIPMODE=1")
        host.command(b"AT+CIPSEND", b">")
        sent = bytearray()
        for i in range(100):  # 1 KiB every 2 ms: 0.5 MB/s, a 5 Mbaud UART
            piece = (b"+++" if i == 50 else b"") + bytes([i]) * 1021
            host.write(piece)
            sent += piece
            time.sleep(0.002)
        conn.settimeout(5)
        got = bytearray()
        while len(got) < len(sent):
            got += conn.recv(65536)
        assert bytes(got) == bytes(sent)
        time.sleep(0.03)  # +++ wants silence around it
        host.write(b"+++")
        time.sleep(0.03)  # +++ wants silence around it
        assert host.expect(b"\r\n+QUITT\r\n") == b"\r\n+QUITT\r\n"
        conn.setblocking(False)
        with pytest.raises(BlockingIOError):
            conn.recv(65536)  # the escape is not data
        conn.close()
    finally:
        server.close()


def _wait_syn_sent(port: int, not_from: set[int], timeout: float = 5.0) -> None:
    """Until a connect to ``port`` (from a port not in ``not_from``) waits for its SYN-ACK."""
    deadline = time.monotonic() + timeout
    while not any(c.status == psutil.CONN_SYN_SENT and c.raddr and c.raddr.port == port
                  and c.laddr.port not in not_from for c in psutil.net_connections("tcp4")):
        assert time.monotonic() < deadline, "no connect to the full server was under way"
        time.sleep(0.02)


def test_leaving_passthrough_stops_a_reconnection_under_way(daemon, host):
    """+++ while a passthrough reconnection's connect is still waiting (the server's accept
    queue is full, so its SYN goes unanswered): the attempt is abandoned. When the server
    catches up, bridged's connection never arrives, nothing reaches the MCU, no link is open."""
    server = BacklogServer()
    try:
        _open(host, server.port)
        first, _ = server.sock.accept()
        host.command(b"AT+CIPRECONNINTV=1")
        host.command(b"AT+CIPMODE=1")
        host.command(b"AT+CIPSEND", b">")
        server.fill(2)  # the accept queue full: later SYNs are dropped
        server.wait_filled()
        first.close()
        _wait_syn_sent(server.port, server.filler_ports())  # the reconnection's connect waits
        _escape(host, daemon)
        assert host.command(b"AT") == b"\r\nOK\r\n"
        filler_ports = server.filler_ports()
        server.sock.settimeout(0.2)
        deadline = time.monotonic() + 4  # past the SYN's first retransmission (1 s)
        while time.monotonic() < deadline:
            try:
                conn, peer = server.sock.accept()
            except TimeoutError:
                continue
            conn.close()
            assert peer[1] in filler_ports, f"bridged reconnected after passthrough ended ({peer})"
        assert host.read_quiet(0.2) == b""
        assert host.ask(b"AT+CIPSTATE?") == b"\r\nOK\r\n"
    finally:
        server.close()
