"""SSL links and the SSL server, against TLS peers on loopback with
certificates made by the test."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests import forkserver
from tests.harness import Daemon, Demux, free_port

PSK = hasattr(ssl.SSLContext, "set_psk_server_callback")


# -- certificates ----------------------------------------------------------------------


@dataclass
class Issued:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(tmp: Path, name: str, cn: str, issuer: tuple | None = None, ca: bool = False,
           sans: tuple = (), expired: bool = False,
           valid: tuple[datetime.datetime, datetime.datetime] | None = None) -> tuple[Issued, tuple]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)) if expired else (
        now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
    if valid is not None:
        start, end = valid
    issuer_name, issuer_key = (issuer[0], issuer[1]) if issuer else (_name(cn), key)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    # Key identifiers: Python 3.13's default context verifies strictly (X509_STRICT).
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Issued(cert_path, key_path), (cert.subject, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pki")
    ca, ca_id = _issue(tmp, "ca", "Test CA", ca=True)
    other_ca, _ = _issue(tmp, "other-ca", "Other CA", ca=True)
    local = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.IPAddress(ipaddress.ip_address("::1")))
    server, _ = _issue(tmp, "server", "localhost", ca_id, sans=local)
    expired, _ = _issue(tmp, "expired", "localhost", ca_id, sans=local, expired=True)
    client, _ = _issue(tmp, "client", "mcu-client", ca_id)
    return {"ca": ca, "other_ca": other_ca, "server": server, "expired": expired, "client": client}


def _import(daemon: Daemon, kind: str, index: int, path: Path) -> None:
    from bridged.pki import PkiStore

    PkiStore(daemon.state_dir).import_file(kind, index, path)


# -- a TLS peer ------------------------------------------------------------------------------


class TlsServer:
    """Echoes over TLS; records SNI, the ALPN offer and the client certificate."""

    def __init__(self, issued: Issued, client_ca: Path | None = None, alpn: tuple = (),
                 family=socket.AF_INET, host="127.0.0.1", psk: bytes | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(issued.cert, issued.key)
        if client_ca:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(client_ca)
        if alpn:
            self.ctx.set_alpn_protocols(list(alpn))
        if psk is not None:
            self.ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            self.ctx.set_ciphers("PSK")
            self.ctx.set_psk_server_callback(lambda identity: psk if identity == "mcu" else b"", "hint")
        self.sni: list[str | None] = []
        self.ctx.sni_callback = lambda sock, name, ctx: self.sni.append(name)
        self.alpn: list[str | None] = []
        self.peer_certs: list[dict] = []
        self.errors: list[str] = []
        self.sock = socket.socket(family)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(str(exc))
            conn.close()
            return
        self.alpn.append(tls.selected_alpn_protocol())
        self.peer_certs.append(tls.getpeercert())
        try:
            while data := tls.recv(65536):
                tls.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        tls.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon(make_daemon):
    """Certificate dates checked against the host clock, as these tests expect
    ([sntp] source = "host"); test_sntp.py covers the device's SNTP clock."""
    return make_daemon('[sntp]\nsource = "host"\n')


@pytest.fixture
def tls_host(daemon, host):
    host.command(b"AT+CIPMUX=1")
    return daemon, host


def _echo_ok(host, link_id: int, payload: bytes = b"secret") -> None:
    demux = Demux(host)
    assert demux.send(link_id, payload).endswith(b"SEND OK\r\n")
    assert demux.wait_data(link_id, len(payload)) == payload


# -- client modes ------------------------------------------------------------------------------


def test_auth_0_talks_to_any_server(tls_host, pki):
    """auth_mode 0 (the default) checks nothing, like ESP-AT: an SSL link echoes."""
    daemon, host = tls_host
    server = TlsServer(pki["server"])
    try:
        assert host.ask(b"AT+CIPSSLCCONF?").startswith(b"+CIPSSLCCONF:0,0,0,0\r\n")
        assert host.ask(b'AT+CIPSTART=0,"SSL","127.0.0.1",%d' % server.port) == b"0,CONNECT\r\n\r\nOK\r\n"
        assert host.ask(b"AT+CIPSTATE?").startswith(b'+CIPSTATE:0,"SSL","127.0.0.1",%d,' % server.port)
        _echo_ok(host, 0)
    finally:
        server.close()


