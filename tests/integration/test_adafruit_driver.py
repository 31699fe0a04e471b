"""Adafruit's CircuitPython ESP-AT driver (adafruit-circuitpython-esp-atcontrol and
adafruit-circuitpython-requests from PyPI), unmodified, against bridged on a pty.

The driver runs its own flows through its public API -- begin/join, TCP, UDP, SSL, a
reset, and HTTP and HTTPS GETs with adafruit_requests over its socket module -- against
real servers on loopback, and the tests check what comes back. They share one daemon
and one begun driver (begin() is seconds of the driver's fixed sleeps); the reset gets
its own.
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import os
import select
import socket
import ssl
import sys
import threading
import time
import types

import pytest
import serial
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness import Daemon, EchoServer

try:
    # The driver imports digitalio (Adafruit-Blinka's) only for its optional reset and
    # RTS pins, which these tests do not give it; Blinka picks a GPIO backend for the
    # board it detects and refuses the import on, e.g., a Raspberry Pi without gpiod.
    import digitalio  # noqa: F401
except (ImportError, RuntimeError, NotImplementedError):
    sys.modules["digitalio"] = types.SimpleNamespace(DigitalInOut=object, Direction=None)

import adafruit_connection_manager  # noqa: E402
import adafruit_requests  # noqa: E402
from adafruit_espatcontrol import adafruit_espatcontrol_socket as esp_socket  # noqa: E402
from adafruit_espatcontrol.adafruit_espatcontrol import ESP_ATcontrol  # noqa: E402

WIFI = {"ssid": "bridged", "password": "adafruit-pass"}


class PtyUART(serial.Serial):
    """busio.UART's interface (read, write, in_waiting, reset_input_buffer, baudrate)
    is pyserial's; in_waiting only waits up to 2 ms for a byte when none is there,
    so the driver's polling loops, which never sleep, leave the CPU to bridged."""

    @property
    def in_waiting(self) -> int:
        waiting = serial.Serial.in_waiting.fget(self)
        if not waiting:
            select.select([self.fd], [], [], 0.002)
            waiting = serial.Serial.in_waiting.fget(self)
        return waiting


