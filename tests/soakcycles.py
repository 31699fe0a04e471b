"""The churn a real host driver puts on bridged, one cycle at a time: for
the soak tests (tests/integration/test_soak.py) and ``python -m bench.soak``.

Each cycle is driven as a driver drives a chip: the exact bytes ESP-AT
sends are expected, the next command goes out the instant OK arrives, and
the UART is read in 64-byte pieces (`DriverHost`), as a driver's ring
buffer does.  Peers are real sockets on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import termios
import threading
import time

from bridged.ops import protocol
from tests.harness import DEFAULT_TIMEOUT, Demux, EchoServer, Host, free_port

__all__ = ["DriverHost", "Peers", "link_cycle", "peer_first_cycle", "failure_cycle", "control_cycle", "server_cycle",
           "passive_cycle", "passthrough_cycle", "reset_cycle", "LINKS"]

LINKS = 5
_NOTICE = re.compile(rb"\r\n\+IPD,\d+,\d+\r\n")
GUARD = 0.03  # +++ wants 20 ms of silence either side (README, "+++"); a little more for a busy machine


class DriverHost(Host):
    """A Host that reads the UART 64 bytes at a time, as a driver's receive ring does."""

    def _fill(self, wait: float) -> bool:
        readable, _, _ = select.select([self.fd], [], [], wait)
        if not readable:
            return False
        try:
            chunk = os.read(self.fd, 64)
        except BlockingIOError:
            return False
        self.buf += chunk
        return bool(chunk)


class Closer:
    """A TCP listener that accepts and closes each connection at once: with FIN after
    sending ``hello``, or with RST (SO_LINGER 0) when ``reset``."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.reset = False
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            if self.reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                conn.sendall(b"bye")
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class Flooder:
    """A TCP listener that sends to each connection as fast as it takes, until it goes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        chunk = b"f" * 4096
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(5)
            with conn:
                try:
                    while not self._stop:
                        conn.sendall(chunk)
                except OSError:
                    pass  # the link closed (or a stuck one timed out)

    def close(self) -> None:
        self._stop = True
        self._thread.join(6)
        self.sock.close()


class Peers:
    """The loopback peers every cycle talks to: a TCP echo server, a UDP echo
    thread, a TCP peer that closes or resets first, and optionally a TLS echo
    server (an object with ``port`` and ``close()``, e.g. test_tls.TlsServer)."""

    def __init__(self, tls=None) -> None:
        self.echo = EchoServer()
        self.closer = Closer()
        self.flooder = Flooder()
        self.refusing = free_port()  # nothing listens there
        self.tls = tls
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0.1)
        self.udp_port = self.udp.getsockname()[1]
        self._stop = False
        self._udp_thread = threading.Thread(target=self._udp_echo, daemon=True)
        self._udp_thread.start()

    def _udp_echo(self) -> None:
        while not self._stop:
            try:
                data, addr = self.udp.recvfrom(65536)
            except (TimeoutError, OSError):
                continue
            self.udp.sendto(data, addr)

    def forget_echo_conns(self) -> None:
        """Drop the echo server's closed connections (a long run would keep them all)."""
        for conn in list(self.echo.conns):
            if conn.fileno() < 0:
                self.echo.conns.remove(conn)

    def close(self) -> None:
        self._stop = True
        self._udp_thread.join(2)
        self.udp.close()
        self.echo.close()
        self.closer.close()
        self.flooder.close()
        if self.tls is not None:
            self.tls.close()


def _start(host: Host, link_id: int, kind: bytes, port: int) -> None:
    answer = host.ask(b'AT+CIPSTART=%d,"%s","127.0.0.1",%d' % (link_id, kind, port))
    assert answer == b"%d,CONNECT\r\n\r\nOK\r\n" % link_id, (kind, answer)


def _echo_once(demux: Demux, link_id: int, payload: bytes) -> None:
    answer = demux.send(link_id, payload)
    assert answer == b"\r\nRecv %d bytes\r\n\r\nSEND OK\r\n" % len(payload), answer
    got = demux.wait_data(link_id, len(payload))
    assert got == payload, (link_id, got)
    del demux.data[link_id]


def _close(demux: Demux, link_id: int) -> None:
    demux.host.write(b"AT+CIPCLOSE=%d\r\n" % link_id)
    answer = demux.expect(b"\r\nOK\r\n")
    # CRLFs first: those before the echo's +IPD frames (one or more: the echo may come in parts)
    assert re.fullmatch(rb"(\r\n)*%d,CLOSED\r\n\r\nOK\r\n" % link_id, answer), answer