def test_auth_2_verifies_the_server(tls_host, pki):
    """auth_mode 2: the right CA connects; a wrong CA, a wrong CN or an expired certificate is refused."""
    daemon, host = tls_host
    daemon.expected_errors.add("connect_failed")
    good, expired = TlsServer(pki["server"]), TlsServer(pki["expired"])
    try:
        _import(daemon, "client_ca", 0, pki["ca"].cert)
        _import(daemon, "client_ca", 1, pki["other_ca"].cert)
        host.command(b"AT+CIPSSLCCONF=1,2,0,0")
        assert host.ask(b'AT+CIPSTART=1,"SSL","127.0.0.1",%d' % good.port) == b"1,CONNECT\r\n\r\nOK\r\n"
        _echo_ok(host, 1)
        host.command(b"AT+CIPSSLCCONF=2,2,0,1")
        assert host.ask(b'AT+CIPSTART=2,"SSL","127.0.0.1",%d' % good.port) == b"\r\nERROR\r\n"
        host.command(b"AT+CIPSSLCCONF=3,2,0,0")
        host.command(b'AT+CIPSSLCCN=3,"not-this-host"')
        assert host.ask(b'AT+CIPSTART=3,"SSL","127.0.0.1",%d' % good.port) == b"\r\nERROR\r\n"
        host.command(b'AT+CIPSSLCCN=3,"localhost"')
        assert host.ask(b'AT+CIPSTART=3,"SSL","127.0.0.1",%d' % good.port) == b"3,CONNECT\r\n\r\nOK\r\n"
        host.command(b"AT+CIPSSLCCONF=4,2,0,0")
        assert host.ask(b'AT+CIPSTART=4,"SSL","127.0.0.1",%d' % expired.port) == b"\r\nERROR\r\n"
        reasons = " ".join(e["reason"] for e in daemon.events("connect_failed"))
        assert "CERTIFICATE_VERIFY_FAILED" in reasons and "not-this-host" in reasons
    finally:
        good.close()
        expired.close()


def test_a_subject_alt_name_extension_hides_the_common_name(tls_host, pki, tmp_path):
    """As mbedTLS: a certificate whose SAN has only IP addresses never matches its CN; one without SANs does."""
    daemon, host = tls_host
    daemon.expected_errors.add("connect_failed")
    _, ca_id = _issue(tmp_path, "ca", "Test CA", ca=True)
    ca = Issued(tmp_path / "ca.crt", tmp_path / "ca.key")
    ip_only, _ = _issue(tmp_path, "ip-only", "localhost", ca_id,
                        sans=(x509.IPAddress(ipaddress.ip_address("127.0.0.1")),))
    cn_only, _ = _issue(tmp_path, "cn-only", "localhost", ca_id)
    ip_server, cn_server = TlsServer(ip_only), TlsServer(cn_only)
    try:
        _import(daemon, "client_ca", 0, ca.cert)
        host.command(b"AT+CIPSSLCCONF=5,2,0,0")
        host.command(b'AT+CIPSSLCCN=0,"localhost"')
        assert host.ask(b'AT+CIPSTART=0,"SSL","127.0.0.1",%d' % ip_server.port) == b"\r\nERROR\r\n"
        assert "does not name 'localhost'" in daemon.wait_event("connect_failed")[-1]["reason"]
        assert host.ask(b'AT+CIPSTART=1,"SSL","127.0.0.1",%d' % ip_server.port) == b"1,CONNECT\r\n\r\nOK\r\n"
        host.command(b'AT+CIPSSLCCN=2,"localhost"')
        assert host.ask(b'AT+CIPSTART=2,"SSL","127.0.0.1",%d' % cn_server.port) == b"2,CONNECT\r\n\r\nOK\r\n"
        _echo_ok(host, 2)
        assert host.ask(b'AT+CIPSTART=3,"SSL","127.0.0.1",%d' % cn_server.port) == b"\r\nERROR\r\n"
    finally:
        ip_server.close()
        cn_server.close()


