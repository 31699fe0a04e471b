"""AT+CIUPDATE and AT+CIPFWVER? against a local update server (http and https)
speaking the iot.espressif.cn protocol, on 127.0.0.1."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridged.pki import PkiStore
from tests.harness import Daemon, EchoServer, Host

TOKEN = "test-token-0123"
LATEST = "v4.1.2.0"
IMAGE = os.urandom(200_000)
PROGRESS = b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n+CIPUPDATE:4\r\n"


# -- the update server -------------------------------------------------------------------


class UpdateServer:
    """iot.espressif.cn's three endpoints; ``mode`` picks how the download misbehaves."""

    def __init__(self, context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.images = {(LATEST, "ota"): IMAGE, ("v9.9.9.9", "ota"): b"\xe9older",
                       (LATEST, "client_ca"): b"\xf1\xf1ca-bundle"}
        self.mode = "ok"  # ok, short, nolength, status:<n>, stall
        self.status = {}  # path -> HTTP status to answer instead
        self.requests: list[tuple[str, dict]] = []
        self.release = threading.Event()  # ends a "stall"
        self.stalled = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, dict(self.headers)))
                server.handle(self)

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.httpd = Server((host, 0), Handler)
        self.httpd.daemon_threads = True
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if context else 'http'}://{shown}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _send(self, handler, status: int, body: bytes, length: int | None = None) -> None:
        handler.send_response(status)
        if length is not None:
            handler.send_header("Content-Length", str(length))
        handler.end_headers()
        handler.wfile.write(body)

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path in self.status:
            self._send(handler, self.status[url.path], b'{"message": "no"}', 17)
        elif url.path == "/v1/device/rom/" and query.get("is_format_simple") == "true":
            body = json.dumps({"rom_version": LATEST, "status": 200}).encode()
            self._send(handler, 200, body, len(body))
        elif url.path == "/v1/device/rom/" and query.get("action") == "download_rom":
            self._download(handler, query)
        elif url.path == "/v1/device/rom":
            body = json.dumps({"productRoms": [{"version": "v4.1.1.0"}, {"version": LATEST}],
                               "status": 200}).encode()
            self._send(handler, 200, body, len(body))
        else:
            self._send(handler, 404, b"", 0)

    def _download(self, handler, query: dict) -> None:
        image = self.images.get((query.get("version"), query.get("filename", "").removesuffix(".bin")))
        if image is None:
            self._send(handler, 404, b"not found", 9)
        elif self.mode == "short":
            self._send(handler, 200, image[: len(image) // 2], len(image))
        elif self.mode == "nolength":
            self._send(handler, 200, image)
        elif self.mode == "stall":
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(image)))
            handler.end_headers()
            handler.wfile.write(image[:1000])
            handler.wfile.flush()
            self.stalled.set()
            self.release.wait(30)
            handler.wfile.write(image[1000:])
        else:
            self._send(handler, 200, image, len(image))


@pytest.fixture
def server():
    s = UpdateServer()
    yield s
    s.close()


