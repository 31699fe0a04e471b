"""An update server for the OTA tests, speaking the iot.espressif.cn protocol over
https (or plain http), serving signed images; and the certificates and keys it needs.

``UpdateServer`` serves, for every (version, partition) of ``images``, the image
and its detached signature ``<partition>.bin.sig`` made with ``key`` (as
``bridged ota sign`` makes it); ``signatures`` overrides what is served as a
signature (None: 404, no signature).  ``mode`` picks how the image download
misbehaves.  Every request is recorded.  The fixtures ``ota_files``, ``server``,
``start`` and ``shared_daemons`` are shared by the OTA test modules, which import them.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from bridged import ota_image
from bridged.pki import PkiStore
from tests.harness import Daemon, Host

__all__ = ["UpdateServer", "OtaFiles", "make_ota_files", "signature_for", "ota_section", "image_dir",
           "leftovers", "why", "ota_files", "server", "start", "shared_daemons", "Daemons", "Shared",
           "LATEST", "IMAGE", "TOKEN", "PROGRESS", "FAILED_DOWNLOAD"]

TOKEN = "test-token-0123"
PROGRESS = b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n+CIPUPDATE:4\r\n"
FAILED_DOWNLOAD = b"+CIPUPDATE:1\r\n\r\nERROR\r\n"  # a version given: 1, then the download fails
LATEST = "v4.1.2.0"
IMAGE = os.urandom(200_000)


def signature_for(key: Ed25519PrivateKey, image: bytes, version: str, partition: str) -> bytes:
    """What ``bridged ota sign`` writes for ``image``."""
    manifest = ota_image.Manifest(partition, version, len(image), hashlib.sha256(image).hexdigest())
    return ota_image.sign(key, manifest)


class UpdateServer:
    """iot.espressif.cn's three endpoints plus signatures; https when given a context."""

    def __init__(self, key: Ed25519PrivateKey, context: ssl.SSLContext | None = None,
                 host: str = "127.0.0.1", url_host: str | None = None) -> None:
        self.key = key
        self.images = {(LATEST, "ota"): IMAGE, ("v9.9.9.9", "ota"): b"\xe9older",
                       ("v4.0.0.0", "ota"): b"\xe9four-oh", (LATEST, "client_ca"): b"\xf1\xf1ca-bundle"}
        self.signatures: dict[tuple[str, str], bytes | None] = {}
        self.latest = LATEST
        self.mode = "ok"  # ok, short, nolength, stall
        self.status: dict[str, int] = {}  # path -> HTTP status to answer instead
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
        shown = url_host or (f"[{host}]" if ":" in host else host)
        self.url = f"{'https' if context else 'http'}://{shown}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

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
            body = json.dumps({"rom_version": self.latest, "status": 200}).encode()
            self._send(handler, 200, body, len(body))
        elif url.path == "/v1/device/rom/" and query.get("action") == "download_rom":
            filename = query.get("filename", "")
            if filename.endswith(".bin.sig"):
                self._signature(handler, query.get("version", ""), filename.removesuffix(".bin.sig"))
            else:
                self._download(handler, query)
        elif url.path == "/v1/device/rom":
            body = json.dumps({"productRoms": [{"version": "v4.1.1.0"}, {"version": LATEST}],
                               "status": 200}).encode()
            self._send(handler, 200, body, len(body))
        else:
            self._send(handler, 404, b"", 0)

    def _signature(self, handler, version: str, partition: str) -> None:
        wanted = (version, partition)
        if wanted in self.signatures:
            body = self.signatures[wanted]
        elif wanted in self.images:
            body = signature_for(self.key, self.images[wanted], version, partition)
        else:
            body = None
        if body is None:
            self._send(handler, 404, b"not found", 9)
        else:
            self._send(handler, 200, body, len(body))

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


# -- certificates and keys -------------------------------------------------------------


@dataclass(frozen=True)
class OtaFiles:
    """A test CA, server certificates it signed (for 127.0.0.1, and for localhost), and
    two Ed25519 key pairs (``key`` signs the server's images; ``other`` is a stranger)."""

    directory: Path
    key: Ed25519PrivateKey
    other: Ed25519PrivateKey

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def public_key(self) -> Path:
        return self.directory / "ota.pub"

    @property
    def other_public_key(self) -> Path:
        return self.directory / "other.pub"

    def server_context(self, name: str = "127.0.0.1") -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        return context


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
        try:
            names = [x509.IPAddress(ipaddress.ip_address(subject))]
        except ValueError:
            names = [x509.DNSName(subject)]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def make_ota_files(directory: Path) -> OtaFiles:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("OTA Test CA", ca_key, "OTA Test CA", ca_key, ca=True)
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in ("127.0.0.1", "localhost"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key, "OTA Test CA", ca_key, ca=False)
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}.key").write_bytes(_pem_private(key))
    files = OtaFiles(directory, Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate())
    files.public_key.write_bytes(_pem_public(files.key))
    files.other_public_key.write_bytes(_pem_public(files.other))
    return files


# -- fixtures (imported by the OTA test modules) -----------------------------------------


@pytest.fixture(scope="module")
def ota_files(tmp_path_factory) -> OtaFiles:
    return make_ota_files(tmp_path_factory.mktemp("ota-files"))


@pytest.fixture
def server(ota_files):
    """An https update server for 127.0.0.1, its images signed with ota_files.key."""
    s = UpdateServer(ota_files.key, ota_files.server_context())
    yield s
    s.close()