def test_auth_1_and_3_present_the_client_certificate(tls_host, pki):
    """auth_mode 1/3 present client_cert.N; without it AT+CIPSTART answers ERROR and the log says why."""
    daemon, host = tls_host
    daemon.expected_errors.add("connect_failed")
    server = TlsServer(pki["server"], client_ca=pki["ca"].cert)
    try:
        host.command(b"AT+CIPSSLCCONF=0,1,0,0")
        assert host.ask(b'AT+CIPSTART=0,"SSL","127.0.0.1",%d' % server.port) == b"\r\nERROR\r\n"
        assert "client_cert.0" in daemon.events("connect_failed")[-1]["reason"]
        _import(daemon, "client_cert", 0, pki["client"].cert)
        _import(daemon, "client_key", 0, pki["client"].key)
        _import(daemon, "client_ca", 0, pki["ca"].cert)
        assert host.ask(b'AT+CIPSTART=0,"SSL","127.0.0.1",%d' % server.port) == b"0,CONNECT\r\n\r\nOK\r\n"
        _echo_ok(host, 0)
        host.command(b"AT+CIPSSLCCONF=1,3,0,0")
        assert host.ask(b'AT+CIPSTART=1,"SSL","127.0.0.1",%d' % server.port) == b"1,CONNECT\r\n\r\nOK\r\n"
        _echo_ok(host, 1)
        subjects = [dict(x[0] for x in c["subject"]).get("commonName") for c in server.peer_certs]
        assert subjects.count("mcu-client") == 2
    finally:
        server.close()


def test_sni_and_alpn_reach_the_server(tls_host, pki):
    """AT+CIPSSLCSNI is sent as SNI (the host name otherwise); AT+CIPSSLCALPN's protocols are offered."""
    daemon, host = tls_host
    server = TlsServer(pki["server"], alpn=("mqtt",))
    try:
        host.command(b'AT+CIPSSLCSNI=0,"broker.example"')
        host.command(b'AT+CIPSSLCALPN=0,2,"h2","mqtt"')
        assert host.ask(b"AT+CIPSSLCALPN?").startswith(b'+CIPSSLCALPN:0,"h2","mqtt"\r\n')
        assert host.ask(b"AT+CIPSSLCSNI?").startswith(b'+CIPSSLCSNI:0,"broker.example"\r\n')
        host.ask(b'AT+CIPSTART=0,"SSL","127.0.0.1",%d' % server.port)
        _echo_ok(host, 0)
        host.ask(b'AT+CIPSTART=1,"SSL","localhost",%d' % server.port)
        _echo_ok(host, 1)
        assert server.sni[:2] == ["broker.example", "localhost"]
        assert server.alpn[0] == "mqtt"
        assert host.ask(b'AT+CIPSSLCALPN=0,2,"h2"') == b"\r\nERROR\r\n"  # counts and names disagree
    finally:
        server.close()


def test_peer_not_speaking_tls_fails_in_time(tls_host):
    """A peer that is not a TLS server ends with ERROR within the timeout, never a hang."""
    daemon, host = tls_host
    daemon.expected_errors.add("connect_failed")
    plain = socket.create_server(("127.0.0.1", 0))
    try:
        answer = host.ask(b'AT+CIPSTART=0,"SSL","127.0.0.1",%d,,,800' % plain.getsockname()[1], timeout=5)
        assert answer == b"\r\nERROR\r\n"
        assert "timed out" in daemon.events("connect_failed")[-1]["reason"]
    finally:
        plain.close()


@pytest.mark.skipif(not PSK, reason="TLS-PSK needs Python 3.13's ssl (this is %s)" % sys.version.split()[0])
def test_psk(tls_host, pki):
    """AT+CIPSSLCPSK / CIPSSLCPSKHEX: a TLS-PSK handshake with the key and identity given."""
    daemon, host = tls_host
    server = TlsServer(pki["server"], psk=b"\x01\x02secret")
    try:
        host.command(b'AT+CIPSSLCPSKHEX=0,"%s","mcu"' % b"\x01\x02secret".hex().encode())
        assert host.ask(b"AT+CIPSSLCPSKHEX?").startswith(b'+CIPSSLCPSKHEX:0,"0102736563726574","mcu"\r\n')
        assert host.ask(b'AT+CIPSTART=0,"SSL","127.0.0.1",%d' % server.port) == b"0,CONNECT\r\n\r\nOK\r\n"
        _echo_ok(host, 0)
        host.command(b'AT+CIPSSLCPSK=1,"text-key","mcu"')
        assert host.ask(b"AT+CIPSSLCPSK?").split(b"\r\n")[1] == b'+CIPSSLCPSK:1,"text-key","mcu"'
    finally:
        server.close()


@pytest.mark.skipif(PSK, reason="this Python has TLS-PSK")
def test_psk_refused_without_support(tls_host):
    """Before Python 3.13 AT+CIPSSLCPSK answers ERROR and the log says why."""
    daemon, host = tls_host
    assert host.ask(b'AT+CIPSSLCPSK=0,"key","mcu"') == b"\r\nERROR\r\n"
    assert any("3.13" in e.get("why", "") for e in daemon.events("command_error"))


