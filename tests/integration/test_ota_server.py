"""AT+CIUPDATE and AT+CIPFWVER? against update servers that do not play along: https
checked (the CA of ``[ota] ca_file`` only, the host name), and raw servers answering odd or
lying bytes over plain http with unsigned images (``insecure_http``, ``allow_unsigned``)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.otaserver import (  # noqa: F401 - ota_files, server, shared_daemons and start are fixtures
    FAILED_DOWNLOAD,
    IMAGE,
    PROGRESS,
    Shared,
    image_dir,
    leftovers,
    ota_files,
    server,
    shared_daemons,
    start,
    why,
)


# -- https -----------------------------------------------------------------------------------


def test_https_trusts_the_ca_file(start, server):
    """An https server whose CA is [ota] ca_file: version list and update work."""
    daemon, host = start(server.url)
    assert host.ask(b"AT+CIPFWVER?") == b'+CIPFWVER:"v4.1.1.0"\r\n+CIPFWVER:"v4.1.2.0"\r\n\r\nOK\r\n'
    assert host.command(b"AT+CIUPDATE=1", timeout=20) == PROGRESS + b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    assert (image_dir(daemon) / "ota.bin").read_bytes() == IMAGE


def test_https_does_not_trust_the_mcus_certificate_store(start, server, ota_files):
    """The CA only in bridged's client_ca.0 (which the MCU's SSL links use), no [ota] ca_file:
    the system store does not know it, so ERROR and nothing downloaded."""
    daemon, host = start(server.url, ca=ota_files.ca, ca_file="")
    assert host.ask(b"AT+CIUPDATE=1", timeout=20) == b"+CIPUPDATE:1\r\n\r\nERROR\r\n"
    assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate" in why(daemon)
    assert host.ask(b"AT+CIPFWVER?") == b"\r\nERROR\r\n"
    assert server.requests == []
    assert leftovers(daemon) == []


# -- a hostile or broken update server -------------------------------------------------------


class RawServer:
    """Answers every request with ``answer`` (bytes, or a callable given the socket), then closes."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    more = conn.recv(4096)
                    if not more:
                        return
                    head += more
                self.requests.append(head)
                if callable(self.answer):
                    self.answer(conn, self.done)
                else:
                    conn.sendall(self.answer)
            except OSError:
                pass

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def raw_refusing(shared_daemons):
    """One plain http daemon kept for the broken answers, its RawServer's answer set per case."""
    server = RawServer(b"")
    daemon, host = shared_daemons.start(server.url, secure=False)
    yield Shared(daemon, host, server)
    server.close()


@pytest.fixture
def raw_fresh(raw_refusing):
    yield raw_refusing.begin()
    raw_refusing.end()