def _toml_list(items) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def ota_section(files: OtaFiles, server_url: str, *, secure: bool = True, ca_file: str | None = None,
                public_keys: tuple | None = None,
                partitions: tuple[str, ...] | None = ("ota", "client_ca")) -> str:
    """An [ota] section: the test CA and public key (secure), else plain http and unsigned
    allowed; ``public_keys`` replaces the test key, ``partitions=None`` leaves the default."""
    lines = ["[ota]", f'server = "{server_url}"', f'token = "{TOKEN}"']
    if partitions is not None:
        lines.append(f"partitions = {_toml_list(partitions)}")
    if secure:
        keys = (files.public_key,) if public_keys is None else public_keys
        lines += [f'ca_file = "{files.ca if ca_file is None else ca_file}"', f"public_key = {_toml_list(keys)}"]
    else:
        lines += ["insecure_http = true", "allow_unsigned = true"]
    return "\n".join(lines) + "\n"


def unexpected_errors(daemon: Daemon) -> list[dict]:
    return [e for e in daemon.events() if e.get("level") in ("error", "critical")
            and e.get("event") not in daemon.expected_errors]


class Daemons:
    """Daemons with an [ota] section (see ota_section; ``extra`` adds keys, ``ca`` imports a
    client_ca.0), each in a directory of its own under ``directory``; ``stop_all`` checks each:
    exit 0, no unexpected error in its log and never the token."""

    def __init__(self, directory: Path, files: OtaFiles) -> None:
        self.directory = directory
        self.files = files
        self.started: list[tuple[Daemon, Host]] = []

    def start(self, server_url: str = "", extra: str = "", *, ca: Path | None = None,
              wrap: tuple[str, ...] = (), **section) -> tuple[Daemon, Host]:
        directory = self.directory / f"d{len(self.started)}"
        directory.mkdir()
        daemon = Daemon(directory, ota_section(self.files, server_url, **section) + extra, wrap=wrap)
        if ca is not None:
            PkiStore(daemon.state_dir).import_file("client_ca", 0, ca)
        daemon.start()
        host = daemon.host()
        host.boot()
        self.started.append((daemon, host))
        return daemon, host

    def stop_all(self) -> None:
        for daemon, host in self.started:
            host.close()
            code = daemon.stop()
            assert code == 0, f"daemon exited {code}:\n{daemon.log_text()[-3000:]}"
            assert not (errors := unexpected_errors(daemon)), f"unexpected errors in the log: {errors}"
            assert TOKEN not in daemon.log_text(), "the OTA token reached the log"


@pytest.fixture
def start(tmp_path, ota_files):
    """Start a daemon for this test (Daemons.start), checked when the test ends."""
    daemons = Daemons(tmp_path, ota_files)
    yield daemons.start
    daemons.stop_all()


@pytest.fixture(scope="module")
def shared_daemons(tmp_path_factory, ota_files):
    """Daemons kept for a whole module (see Shared), checked when it ends."""
    daemons = Daemons(tmp_path_factory.mktemp("shared"), ota_files)
    yield daemons
    daemons.stop_all()


class Shared:
    """One daemon and its server kept across the cases of a parametrized test that fail or
    are refused: starting a daemon is most of such a case's time.  ``begin()`` starts a case:
    the session idle with update state 0 (AT+RST after a case that left -1, so a -1 seen is
    this case's), the server's recorded requests and misbehaviour reset; ``event()``,
    ``why()`` and ``refusal()`` then return only what this case logged, and ``end()`` fails a
    case that logged an unexpected error (the daemon's exit and the token are checked once,
    by shared_daemons)."""

    EVENTS = ("command_error", "ota_refused", "ota_failed")

    def __init__(self, daemon: Daemon, host: Host, server) -> None:
        self.daemon, self.host, self.server = daemon, host, server
        self._seen: dict[str, int] = {}
        self._errors = 0

    def begin(self) -> "Shared":
        if self.host.ask(b"AT+CIUPDATE?") != b"+CIUPDATE:0\r\n\r\nOK\r\n":
            # After a case whose ota update succeeded (a failure of that case) the session
            # restarted with echo on: its AT+RST answer is echoed, then ATE0 turns it off.
            answer = self.host.ask(b"AT+RST")
            assert answer.endswith(b"\r\nOK\r\n"), answer
            self.host.expect(b"\r\nready\r\n")
            self.host.expect(b"WIFI GOT IP\r\n")
            self.host.command(b"ATE0")
        assert self.host.ask(b"AT") == b"\r\nOK\r\n", "the last case left the session busy"
        self.server.requests.clear()
        if isinstance(self.server, UpdateServer):
            self.server.signatures.clear()
            self.server.latest, self.server.mode, self.server.status = LATEST, "ok", {}
        self._seen = {name: len(self.daemon.events(name)) for name in self.EVENTS}
        self._errors = len(unexpected_errors(self.daemon))
        return self

    def end(self) -> None:
        new = unexpected_errors(self.daemon)[self._errors:]
        assert not new, f"unexpected errors in the log: {new}"

    def event(self, name: str) -> dict:
        """This case's last ``name`` event (one of EVENTS), waited for."""
        return self.daemon.wait_event(name, count=self._seen[name] + 1)[-1]

    def why(self) -> str:
        """The reason of this case's last command_error."""
        return self.event("command_error")["why"]

    def refusal(self) -> str:
        """The reason of this case's last ota_refused warning."""
        return self.event("ota_refused")["why"]


def image_dir(daemon: Daemon) -> Path:
    return daemon.state_dir / "ota"


def leftovers(daemon: Daemon) -> list[str]:
    """Everything in the image directory (temporary files included)."""
    directory = image_dir(daemon)
    return sorted(os.listdir(directory)) if directory.exists() else []


def why(daemon: Daemon) -> str:
    return daemon.wait_event("command_error")[-1]["why"]