# -- certificates for https ------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A test CA and a server certificate for 127.0.0.1 it signed."""
    tmp = tmp_path_factory.mktemp("ota-pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("OTA Test CA", ca_key, "OTA Test CA", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate("127.0.0.1", key, "OTA Test CA", ca_key, ca=False)
    (tmp / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp


@pytest.fixture
def https_server(tls_files):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files / "server.pem", tls_files / "server.key")
    s = UpdateServer(context)
    yield s
    s.close()


# -- the daemon ----------------------------------------------------------------------------


@pytest.fixture
def start(tmp_path):
    """Start a daemon with an [ota] section (and a CA in its store); checked at the end."""
    started: list[tuple[Daemon, Host]] = []

    def make(server_url: str = "", extra: str = "", ca: Path | None = None) -> tuple[Daemon, Host]:
        directory = tmp_path / f"d{len(started)}"
        directory.mkdir()
        config = f'[ota]\nserver = "{server_url}"\ntoken = "{TOKEN}"\n{extra}'
        daemon = Daemon(directory, config)
        if ca is not None:
            PkiStore(daemon.state_dir).import_file("client_ca", 0, ca)
        daemon.start()
        host = daemon.host()
        host.boot()
        started.append((daemon, host))
        return daemon, host

    yield make
    for daemon, host in started:
        host.close()
        code = daemon.stop()
        assert code == 0, f"daemon exited {code}:\n{daemon.log_text()[-3000:]}"
        errors = [e for e in daemon.events() if e.get("level") in ("error", "critical")]
        assert not errors, f"unexpected errors in the log: {errors}"


def image_dir(daemon: Daemon) -> Path:
    return daemon.state_dir / "ota"


def leftovers(daemon: Daemon) -> list[str]:
    """Everything in the image directory (temporary files included)."""
    directory = image_dir(daemon)
    return sorted(os.listdir(directory)) if directory.exists() else []


def why(daemon: Daemon) -> str:
    return daemon.wait_event("command_error")[-1]["why"]


# -- blocking ------------------------------------------------------------------------------


def test_blocking_update_restarts_with_ready_and_closed_links(start, server):
    """AT+CIUPDATE: progress 1-4 then OK, the image saved whole, then the session restarts:
    links closed (the peer sees FIN), ready, the stored network joined again."""
    daemon, host = start(server.url)
    echo = EchoServer()
    try:
        assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % echo.port) == b"CONNECT\r\n\r\nOK\r\n"
        assert host.command(b"AT+CIUPDATE", timeout=20) == PROGRESS + b"\r\nOK\r\n"
        assert host.expect(b"\r\nready\r\n") == b"\r\nready\r\n"  # no CLOSED: a reboot says nothing
        assert echo.closed_by_peer.wait(5), "the link was not closed by the restart"
    finally:
        echo.close()
    host.expect(b"WIFI GOT IP\r\n")
    assert host.command(b"AT") == b"AT\r\n\r\nOK\r\n"  # echo is on again: a fresh session
    host.command(b"ATE0")
    assert host.ask(b"AT+CIPSTATUS") == b"STATUS:2\r\n\r\nOK\r\n"
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:0\r\n\r\nOK\r\n"  # state is RAM: 0 after a restart
    assert (image_dir(daemon) / "ota.bin").read_bytes() == IMAGE
    assert leftovers(daemon) == ["ota.bin"]
    paths = [p for p, _ in server.requests]
    assert paths == ["/v1/device/rom/?is_format_simple=true",
                     f"/v1/device/rom/?action=download_rom&version={LATEST}&filename=ota.bin"]
    assert all(h.get("Authorization") == f"token {TOKEN}" for _, h in server.requests)