@pytest.fixture
def raw():
    servers: list[RawServer] = []

    def make(answer) -> RawServer:
        servers.append(RawServer(answer))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.mark.parametrize(("answer", "reason"), [
    # str.isdigit() says yes to these, int() does not: the update crashed (an internal error)
    (b"HTTP/1.0 200 OK\r\nContent-Length: \xb2\r\n\r\nx", "bad Content-Length"),
    (b"HTTP/1.0 \xb2\xb2\xb2 OK\r\nContent-Length: 1\r\n\r\nx", "not an HTTP status line"),
    # int() refuses more than 4300 digits
    (b"HTTP/1.0 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nx", "bad Content-Length"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: -1\r\n\r\nx", "bad Content-Length"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nx", "bad Content-Length"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "conflicting Content-Length"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 50\r\n\r\nshort", "the body ended after 5 of 50 bytes"),
    # chunked despite HTTP/1.0: the framing would have become the image
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 10\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     "Transfer-Encoding"),
    # a 1xx is not success: its body would have become the image
    (b"HTTP/1.1 199 Odd\r\nContent-Length: 5\r\n\r\nhello", "HTTP status 199"),
    (b"HTTP/1.0 302 Found\r\nLocation: http://127.0.0.2/\r\nContent-Length: 0\r\n\r\n", "HTTP status 302"),
    (b"HTTP/1.0 200 OK\r\n" + b"X-Filler: " + b"a" * 20000 + b"\r\n\r\n", "headers longer than"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP status line"),
])
def test_broken_server_answers_fail_cleanly(raw_fresh, answer, reason):
    """Odd or lying answers to the download: ERROR, a reason in the log, no file, no internal error."""
    raw_fresh.server.answer = answer
    assert raw_fresh.host.ask(b'AT+CIUPDATE=0,"v1"', timeout=20) == FAILED_DOWNLOAD
    assert reason in raw_fresh.why()
    assert leftovers(raw_fresh.daemon) == []
    assert raw_fresh.host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"


def test_longer_body_than_content_length_keeps_only_the_declared_bytes(start, raw):
    """A body longer than its Content-Length: the declared bytes are the image."""
    server = raw(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello and more")
    daemon, host = start(server.url, secure=False, partitions=("ota", "part"))
    assert host.ask(b'AT+CIUPDATE=0,"v1","part"', timeout=20) == b"+CIPUPDATE:1\r\n+CIPUPDATE:4\r\n\r\nOK\r\n"
    assert (image_dir(daemon) / "part.bin").read_bytes() == b"hello"


def test_slow_loris_body_is_ended_by_the_overall_timer(start, raw):
    """One byte a second of a large body: [ota] timeout_ms still ends the update."""
    def trickle(conn, done):
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while not done.wait(0.5):
            conn.sendall(b"x")

    server = raw(trickle)
    daemon, host = start(server.url, "timeout_ms = 1500\n", secure=False)
    began = time.monotonic()
    assert host.ask(b'AT+CIUPDATE=0,"v1"', timeout=20) == FAILED_DOWNLOAD
    assert time.monotonic() - began < 8
    assert "longer than 1.5 s" in why(daemon)
    assert leftovers(daemon) == []


def test_cipfwver_odd_version_strings_never_reach_the_uart_raw(start, raw):
    """Quotes end a version, one with a control character or CR LF is skipped: no line break
    or fake OK reaches the MCU."""
    body = (b'{"productRoms": [{"version": "v1\\"x"}, {"version": "a\r\nOK\r\n"}, {"version": "b\x07"},'
            b' {"version": "v4.1.0.0"}]}')
    server = raw(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    daemon, host = start(server.url, secure=False)
    assert host.ask(b"AT+CIPFWVER?") == b'+CIPFWVER:"v1\\"\r\n+CIPFWVER:"v4.1.0.0"\r\n\r\nOK\r\n'


def test_cipfwver_many_versions_all_arrive(start, raw):
    """Thousands of versions (the body is capped at 64 KiB): every line, then OK."""
    body = b'{"productRoms": [' + b",".join(b'{"version": "v%d"}' % i for i in range(3000)) + b"]}"
    assert len(body) < 65536
    server = raw(b"HTTP/1.0 200 OK\r\n\r\n" + body)  # no Content-Length: to the close
    daemon, host = start(server.url, secure=False)
    out = host.ask(b"AT+CIPFWVER?", timeout=30)
    assert out == b"".join(b'+CIPFWVER:"v%d"\r\n' % i for i in range(3000)) + b"\r\nOK\r\n"


# -- TLS verifies the host name ------------------------------------------------------------


def test_https_host_name_must_match_the_certificate(start, server):
    """A trusted CA is not enough: the certificate names 127.0.0.1, not localhost (the log says so)."""
    daemon, host = start(server.url.replace("127.0.0.1", "localhost"))
    assert host.ask(b"AT+CIPFWVER?", timeout=20) == b"\r\nERROR\r\n"
    assert "CERTIFICATE_VERIFY_FAILED: Hostname mismatch" in why(daemon)
    assert server.requests == []
