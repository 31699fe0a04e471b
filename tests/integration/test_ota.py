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
    """No [ota] server: both commands answer ERROR and the log says why; the query still works."""
    daemon, host = start("")
    assert host.ask(b"AT+CIUPDATE") == b"\r\nERROR\r\n"
    assert "no update server is configured" in why(daemon)
    assert host.ask(b'AT+CIUPDATE=1,"v1",,1') == b"\r\nERROR\r\n"
    assert host.ask(b"AT+CIPFWVER?") == b"\r\nERROR\r\n"
    assert len([e for e in daemon.events("command_error") if "no update server" in e["why"]]) == 3
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:0\r\n\r\nOK\r\n"


def test_not_joined_answers_error(start, server):
    """Without Wi-Fi (AT+CWQAP) there is no network to update from."""
    daemon, host = start(server.url)
    host.ask(b"AT+CWQAP")
    host.expect(b"WIFI DISCONNECT\r\n")
    assert host.ask(b"AT+CIUPDATE") == b"\r\nERROR\r\n"
    assert "no ip" in why(daemon)
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