def test_five_ssl_links_move_a_megabyte_each(tls_host, pki):
    """Five SSL links at once, 1 MB each way, hashes equal."""
    daemon, host = tls_host
    server = TlsServer(pki["server"])
    try:
        for link_id in range(5):
            assert host.ask(b'AT+CIPSTART=%d,"SSL","127.0.0.1",%d' % (link_id, server.port)).endswith(b"OK\r\n")
        payloads = {i: os.urandom(1 << 20) for i in range(5)}
        demux = Demux(host)
        for offset in range(0, 1 << 20, 8192):
            for link_id in range(5):
                assert demux.send(link_id, payloads[link_id][offset : offset + 8192]).endswith(b"SEND OK\r\n")
        for link_id in range(5):
            got = demux.wait_data(link_id, 1 << 20, timeout=60)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payloads[link_id]).digest()
    finally:
        server.close()


def test_sslv6(tls_host, pki):
    """SSLv6 reaches ::1 once AT+CIPV6=1."""
    daemon, host = tls_host
    server = TlsServer(pki["server"], family=socket.AF_INET6, host="::1")
    try:
        host.command(b"AT+CIPV6=1")
        assert host.ask(b'AT+CIPSTART=0,"SSLv6","::1",%d' % server.port) == b"0,CONNECT\r\n\r\nOK\r\n"
        _echo_ok(host, 0)
    finally:
        server.close()


# -- the SSL server ---------------------------------------------------------------------------


def test_ssl_server_with_generated_certificate(tls_host):
    """With no server certificate imported, the SSL server uses one bridged generates (logged)."""
    daemon, host = tls_host
    port = free_port()
    assert host.ask(b'AT+CIPSERVER=1,%d,"SSL",0' % port) == b"\r\nOK\r\n"
    assert host.ask(b"AT+CIPSERVER?") == b'+CIPSERVER:1,%d,"SSL",0,0\r\n\r\nOK\r\n' % port
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as client:
        host.expect(b"0,CONNECT\r\n")
        client.sendall(b"over tls")
        assert host.read_ipd() == (0, b"over tls")
        assert Demux(host).send(0, b"back").endswith(b"SEND OK\r\n")
        assert client.recv(100) == b"back"
        der = client.getpeercert(binary_form=True)
    fingerprint = hashlib.sha256(der).hexdigest()
    logged = daemon.wait_event("server_certificate_generated")[-1]
    assert logged["sha256"].replace(":", "").lower() == fingerprint


def test_ssl_server_verifies_clients_with_ca_enable(tls_host, pki):
    """<CA enable> 1: a client without a certificate from server_ca.0 is never announced; one with it is."""
    daemon, host = tls_host
    daemon.expected_errors.add("server_handshake_failed")
    _import(daemon, "server_cert", 0, pki["server"].cert)
    _import(daemon, "server_key", 0, pki["server"].key)
    _import(daemon, "server_ca", 0, pki["ca"].cert)
    port = free_port()
    host.command(b'AT+CIPSERVER=1,%d,"SSL",1' % port)
    anonymous = ssl.create_default_context(cafile=str(pki["ca"].cert))
    with pytest.raises((ssl.SSLError, OSError)):
        with anonymous.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                   server_hostname="localhost") as bad:
            bad.sendall(b"x")
            bad.recv(10)
    assert host.read_quiet(0.3) == b""  # nothing announced
    trusted = ssl.create_default_context(cafile=str(pki["ca"].cert))
    trusted.load_cert_chain(pki["client"].cert, pki["client"].key)
    with trusted.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                             server_hostname="localhost") as good:
        good.sendall(b"trusted")
        assert host.read_ipd(timeout=10)[1] == b"trusted"