class _SocketWithRecvInto(esp_socket.socket):
    """The driver's socket plus recv_into, which adafruit_requests 2+ reads responses
    with and the driver's socket module lacks (Adafruit_CircuitPython_ESP_ATcontrol
    issue #74): without it every GET fails with AttributeError, whatever the modem."""

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        data = self.recv(nbytes or len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _socket_pool() -> types.ModuleType:
    """The driver's socket module, with recv_into added while it has none."""
    if hasattr(esp_socket.socket, "recv_into"):
        return esp_socket
    pool = types.ModuleType("adafruit_espatcontrol_socket_with_recv_into")
    for name in ("getaddrinfo", "set_interface", "SOCK_STREAM", "AF_INET"):
        setattr(pool, name, getattr(esp_socket, name))
    pool.socket = _SocketWithRecvInto
    return pool


def _joined(daemon: Daemon) -> tuple[ESP_ATcontrol, PtyUART]:
    """The driver on the daemon's pty, begun and joined to the emulated access point.

    The MCU comes up after the module has booted (opening the port flushes the banner),
    as the examples' boards do after their hard_reset(); debug=True puts the AT
    transcript in a failing test's captured output."""
    daemon.wait_event("ready")
    uart = PtyUART(daemon.link, 115200, timeout=0.1)
    driver = ESP_ATcontrol(uart, 115200, debug=True)
    driver.connect(WIFI, timeout=5, retries=1)
    return driver, uart


@pytest.fixture
def fresh_esp(daemon: Daemon):
    """The driver, begun and joined, on a daemon of its own (for the test that resets it)."""
    driver, uart = _joined(daemon)
    yield driver
    uart.close()


@pytest.fixture(scope="module")
def shared_esp(tmp_path_factory):
    """One daemon and one begun, joined driver for every test where isolation is not the
    point: begin() and connect() take about 4 s of the driver's fixed sleeps each time."""
    daemon = Daemon(tmp_path_factory.mktemp("adafruit-daemon")).start()
    try:
        driver, uart = _joined(daemon)
    except BaseException:
        daemon.stop()
        raise
    yield driver
    uart.close()
    code = daemon.stop()  # and, as conftest's make_daemon checks, cleanly
    assert code == 0, f"daemon exited {code}:\n{daemon.log_text()[-3000:]}"
    errors = [e for e in daemon.events() if e.get("level") in ("error", "critical")]
    assert not errors, f"unexpected errors in the log: {errors}"


@pytest.fixture
def esp(shared_esp: ESP_ATcontrol) -> ESP_ATcontrol:
    """The shared driver as each test starts: joined, no link open (a failed test may
    have left one, or left the network: the driver's socket_connect would wait forever)."""
    if shared_esp.status != ESP_ATcontrol.STATUS_APCONNECTED:
        shared_esp.socket_disconnect()
        if shared_esp.status != ESP_ATcontrol.STATUS_APCONNECTED:
            shared_esp.connect(WIFI, timeout=5, retries=1)  # not when joined: remote_AP's bug
    return shared_esp


# -- loopback servers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key, made now."""
    tmp = tmp_path_factory.mktemp("adafruit-tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "server.crt", tmp / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def server_tls(tls_files) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls_files)
    return context


class WifiEchoServer(EchoServer):
    """An echo a WiFi round trip away.  socket_send reads until its input ends in SEND OK: an
    echo in the same read (loopback's answer, a loaded machine past the 5 ms URC gap) makes
    it wait its whole 1 s timeout, which a real network's round trip never does."""

    ROUND_TRIP = 0.2

    def _serve(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                time.sleep(self.ROUND_TRIP)
                conn.sendall(data)
        except OSError:
            return
        self.closed_by_peer.set()


class TlsEchoServer(WifiEchoServer):
    """The WiFi echo server behind a TLS handshake."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except OSError:
            return
        super()._serve(tls)


class UdpEchoServer:
    """Sends every datagram back to where it came from."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.peers: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:  # the 0.1 s timeout, or closed
                continue
            self.peers.append(peer)
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class HttpServer:
    """http.server in a thread serving one random body at /blob (HTTPS with a context)."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.body = os.urandom(5000)
        self.paths: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.paths.append(self.path)
                found = self.path == "/blob"
                body = outer.body if found else b"not here"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


@pytest.fixture
def wifi_echo():
    server = WifiEchoServer()
    yield server
    server.close()


@pytest.fixture
def udp_echo():
    server = UdpEchoServer()
    yield server
    server.close()


@pytest.fixture
def tls_echo(server_tls):
    server = TlsEchoServer(server_tls)
    yield server
    server.close()


@pytest.fixture
def http_server():
    server = HttpServer()
    yield server
    server.close()


@pytest.fixture
def https_server(server_tls):
    server = HttpServer(server_tls)
    yield server
    server.close()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(esp: ESP_ATcontrol, payload: bytes) -> None:
    """socket_send on a TCP or SSL link: it returns on SEND OK, else after its 1 s timeout."""
    started = time.monotonic()
    assert esp.socket_send(payload)
    assert time.monotonic() - started < 1, "the driver waited its whole timeout: no SEND OK seen"


def _receive(esp: ESP_ATcontrol, length: int, timeout: float = 10.0) -> bytes:
    """socket_receive until ``length`` bytes came (it returns one +IPD at a time)."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < length and time.monotonic() < deadline:
        data += esp.socket_receive(timeout=2)
    return data


# -- the driver's flows ----------------------------------------------------------------------


# First: its own daemon is stopped before the shared one starts.
def test_soft_reset_and_reconnect(fresh_esp, wifi_echo):
    """soft_reset() sees ready within its timeout; the examples' is_connected/connect loop then gets a working link."""
    esp = fresh_esp
    started = time.monotonic()
    assert esp.soft_reset(timeout=5)
    assert time.monotonic() - started < 5, "the driver waited its whole timeout: no ready seen"
    for _ in range(3):  # the examples' `while not esp.is_connected: esp.connect(secrets)`, bounded
        if esp.is_connected:
            break
        esp.connect(WIFI, timeout=5, retries=1)
    assert esp.status == ESP_ATcontrol.STATUS_APCONNECTED
    assert esp.socket_connect(ESP_ATcontrol.TYPE_TCP, "127.0.0.1", wifi_echo.port)
    _send(esp, b"after reset")
    assert _receive(esp, 11) == b"after reset"
    esp.socket_disconnect()


def test_begin_join_leave_and_rejoin(esp):
    """begin() synced and read the version, connect() joined and the status queries agree; disconnect() leaves, connect() joins again."""
    assert esp.version.startswith("AT version:4.")
    # remote_AP would parse this, but compares bytes with a str, which only CircuitPython allows.
    assert b'+CWJAP:"bridged",' in esp.at_response("AT+CWJAP?")
    assert esp.local_ip == "127.0.0.1"
    assert esp.status == ESP_ATcontrol.STATUS_APCONNECTED
    assert esp.mode == ESP_ATcontrol.MODE_STATION
    assert esp.cipmux == 0
    started = time.monotonic()
    esp.disconnect(timeout=3)
    assert time.monotonic() - started < 3, "the driver waited its whole timeout: no WIFI DISCONNECT seen"
    assert esp.status == ESP_ATcontrol.STATUS_NOTCONNECTED
    esp.connect(WIFI, timeout=5, retries=1)
    assert esp.status == ESP_ATcontrol.STATUS_APCONNECTED


def test_tcp_echo(esp, wifi_echo):
    """socket_connect TCP, socket_send and socket_receive carry bytes both ways; disconnect closes."""
    payload = os.urandom(1500)
    assert esp.socket_connect(ESP_ATcontrol.TYPE_TCP, "127.0.0.1", wifi_echo.port)
    assert esp.status == ESP_ATcontrol.STATUS_SOCKETOPEN
    _send(esp, payload)
    assert _receive(esp, len(payload)) == payload
    esp.socket_disconnect()
    assert wifi_echo.closed_by_peer.wait(5)
    assert esp.status == ESP_ATcontrol.STATUS_APCONNECTED


def test_udp_echo(esp, udp_echo):
    """A UDP link sends a datagram and receives the echo on the driver's local port."""
    # For UDP the driver's `keepalive` argument lands in CIPSTART's <local port> field;
    # its default (10) would need CAP_NET_BIND_SERVICE, so the test names a free port.
    local_port = _free_udp_port()
    assert esp.socket_connect(ESP_ATcontrol.TYPE_UDP, "127.0.0.1", udp_echo.port, keepalive=local_port)
    assert esp.socket_send(b"datagram from the driver")
    assert _receive(esp, 24) == b"datagram from the driver"
    assert udp_echo.peers == [("127.0.0.1", local_port)]
    esp.socket_disconnect()


def test_ssl_echo(esp, tls_echo):
    """An SSL link (the driver's TLS mode) reaches a TLS echo server and carries bytes both ways."""
    payload = os.urandom(1000)
    assert esp.socket_connect(ESP_ATcontrol.TYPE_SSL, "127.0.0.1", tls_echo.port)
    _send(esp, payload)
    assert _receive(esp, len(payload)) == payload
    esp.socket_disconnect()
    assert tls_echo.closed_by_peer.wait(5)


def _session(esp: ESP_ATcontrol) -> adafruit_requests.Session:
    """adafruit_requests over the driver's socket module, as the driver's webclient example builds it."""
    pool = _socket_pool()
    return adafruit_requests.Session(pool, adafruit_connection_manager.create_fake_ssl_context(pool, esp))


def test_http_get(esp, http_server):
    """adafruit_requests GETs a 5000-byte body over a TCP link: status and body hash match."""
    esp.conntype = ESP_ATcontrol.TYPE_TCP  # the driver guesses only for ports 80 and 443
    with _session(esp).get(f"http://127.0.0.1:{http_server.port}/blob", timeout=5) as response:
        assert response.status_code == 200
        assert hashlib.sha256(response.content).hexdigest() == hashlib.sha256(http_server.body).hexdigest()
    assert http_server.paths == ["/blob"]


def test_https_get(esp, https_server):
    """adafruit_requests GETs over an SSL link (https:// picks the driver's TLS mode): status and hash match."""
    with _session(esp).get(f"https://127.0.0.1:{https_server.port}/blob", timeout=5) as response:
        assert response.status_code == 200
        assert hashlib.sha256(response.content).hexdigest() == hashlib.sha256(https_server.body).hexdigest()
    assert https_server.paths == ["/blob"]