def link_cycle(demux: Demux, peers: Peers, i: int) -> None:
    """AT+CIPSTART, AT+CIPSEND with its echo back, AT+CIPCLOSE on link i % 5:
    TCP, UDP and (with a TLS peer) SSL in turn.  Needs AT+CIPMUX=1."""
    link_id = i % LINKS
    kinds = [(b"TCP", peers.echo.port), (b"UDP", peers.udp_port)]
    if peers.tls is not None:
        kinds.append((b"SSL", peers.tls.port))
    kind, port = kinds[(i // LINKS) % len(kinds)]
    _start(demux.host, link_id, kind, port)
    _echo_once(demux, link_id, os.urandom(1 + i % 200))
    _close(demux, link_id)
    if i % 50 == 0:
        peers.forget_echo_conns()


def peer_first_cycle(host: Host, peers: Peers, i: int) -> None:
    """A peer that sends ``bye`` and closes (FIN) or resets at once: CONNECT, OK,
    the data (FIN only), CLOSED, and the link is free again.  Needs AT+CIPMUX=1."""
    link_id = i % LINKS
    peers.closer.reset = bool(i % 2)
    host.write(b'AT+CIPSTART=%d,"TCP","127.0.0.1",%d\r\n' % (link_id, peers.closer.port))
    got = host.expect(b"%d,CLOSED\r\n" % link_id)
    data = b"" if peers.closer.reset else b"\r\n+IPD,%d,3:bye" % link_id
    assert got == b"%d,CONNECT\r\n\r\nOK\r\n" % link_id + data + b"%d,CLOSED\r\n" % link_id, (i, got)


def failure_cycle(demux: Demux, peers: Peers, i: int, control: str) -> None:
    """What fails or is cut short, in turn: a refused TCP connect, SSL to a peer that
    echoes the ClientHello back, SSL to one that closes at once (each ERROR), a
    flooding peer's link closed mid-stream by AT+CIPCLOSE; and a `bridged status`
    request on the control socket each time.  Needs AT+CIPMUX=1."""
    link_id, case = i % LINKS, (i // LINKS) % 4
    if case < 3:
        port = (peers.refusing, peers.echo.port, peers.closer.port)[case]
        peers.closer.reset = False
        kind = b"TCP" if case == 0 else b"SSL"
        demux.host.write(b'AT+CIPSTART=%d,"%s","127.0.0.1",%d\r\n' % (link_id, kind, port))
        answer = demux.expect(b"ERROR\r\n")
        assert re.fullmatch(rb"(\r\n)*ERROR\r\n", answer), (case, answer)
    else:
        _start(demux.host, link_id, b"TCP", peers.flooder.port)
        demux.wait_data(link_id, 1)  # it streams: close while more is on its way
        _close(demux, link_id)
        demux.data.pop(link_id, None)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(control)
        assert protocol.request(sock, {"cmd": "status"})["ok"] is True


def _client(port: int) -> socket.socket:
    """A client of the daemon's server, retrying while it is refused: a server that was
    full listens again only once the daemon saw a client go (bounded: 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def control_cycle(control: str, i: int) -> None:
    """A client of the control socket (`bridged status`'s) that goes away in turn
    after connecting, after half a header, after half a request, after a request
    that is no JSON, or after a whole status request and its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(control)
        case = i % 5
        if case == 1:
            sock.sendall(b"\x00\x00")
        elif case == 2:
            sock.sendall(protocol.HEADER.pack(50) + b'{"cmd":')
        elif case == 3:
            sock.sendall(protocol.HEADER.pack(9) + b"not json!")
        elif case == 4:
            assert protocol.request(sock, {"cmd": "status"})["ok"] is True


def server_cycle(host: Host, port: int, i: int) -> None:
    """1 to 5 clients connect to AT+CIPSERVER (with five, a sixth is refused), each
    sends a line, then they vanish (FIN or RST): CONNECT, +IPD and CLOSED for each,
    no link left open; every tenth cycle the server is deleted and made again."""
    count = 1 + i % LINKS
    demux = Demux(host)
    clients = []
    for k in range(count):  # one at a time: the lowest free id is k
        clients.append(_client(port))
        assert demux.expect(b",CONNECT\r\n").lstrip(b"\r\n") == b"%d,CONNECT\r\n" % k
        clients[k].sendall(b"hi %d" % k)
    if count == LINKS:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            raise AssertionError("a sixth client was let in")
        except ConnectionRefusedError:
            pass
    for k in range(count):
        assert demux.wait_data(k, 4) == b"hi %d" % k
    for k, client in enumerate(clients):
        if (i + k) % 2:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    closed = set()
    for _ in range(count):
        line = demux.expect(b",CLOSED\r\n")
        assert re.fullmatch(rb"(\r\n)*\d,CLOSED\r\n", line), line  # CRLFs: those before +IPD frames
        closed.add(int(line[-10:-9]))
    assert closed == set(range(count)), closed
    assert not demux.text.strip(), demux.text
    if i % 10 == 9:
        assert host.ask(b"AT+CIPSERVER=0") == b"\r\nOK\r\n"
        assert host.ask(b"AT+CIPSERVER=1,%d" % port) == b"\r\nOK\r\n"


def passive_cycle(host: Host, peers: Peers, i: int) -> None:
    """Passive receive (AT+CIPRECVTYPE=5,1 set beforehand): open, send, poll
    AT+CIPRECVLEN? until the echo is buffered, AT+CIPRECVDATA it in 64-byte
    reads, close.  Needs AT+CIPMUX=1."""
    link_id = i % LINKS
    _start(host, link_id, b"TCP", peers.echo.port)
    payload = os.urandom(100 + i % 300)
    host.send_data(b"AT+CIPSEND=%d,%d" % (link_id, len(payload)), payload)
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    while True:  # a driver polls the length before it reads; +IPD notices may come between
        lens = _NOTICE.sub(b"", host.ask(b"AT+CIPRECVLEN?"))
        assert re.fullmatch(rb"\+CIPRECVLEN:[-\d,]+\r\n\r\nOK\r\n", lens), lens
        if int(lens[12:-8].split(b",")[link_id]) == len(payload):
            break
        assert time.monotonic() < deadline, lens
    got = bytearray()
    while len(got) < len(payload):
        host.write(b"AT+CIPRECVDATA=%d,64\r\n" % link_id)
        before = host.expect(b"+CIPRECVDATA:")[: -len(b"+CIPRECVDATA:")]
        assert not _NOTICE.sub(b"", before), before  # only notices (a re-announce) come first
        n = int(host.expect(b",")[:-1])
        body = host.read_exactly(n + 6)
        assert body.endswith(b"\r\nOK\r\n"), body
        got += body[:n]
    assert bytes(got) == payload
    answer = _NOTICE.sub(b"", host.ask(b"AT+CIPCLOSE=%d" % link_id))
    assert answer == b"%d,CLOSED\r\n\r\nOK\r\n" % link_id, answer


def passthrough_cycle(host: Host, peers: Peers, i: int) -> None:
    """Passthrough (AT+CIPMUX=0, AT+CIPMODE=1, AT+SYSMSG=1 set beforehand)
    entered with AT+CIPSEND, a line echoed raw, left with +++ (+QUITT); the link
    is closed and opened again every fourth cycle."""
    if i % 4 == 0:
        if i:
            assert host.ask(b"AT+CIPCLOSE") == b"CLOSED\r\n\r\nOK\r\n"
        assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % peers.echo.port) == b"CONNECT\r\n\r\nOK\r\n"
    assert host.command(b"AT+CIPSEND", b">") == b"\r\nOK\r\n\r\n>"
    line = b"line %d\n" % i
    host.write(line)
    assert host.expect(line) == line
    time.sleep(GUARD)
    host.write(b"+++")
    assert host.expect(b"\r\n+QUITT\r\n", timeout=5) == b"\r\n+QUITT\r\n"
    time.sleep(GUARD)


def reset_cycle(host: Host, peers: Peers, i: int) -> None:
    """A link open (every other cycle), then AT+RST: OK, ready and the Wi-Fi's
    rejoin; the driver flushes its input, turns echo off and finds no link open."""
    if i % 2 == 0:
        _start(host, i % LINKS, b"TCP", peers.echo.port)
    assert host.command(b"AT+RST") == b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    host.expect(b"WIFI GOT IP\r\n")  # stored credentials, auto-connect: it rejoins by itself
    termios.tcflush(host.fd, termios.TCIFLUSH)  # what a driver does after a reset
    host.buf.clear()
    host.command(b"ATE0")
    host.command(b"AT+CIPMUX=1")
    status = host.ask(b"AT+CIPSTATUS")
    assert status.startswith(b"STATUS:") and b"+CIPSTATUS:" not in status, status