def test_pki_cli_through_bridged(tmp_path, pki):
    """'bridged pki import/list/remove' works through the bridged command, with --state-dir."""
    import subprocess

    def run(*args):
        return forkserver.run(["pki", *args, "--state-dir", str(tmp_path)], timeout=30)

    assert run("import", "client_ca", "0", str(pki["ca"].cert)).returncode == 0
    listed = run("list")
    assert listed.returncode == 0 and "client_ca.0" in listed.stdout
    assert run("remove", "client_ca", "0").returncode == 0
    bad = run("import", "client_cert", "0", str(pki["ca"].key))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_ssl_in_passthrough_passive_and_cipsendl(daemon, host, pki):
    """SSL links work like TCP in passive receive, AT+CIPSENDL and passthrough."""
    server = TlsServer(pki["server"])
    try:
        host.command(b"AT+CIPRECVTYPE=1")
        assert host.ask(b'AT+CIPSTARTEX="SSL","127.0.0.1",%d' % server.port) == b"CONNECT\r\n\r\nOK\r\n"
        host.command(b"AT+CIPSENDL=6", b">")
        host.write(b"sendl!")
        host.expect(b"SEND OK\r\n")
        assert host.expect(b"\r\n+IPD,6\r\n") == b"\r\n+IPD,6\r\n"
        assert host.ask(b"AT+CIPRECVDATA=100") == b"+CIPRECVDATA:6,sendl!\r\nOK\r\n"
        host.command(b"AT+CIPRECVTYPE=0")
        host.command(b"AT+CIPMODE=1")
        host.command(b"AT+CIPSEND", b">")
        host.write(b"through tls")
        assert host.expect(b"through tls") == b"through tls"
    finally:
        server.close()


def test_ssl_stream_through_a_read_window(make_daemon, pki):
    """A TLS peer streaming at UART pace: the window's low-water mark counts
    ciphertext and a tick may find half a record; nothing stalls or is lost,
    and the link reads once per chunk or window, not once per record."""
    daemon = make_daemon("[links]\nread_window_ms = 50\n")
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server"].cert, pki["server"].key)
    listener = socket.create_server(("127.0.0.1", 0))
    sent = b"".join(bytes([i % 251]) * 600 for i in range(60))
    received = threading.Event()

    def stream() -> None:
        conn, _ = listener.accept()
        conn.settimeout(20)
        with ctx.wrap_socket(conn, server_side=True) as tls:
            start = time.monotonic()
            for i in range(60):
                tls.sendall(sent[i * 600 : (i + 1) * 600])
                time.sleep(max(0.0, start + (i + 1) * 0.005 - time.monotonic()))
            received.wait(10)  # the data first, then the close

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    try:
        assert host.ask(b'AT+CIPSTART=0,"SSL","127.0.0.1",%d' % listener.getsockname()[1]).endswith(b"OK\r\n")
        frames = []
        while sum(map(len, frames)) < len(sent):
            link_id, data = host.read_ipd(timeout=5)
            assert link_id == 0
            frames.append(data)
        received.set()
        assert hashlib.sha256(b"".join(frames)).digest() == hashlib.sha256(sent).digest()
        assert sum(len(f) < 2920 for f in frames) < 40, [len(f) for f in frames]
        host.expect(b"0,CLOSED\r\n", timeout=5)
    finally:
        received.set()
        streamer.join(5)
        listener.close()


def test_ssl_passthrough_both_ways_then_fin(daemon, host, pki):
    """SSL passthrough at 0.5 MB/s both ways (the uplink's wake-up reads the TLS
    downlink): every byte each way, the last piece and the FIN that come while
    the read is paused are not left in OpenSSL's buffer, then CLOSED."""
    from tests.integration.both_ways import BothWays, mcu_stream

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server"].cert, pki["server"].key)
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        accepted: list = []

        def accept() -> None:
            listener.settimeout(10)
            conn, _ = listener.accept()
            conn.settimeout(10)
            accepted.append(ctx.wrap_socket(conn, server_side=True))

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        host.command(b"AT+SYSMSG=4")
        assert host.ask(b'AT+CIPSTART="SSL","127.0.0.1",%d' % listener.getsockname()[1]).endswith(b"OK\r\n")
        acceptor.join(10)
        tls = accepted[0]
        host.command(b"AT+CIPMODE=1")
        host.command(b"AT+CIPSEND", b">")
        down = b"".join(bytes([i % 251]) * 1024 for i in range(200))
        peer = BothWays(tls, down, b"T" * 300, 200 * 1024, fin=True)
        peer.start()
        up = mcu_stream(host, 200)
        got = host.read_exactly(len(down) + 300, 10)
        assert hashlib.sha256(got).digest() == hashlib.sha256(down + b"T" * 300).digest()
        peer.join()
        assert hashlib.sha256(bytes(peer.received)).digest() == hashlib.sha256(up).digest()
        host.expect(b"CLOSED\r\n", timeout=5)
    finally:
        listener.close()