def test_blocking_with_version_skips_the_lookup(start, server):
    """A version given: server found (1), then the download (4); no 2 and 3, as in at_ota_cmd.c."""
    daemon, host = start(server.url)
    assert host.command(b'AT+CIUPDATE=0,"v9.9.9.9"', timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:4\r\n\r\nOK\r\n")
    host.expect(b"\r\nready\r\n")
    assert (image_dir(daemon) / "ota.bin").read_bytes() == b"\xe9older"
    assert [p for p, _ in server.requests] == [
        "/v1/device/rom/?action=download_rom&version=v9.9.9.9&filename=ota.bin"]


def test_blocking_other_partition_does_not_restart(start, server):
    """Another partition is saved under its own name; OK and no restart (ESP-AT restarts only for ota)."""
    daemon, host = start(server.url)
    assert host.ask(b'AT+CIUPDATE=1,,"client_ca"', timeout=20) == PROGRESS + b"\r\nOK\r\n"
    assert host.read_quiet(0.3) == b""  # no ready
    assert (image_dir(daemon) / "client_ca.bin").read_bytes() == b"\xf1\xf1ca-bundle"
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:4\r\n\r\nOK\r\n"


@pytest.mark.parametrize(("mode", "reason"), [
    ("short", "the body ended after 100000 of 200000 bytes"),
    ("nolength", "the server sent no Content-Length"),
])
def test_blocking_bad_download_fails_and_keeps_nothing(start, server, mode, reason):
    """A short body or no Content-Length: the last progress line, ERROR, state -1, no file left."""
    server.mode = mode
    daemon, host = start(server.url)
    assert host.ask(b"AT+CIUPDATE", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert reason in why(daemon)
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"
    assert leftovers(daemon) == []


def test_too_big_image_is_refused(start, server):
    """An image over [ota] max_size is refused before a byte is written."""
    daemon, host = start(server.url, "max_size = 199999\n")
    assert host.ask(b"AT+CIUPDATE", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert "200000 bytes is over [ota] max_size 199999" in why(daemon)
    assert leftovers(daemon) == []


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_status_fails(start, server, status):
    """HTTP 404/500 for the version lookup or the image: ERROR."""
    daemon, host = start(server.url)
    server.status["/v1/device/rom/"] = status
    assert host.ask(b"AT+CIUPDATE", timeout=20) == b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n\r\nERROR\r\n"
    assert f"HTTP status {status}" in why(daemon)
    assert host.ask(b'AT+CIUPDATE=0,"v0.0.0.1"', timeout=20) == b"+CIPUPDATE:1\r\n\r\nERROR\r\n"
    assert leftovers(daemon) == []


def test_unknown_version_is_404(start, server):
    """A version the server does not have: its 404 ends the update."""
    daemon, host = start(server.url)
    assert host.ask(b'AT+CIUPDATE=0,"v0.0.0.1"', timeout=20) == b"+CIPUPDATE:1\r\n\r\nERROR\r\n"
    assert "HTTP status 404" in why(daemon)


def test_server_down_fails(start):
    """Nothing listens at the server's port: server found (1), the connection is refused, ERROR."""
    daemon, host = start("http://127.0.0.1:9")
    assert host.ask(b"AT+CIUPDATE", timeout=20) == b"+CIPUPDATE:1\r\n\r\nERROR\r\n"
    assert "cannot connect to 127.0.0.1 port 9" in why(daemon)
    assert host.ask(b"AT+CIPFWVER?", timeout=20) == b"\r\nERROR\r\n"


def test_not_configured_answers_error(start):
    """No [ota] server: blocking AT+CIUPDATE and AT+CIPFWVER? answer ERROR and the log says why;
    the query still works."""
    daemon, host = start("")
    assert host.ask(b"AT+CIUPDATE") == b"\r\nERROR\r\n"
    assert "no update server is configured" in why(daemon)
    assert host.ask(b'AT+CIUPDATE=1,"v1",,0') == b"\r\nERROR\r\n"
    assert host.ask(b"AT+CIPFWVER?") == b"\r\nERROR\r\n"
    assert len([e for e in daemon.events("command_error") if "no update server" in e["why"]]) == 3
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:0\r\n\r\nOK\r\n"


def test_not_configured_nonblocking_says_ok_then_minus_one(start):
    """No [ota] server, nonblocking: OK, then +CIPUPDATE:-1 on its own, as ESP-AT ends an
    update that cannot start; the log says why, the query shows -1, nothing restarts."""
    daemon, host = start("")
    assert host.ask(b'AT+CIUPDATE=1,"v1",,1') == b"\r\nOK\r\n"
    assert host.expect(b"+CIPUPDATE:-1\r\n") == b"+CIPUPDATE:-1\r\n"
    assert "no update server is configured" in daemon.wait_event("ota_failed")[-1]["why"]
    assert host.read_quiet(0.3) == b""  # no ready
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"  # not "already in OTA"
    assert host.expect(b"+CIPUPDATE:-1\r\n") == b"+CIPUPDATE:-1\r\n"
    assert not daemon.events("command_error")
    assert leftovers(daemon) == []


def test_not_joined_answers_error(start, server):
    """Without Wi-Fi (AT+CWQAP) there is no network to update from: blocking, ERROR;
    nonblocking, OK and +CIPUPDATE:-1."""
    daemon, host = start(server.url)
    host.ask(b"AT+CWQAP")
    host.expect(b"WIFI DISCONNECT\r\n")
    assert host.ask(b"AT+CIUPDATE") == b"\r\nERROR\r\n"
    assert "no ip" in why(daemon)
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
    assert host.expect(b"+CIPUPDATE:-1\r\n") == b"+CIPUPDATE:-1\r\n"
    assert "no ip" in daemon.wait_event("ota_failed")[-1]["why"]
    assert server.requests == []


@pytest.mark.parametrize("line", [
    b"AT+CIUPDATE=2",                       # mode 0 or 1
    b"AT+CIUPDATE=-1",
    b'AT+CIUPDATE="0"',                     # a number, not a string
    b"AT+CIUPDATE=0,1",                     # version is a string
    b'AT+CIUPDATE=0,"' + b"v" * 65 + b'"',  # version at most 64
    b'AT+CIUPDATE=0,,"' + b"p" * 65 + b'"',  # partition at most 64
    b'AT+CIUPDATE=0,,"../nvs"',             # partition names become file names
    b"AT+CIUPDATE=0,,,2",                   # nonblocking 0 or 1
    b"AT+CIUPDATE=0,,,1,0",                 # too many
    b"AT+CIUPDATE=",
    b"AT+CIUPDATE=?",
    b"AT+CIPFWVER",
    b"AT+CIPFWVER=1",
])
def test_bad_parameters_answer_error(start, server, line):
    """Bad parameters or a missing form: ERROR at once, nothing requested."""
    daemon, host = start(server.url)
    assert host.ask(line) == b"\r\nERROR\r\n"
    assert server.requests == []


def test_longest_version_and_partition_accepted(start, server):
    """64 bytes each are allowed (ESP_AT_VERSION_LEN_MAX, ESP_AT_PARTITION_NAME_LEN_MAX)."""
    daemon, host = start(server.url)
    version, partition = "v" * 64, "p" * 64
    line = f'AT+CIUPDATE=0,"{version}","{partition}"'.encode()
    assert host.ask(line, timeout=20) == b"+CIPUPDATE:1\r\n\r\nERROR\r\n"  # the server has no such image
    assert server.requests[-1][0] == (
        f"/v1/device/rom/?action=download_rom&version={version}&filename={partition}.bin")


# -- nonblocking ---------------------------------------------------------------------------


def test_nonblocking_update(start, server):
    """OK at once, then progress 1-4 as unsolicited lines; no restart; commands work meanwhile."""
    daemon, host = start(server.url)
    out = host.ask(b"AT+CIUPDATE=0,,,1")
    assert out == b"\r\nOK\r\n"
    assert host.expect(b"+CIPUPDATE:4\r\n", timeout=20) == PROGRESS
    assert host.read_quiet(0.3) == b""  # no ready: the MCU restarts by itself
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:4\r\n\r\nOK\r\n"
    assert (image_dir(daemon) / "ota.bin").read_bytes() == IMAGE


def test_nonblocking_failure_ends_with_minus_one(start, server):
    """A failed nonblocking update: OK, the progress so far, then +CIPUPDATE:-1; no file left."""
    server.mode = "short"
    daemon, host = start(server.url)
    assert host.ask(b"AT+CIUPDATE=1,,,1") == b"\r\nOK\r\n"
    assert host.expect(b"+CIPUPDATE:-1\r\n", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n+CIPUPDATE:-1\r\n")
    assert "the body ended after" in daemon.wait_event("ota_failed")[-1]["why"]
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"
    assert leftovers(daemon) == []


def test_second_update_while_one_runs_is_refused(start, server):
    """While a nonblocking update downloads: the query shows 3, any new update is ERROR,
    other commands answer; once the download ends, 4."""
    server.mode = "stall"
    daemon, host = start(server.url)
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
    assert server.stalled.wait(10)
    assert host.expect(b"+CIPUPDATE:3\r\n", timeout=10).endswith(b"+CIPUPDATE:3\r\n")
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:3\r\n\r\nOK\r\n"
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nERROR\r\n"
    assert "ALREADY IN OTA" in why(daemon)
    assert host.ask(b"AT+CIUPDATE") == b"\r\nERROR\r\n"
    assert list(image_dir(daemon).glob("ota.bin")) == []  # only the temporary file so far
    server.release.set()
    assert host.expect(b"+CIPUPDATE:4\r\n", timeout=20) == b"+CIPUPDATE:4\r\n"
    assert (image_dir(daemon) / "ota.bin").read_bytes() == IMAGE


def test_restart_abandons_a_running_update(start, server):
    """AT+RST during a nonblocking download cancels it: no file kept, no late progress line."""
    server.mode = "stall"
    daemon, host = start(server.url)
    assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
    assert server.stalled.wait(10)
    host.expect(b"+CIPUPDATE:3\r\n", timeout=10)
    assert host.ask(b"AT+RST") == b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    host.expect(b"WIFI GOT IP\r\n")
    server.release.set()
    assert b"CIPUPDATE" not in host.read_quiet(0.5)
    assert leftovers(daemon) == []


def test_blocking_update_refuses_input_with_busy(start, server):
    """While a blocking update runs, input gets busy p... (the answer is unchanged)."""
    server.mode = "stall"
    daemon, host = start(server.url)
    host.write(b"AT+CIUPDATE\r\n")
    assert server.stalled.wait(10)
    host.expect(b"+CIPUPDATE:3\r\n", timeout=10)
    host.write(b"AT\r\n")
    assert host.expect(b"\r\nbusy p...\r\n", timeout=5) == b"\r\nbusy p...\r\n"
    server.release.set()
    assert host.expect(b"\r\nOK\r\n", timeout=20) == b"+CIPUPDATE:4\r\n\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")


def test_overall_timer_fails_the_update(start, server):
    """[ota] timeout_ms (ESP-AT: 3 minutes) ends a stalled download: ERROR, no file left."""
    server.mode = "stall"
    daemon, host = start(server.url, "timeout_ms = 1500\n")
    began = time.monotonic()
    assert host.ask(b"AT+CIUPDATE", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert 1.4 < time.monotonic() - began < 8
    assert "longer than 1.5 s" in why(daemon)
    assert leftovers(daemon) == []


# -- install_command -----------------------------------------------------------------------


def _installer(tmp_path: Path, status: int) -> str:
    script = tmp_path / f"install-{status}.sh"
    script.write_text(f'#!/bin/sh\ncp "$1" "{tmp_path}/installed.bin"\n'
                      f'echo "$BRIDGED_OTA_VERSION $BRIDGED_OTA_PARTITION" > "{tmp_path}/installed.txt"\n'
                      f'echo installing; exit {status}\n')
    return f'install_command = "/bin/sh {script}"\n'


def test_install_command_runs_before_the_restart(start, server, tmp_path):
    """The install command gets the image's path (and version, partition); then OK and ready."""
    daemon, host = start(server.url, _installer(tmp_path, 0))
    assert host.command(b"AT+CIUPDATE", timeout=20) == PROGRESS + b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    assert hashlib.sha256((tmp_path / "installed.bin").read_bytes()).digest() == hashlib.sha256(IMAGE).digest()
    assert (tmp_path / "installed.txt").read_text() == f"{LATEST} ota\n"
    assert daemon.wait_event("ota_installed")[-1]["output"] == "installing"


def test_install_command_failure_fails_the_update(start, server, tmp_path):
    """A non-zero exit: no +CIPUPDATE:4, ERROR, no restart, the image removed."""
    daemon, host = start(server.url, _installer(tmp_path, 3))
    assert host.ask(b"AT+CIUPDATE", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert "install_command exited with status 3: installing" in why(daemon)
    assert host.read_quiet(0.3) == b""
    assert leftovers(daemon) == []
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"


# -- AT+CIPFWVER? ---------------------------------------------------------------------------


def test_cipfwver_lists_the_server_versions(start, server):
    """One +CIPFWVER:"<v>" line per version, then OK; the token is sent."""
    daemon, host = start(server.url + "/")
    assert host.ask(b"AT+CIPFWVER?") == b'+CIPFWVER:"v4.1.1.0"\r\n+CIPFWVER:"v4.1.2.0"\r\n\r\nOK\r\n'
    assert server.requests == [("/v1/device/rom", server.requests[0][1])]
    assert server.requests[0][1]["Authorization"] == f"token {TOKEN}"


@pytest.mark.parametrize("status", [404, 500])
def test_cipfwver_http_error(start, server, status):
    """HTTP status >= 400: ERROR."""
    daemon, host = start(server.url)
    server.status["/v1/device/rom"] = status
    assert host.ask(b"AT+CIPFWVER?") == b"\r\nERROR\r\n"
    assert f"HTTP status {status}" in why(daemon)


def test_server_path_prefix(start, server):
    """A base URL with a path: requests go below it."""
    daemon, host = start(server.url + "/esp")
    assert host.ask(b"AT+CIPFWVER?") == b"\r\nERROR\r\n"
    assert server.requests[0][0] == "/esp/v1/device/rom"


def test_host_name_resolves(start, server):
    """A host name in the base URL resolves through the host's resolver (AT+CIPDNS automatic)."""
    daemon, host = start(server.url.replace("127.0.0.1", "localhost"))
    assert host.ask(b"AT+CIPFWVER?") == b'+CIPFWVER:"v4.1.1.0"\r\n+CIPFWVER:"v4.1.2.0"\r\n\r\nOK\r\n'
    assert server.requests[0][1]["Host"] == f"localhost:{server.port}"


def test_unknown_host_name_fails(start):
    """A name with no address: ERROR before "server found"."""
    daemon, host = start("http://no-such-host.invalid:8080")
    assert host.ask(b"AT+CIUPDATE", timeout=20) == b"\r\nERROR\r\n"
    assert "no-such-host.invalid" in why(daemon)


def test_ipv6_server(start):
    """The admin's server may be IPv6 whatever AT+CIPV6 says (it is not the MCU's address)."""
    try:
        v6 = UpdateServer(host="::1")
    except OSError:
        pytest.skip("no ::1 on this machine")
    try:
        daemon, host = start(v6.url)
        assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
        assert host.expect(b"+CIPUPDATE:4\r\n", timeout=20) == PROGRESS
        assert v6.requests[0][1]["Host"] == f"[::1]:{v6.port}"
    finally:
        v6.close()


def test_no_rom_version_fails(start, server):
    """A version answer without "rom_version": the lookup fails after 2."""
    daemon, host = start(server.url)
    server.status["/v1/device/rom/"] = 204
    assert host.ask(b"AT+CIUPDATE", timeout=20) == b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n\r\nERROR\r\n"
    assert 'no "rom_version"' in why(daemon)


# -- https -----------------------------------------------------------------------------------


def test_https_update_trusts_the_certificate_store(start, https_server, tls_files):
    """An https server signed by a CA in bridged's store (client_ca.0): update and version list work."""
    daemon, host = start(https_server.url, ca=tls_files / "ca.pem")
    assert host.ask(b"AT+CIPFWVER?") == b'+CIPFWVER:"v4.1.1.0"\r\n+CIPFWVER:"v4.1.2.0"\r\n\r\nOK\r\n'
    assert host.command(b"AT+CIUPDATE=1", timeout=20) == PROGRESS + b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    assert (image_dir(daemon) / "ota.bin").read_bytes() == IMAGE


def test_https_untrusted_server_fails(start, https_server):
    """Without the CA the server's certificate does not verify: ERROR, nothing downloaded."""
    daemon, host = start(https_server.url)
    assert host.ask(b"AT+CIUPDATE=1", timeout=20) == b"+CIPUPDATE:1\r\n\r\nERROR\r\n"
    assert "TLS" in why(daemon) or "CERTIFICATE_VERIFY_FAILED" in why(daemon)
    assert host.ask(b"AT+CIPFWVER?") == b"\r\nERROR\r\n"
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


@pytest.fixture
def raw():
    servers: list[RawServer] = []

    def make(answer) -> RawServer:
        servers.append(RawServer(answer))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


FAILED_DOWNLOAD = b"+CIPUPDATE:1\r\n\r\nERROR\r\n"  # a version given: 1, then the download fails


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
def test_broken_server_answers_fail_cleanly(start, raw, answer, reason):
    """Odd or lying answers to the download: ERROR, a reason in the log, no file, no internal error."""
    server = raw(answer)
    daemon, host = start(server.url)
    assert host.ask(b'AT+CIUPDATE=0,"v1"', timeout=20) == FAILED_DOWNLOAD
    assert reason in why(daemon)
    assert leftovers(daemon) == []
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"


def test_longer_body_than_content_length_keeps_only_the_declared_bytes(start, raw):
    """A body longer than its Content-Length: the declared bytes are the image."""
    server = raw(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello and more")
    daemon, host = start(server.url)
    assert host.ask(b'AT+CIUPDATE=0,"v1","part"', timeout=20) == b"+CIPUPDATE:1\r\n+CIPUPDATE:4\r\n\r\nOK\r\n"
    assert (image_dir(daemon) / "part.bin").read_bytes() == b"hello"


def test_slow_loris_body_is_ended_by_the_overall_timer(start, raw):
    """One byte a second of a large body: [ota] timeout_ms still ends the update."""
    def trickle(conn, done):
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while not done.wait(0.5):
            conn.sendall(b"x")

    server = raw(trickle)
    daemon, host = start(server.url, "timeout_ms = 1500\n")
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
    daemon, host = start(server.url)
    assert host.ask(b"AT+CIPFWVER?") == b'+CIPFWVER:"v1\\"\r\n+CIPFWVER:"v4.1.0.0"\r\n\r\nOK\r\n'


def test_cipfwver_many_versions_all_arrive(start, raw):
    """Thousands of versions (the body is capped at 64 KiB): every line, then OK."""
    body = b'{"productRoms": [' + b",".join(b'{"version": "v%d"}' % i for i in range(3000)) + b"]}"
    assert len(body) < 65536
    server = raw(b"HTTP/1.0 200 OK\r\n\r\n" + body)  # no Content-Length: to the close
    daemon, host = start(server.url)
    out = host.ask(b"AT+CIPFWVER?", timeout=30)
    assert out == b"".join(b'+CIPFWVER:"v%d"\r\n' % i for i in range(3000)) + b"\r\nOK\r\n"


# -- the disk --------------------------------------------------------------------------------


def test_image_directory_not_writable_fails_cleanly(start, server):
    """<state dir>/ota cannot be made (here a file is in the way): ERROR and why, not a crash."""
    daemon, host = start(server.url)
    image_dir(daemon).write_bytes(b"in the way")
    assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9"', timeout=20) == FAILED_DOWNLOAD
    assert "cannot write in" in why(daemon)
    assert image_dir(daemon).read_bytes() == b"in the way"


def test_disk_full_fails_cleanly_and_keeps_the_previous_image(tmp_path, server):
    """A write error mid-download (RLIMIT_FSIZE stands in for a full disk): ERROR and why,
    no temporary file, the previous image of that partition untouched."""
    daemon = Daemon(tmp_path, f'[ota]\nserver = "{server.url}"\n', wrap=("prlimit", "--fsize=150000", "--"))
    (daemon.state_dir / "ota").mkdir(parents=True)
    (daemon.state_dir / "ota" / "ota.bin").write_bytes(b"good")
    daemon.start()
    host = daemon.host()
    try:
        host.boot()
        assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
        assert host.expect(b"+CIPUPDATE:-1\r\n", timeout=20).endswith(b"+CIPUPDATE:3\r\n+CIPUPDATE:-1\r\n")
        assert "cannot write" in daemon.wait_event("ota_failed")[-1]["why"]
        assert leftovers(daemon) == ["ota.bin"]
        assert (image_dir(daemon) / "ota.bin").read_bytes() == b"good"
        assert daemon.events("ota_crashed") == []
    finally:
        host.close()
        assert daemon.stop() == 0


# -- install_command: what it gets, and that nothing of it outlives the update --------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _wait_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.02)
    return path.read_text()


def _hanging_installer(tmp_path: Path) -> str:
    """Starts a child and hangs; both pids go to pids.txt."""
    script = tmp_path / "hang.sh"
    script.write_text(f'#!/bin/sh\nsleep 300 &\necho "$$ $!" > "{tmp_path}/pids.txt"\nsleep 300\n')
    return f'install_command = "/bin/sh {script}"\n'


def test_install_command_gets_no_fd_of_ours_and_the_image_dir_as_cwd(start, server, tmp_path):
    """Only stdin, stdout and stderr reach the command (not the serial port, rings or the
    supervisor socket: uvloop ignores close_fds); its cwd is the image directory."""
    script = tmp_path / "fds.py"
    script.write_text(
        "import os, json\n"
        "fds = {}\n"
        "for n in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        fds[n] = os.readlink(f'/proc/self/fd/{n}')\n"
        "    except OSError:\n"
        "        pass  # the listing's own, closed by now\n"
        f"open({str(tmp_path / 'fds.json')!r}, 'w').write(json.dumps({{'fds': fds, 'cwd': os.getcwd()}}))\n")
    daemon, host = start(server.url, f'install_command = "{sys.executable} {script}"\n')
    assert host.ask(b'AT+CIUPDATE=1,,"client_ca"', timeout=20) == PROGRESS + b"\r\nOK\r\n"
    seen = json.loads((tmp_path / "fds.json").read_text())
    extra = {fd: target for fd, target in seen["fds"].items()
             if int(fd) > 2}
    assert extra == {}
    assert seen["cwd"] == str(image_dir(daemon))


def test_install_command_hanging_past_the_timer_is_killed_with_its_children(start, server, tmp_path):
    """The overall timer kills the command and what it started; ERROR, no image left."""
    daemon, host = start(server.url, "timeout_ms = 3000\n" + _hanging_installer(tmp_path))
    assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9"', timeout=20) == FAILED_DOWNLOAD
    assert "longer than 3 s" in why(daemon)
    pids = [int(p) for p in _wait_file(tmp_path / "pids.txt").split()]
    assert _wait_gone(pids) == []
    assert leftovers(daemon) == []


def test_restart_kills_a_running_install_command(start, server, tmp_path):
    """AT+RST during a nonblocking update's install: the command and its child die, no image kept."""
    daemon, host = start(server.url, _hanging_installer(tmp_path))
    assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9",,1') == b"\r\nOK\r\n"
    host.expect(b"+CIPUPDATE:1\r\n")
    pids = [int(p) for p in _wait_file(tmp_path / "pids.txt").split()]
    assert host.ask(b"AT+RST") == b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    assert _wait_gone(pids) == []
    assert leftovers(daemon) == []
    host.expect(b"WIFI GOT IP\r\n")
    host.command(b"ATE0")  # a fresh session echoes again
    # and a new update can start at once
    (tmp_path / "pids.txt").unlink()
    assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9",,1') == b"\r\nOK\r\n"
    host.expect(b"+CIPUPDATE:1\r\n")
    pids = [int(p) for p in _wait_file(tmp_path / "pids.txt").split()]
    assert host.ask(b"AT+CIPFWVER?") == b'+CIPFWVER:"v4.1.1.0"\r\n+CIPFWVER:"v4.1.2.0"\r\n\r\nOK\r\n'
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:1\r\n\r\nOK\r\n"
    assert host.ask(b"AT+RST") == b"\r\nOK\r\n"
    assert _wait_gone(pids) == []


def test_stop_during_an_install_leaves_no_process_and_no_file(tmp_path, server):
    """SIGTERM to bridged while install_command runs: the command and its child die, the
    image is removed, bridged exits 0."""
    daemon = Daemon(tmp_path, f'[ota]\nserver = "{server.url}"\n' + _hanging_installer(tmp_path))
    daemon.start()
    host = daemon.host()
    try:
        host.boot()
        assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9",,1') == b"\r\nOK\r\n"
        host.expect(b"+CIPUPDATE:1\r\n")
        pids = [int(p) for p in _wait_file(tmp_path / "pids.txt").split()]
    finally:
        host.close()
        assert daemon.stop() == 0
    assert _wait_gone(pids) == []
    assert leftovers(daemon) == []


def test_stop_during_a_download_leaves_no_temporary_file(tmp_path, server):
    """SIGTERM to bridged mid-download: no .part file left."""
    server.mode = "stall"
    daemon = Daemon(tmp_path, f'[ota]\nserver = "{server.url}"\n')
    daemon.start()
    host = daemon.host()
    try:
        host.boot()
        assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
        assert server.stalled.wait(10)
        host.expect(b"+CIPUPDATE:3\r\n", timeout=10)
        deadline = time.monotonic() + 10
        while len(leftovers(daemon)) != 1:  # the temporary file
            assert time.monotonic() < deadline, leftovers(daemon)
            time.sleep(0.02)
    finally:
        host.close()
        assert daemon.stop() == 0
    assert leftovers(daemon) == []


def test_install_failure_keeps_the_previous_image(start, server, tmp_path):
    """A failed install of a partition restores the image its last update left."""
    daemon, host = start(server.url)
    assert host.ask(b'AT+CIUPDATE=1,,"client_ca"', timeout=20) == PROGRESS + b"\r\nOK\r\n"
    daemon2, host2 = start(server.url, _installer(tmp_path, 3))
    image_dir(daemon2).mkdir()
    (image_dir(daemon2) / "ota.bin").write_bytes(b"good")
    assert host2.ask(b"AT+CIUPDATE", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert (image_dir(daemon2) / "ota.bin").read_bytes() == b"good"
    assert leftovers(daemon2) == ["ota.bin"]


def test_install_command_leaving_a_job_behind_does_not_hang_the_update(start, server, tmp_path):
    """A command that schedules something in the background (holding its stdout) and exits 0:
    the update succeeds at once, the job is left alone."""
    script = tmp_path / "later.sh"
    script.write_text(f'#!/bin/sh\nsleep 30 &\necho "$!" > "{tmp_path}/job.txt"\necho scheduled\n')
    daemon, host = start(server.url, f'timeout_ms = 10000\ninstall_command = "/bin/sh {script}"\n')
    began = time.monotonic()
    assert host.ask(b'AT+CIUPDATE=1,,"client_ca"', timeout=20) == PROGRESS + b"\r\nOK\r\n"
    assert time.monotonic() - began < 5
    job = int(_wait_file(tmp_path / "job.txt"))
    try:
        assert _alive(job)
        assert daemon.wait_event("ota_installed")[-1]["output"] == "scheduled"
    finally:
        os.kill(job, 9)


def test_missing_install_program_fails_cleanly(start, server):
    daemon, host = start(server.url, 'install_command = "/nonexistent/installer --now"\n')
    assert host.ask(b'AT+CIUPDATE=1,,"client_ca"', timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert "install_command '/nonexistent/installer'" in why(daemon)
    assert leftovers(daemon) == []


# -- TLS verifies the host name ------------------------------------------------------------


def test_https_host_name_must_match_the_certificate(start, https_server, tls_files):
    """A trusted CA is not enough: the certificate names 127.0.0.1, not localhost."""
    daemon, host = start(https_server.url.replace("127.0.0.1", "localhost"), ca=tls_files / "ca.pem")
    assert host.ask(b"AT+CIPFWVER?", timeout=20) == b"\r\nERROR\r\n"
    assert "certificate" in why(daemon).lower() or "hostname" in why(daemon).lower()
    assert https_server.requests == []
