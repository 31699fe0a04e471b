"""Tests for bridged.pki and bridged.pki_cli: the certificate store (ESP-AT's mfg_nvs PKI)."""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import forkserver
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from bridged.pki import KINDS, Entry, PkiError, PkiStore, fingerprint

PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
NOW = datetime.datetime.now(datetime.UTC)


# -- material made at test time ----------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False,
          days: tuple[int, int] = (-1, 365)) -> x509.Certificate:
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW + datetime.timedelta(days=days[0]))
               .not_valid_after(NOW + datetime.timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    return builder.sign(issuer_key, hashes.SHA256())


def _key_bytes(key, encoding=PEM, fmt=serialization.PrivateFormat.PKCS8,
               encryption=serialization.NoEncryption()) -> bytes:
    return key.private_bytes(encoding, fmt, encryption)


@dataclass(frozen=True)
class Material:
    """Files on disk plus the objects they were made from."""

    dir: Path
    ca_cert: x509.Certificate
    leaf_cert: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    other_key: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def m(tmp_path_factory) -> Material:
    """An RSA CA, an EC leaf signed by it, other keys, in PEM and DER, plus bad files."""
    d = tmp_path_factory.mktemp("material")
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = _cert("Test CA", ca_key, "Test CA", ca_key, ca=True, days=(-1, 3650))
    other_ca_key = ec.generate_private_key(ec.SECP384R1())
    other_ca = _cert("Other CA", other_ca_key, "Other CA", other_ca_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = _cert("leaf.example", leaf_key, "Test CA", ca_key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    expired = _cert("old.example", other_key, "Test CA", ca_key, days=(-400, -30))
    files = {
        "ca.pem": ca_cert.public_bytes(PEM),
        "ca.der": ca_cert.public_bytes(DER),
        "ca_key.der": _key_bytes(ca_key, DER),
        "ca_key.rsa.pem": _key_bytes(ca_key, fmt=serialization.PrivateFormat.TraditionalOpenSSL),
        "chain.pem": b"subject=CN = Test CA\n" + ca_cert.public_bytes(PEM)
                     + b"\n" + other_ca.public_bytes(PEM),
        "leaf.pem": leaf_cert.public_bytes(PEM),
        "leaf.der": leaf_cert.public_bytes(DER),
        "leaf_key.pem": _key_bytes(leaf_key),
        "leaf_key.sec1.pem": _key_bytes(leaf_key, fmt=serialization.PrivateFormat.TraditionalOpenSSL),
        "leaf_key.der": _key_bytes(leaf_key, DER),
        "leaf_and_key.pem": leaf_cert.public_bytes(PEM) + _key_bytes(leaf_key),
        "other_key.pem": _key_bytes(other_key),
        "expired.pem": expired.public_bytes(PEM),
        "ed25519.pem": _key_bytes(ed25519.Ed25519PrivateKey.generate()),
        "ed448.pem": _key_bytes(ed448.Ed448PrivateKey.generate()),
        "enc_pkcs8.pem": _key_bytes(leaf_key, encryption=serialization.BestAvailableEncryption(b"pw")),
        "enc_pkcs8.der": _key_bytes(leaf_key, DER, encryption=serialization.BestAvailableEncryption(b"pw")),
        "enc_legacy.pem": _key_bytes(leaf_key, fmt=serialization.PrivateFormat.TraditionalOpenSSL,
                                     encryption=serialization.BestAvailableEncryption(b"pw")),
        "garbage.bin": os.urandom(300),
        "garbage.txt": b"hello, this is not a certificate\n",
        "empty.pem": b"",
        "public.pem": leaf_key.public_key().public_bytes(
            PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "truncated.pem": leaf_cert.public_bytes(PEM)[:200],
        "bad_base64.pem": b"-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return Material(d, ca_cert, leaf_cert, leaf_key, other_key)


@pytest.fixture
def store(tmp_path) -> PkiStore:
    return PkiStore(tmp_path / "state")


def _sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _pem_certs(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data)


# -- import, get, list, remove ---------------------------------------------------


def test_import_certificate_round_trip(store, m):
    """An imported PEM certificate comes back from get(), path() and entries()."""
    entry = store.import_file("client_cert", 0, m.dir / "leaf.pem")
    assert entry == Entry("client_cert", 0, "CN=leaf.example", m.leaf_cert.not_valid_after_utc,
                          _sha256(m.leaf_cert), "EC secp256r1", 1)
    assert entry.name == "client_cert.0"
    assert store.get("client_cert", 0) == m.leaf_cert.public_bytes(PEM)
    assert store.path("client_cert", 0) == store.directory / "client_cert.0.pem"
    assert store.entries() == [entry]
    assert PkiStore(store.directory.parent).entries() == [entry]


def test_missing_entries(store):
    """Nothing stored: get() and path() give None, entries() is empty, nothing is created."""
    assert store.get("client_ca", 3) is None
    assert store.path("client_ca", 3) is None
    assert store.entries() == []
    assert not store.directory.exists()


@pytest.mark.parametrize("cert_file, key_file", [
    ("leaf.pem", "leaf_key.pem"), ("leaf.der", "leaf_key.der"), ("leaf.pem", "leaf_key.sec1.pem"),
])
def test_pem_and_der_accepted_stored_as_pem(store, m, cert_file, key_file):
    """PEM and DER certificates, PKCS#8 and SEC1 keys are accepted and stored as PEM (PKCS#8)."""
    store.import_file("client_cert", 1, m.dir / cert_file)
    key_entry = store.import_file("client_key", 1, m.dir / key_file)
    assert store.get("client_cert", 1) == m.leaf_cert.public_bytes(PEM)
    assert store.get("client_key", 1) == _key_bytes(m.leaf_key)
    public = m.leaf_key.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key_entry == Entry("client_key", 1, "", None, hashlib.sha256(public).hexdigest(),
                              "EC secp256r1", 0)


def test_rsa_der_and_legacy_rsa_keys(store, m):
    """An RSA key in DER or in the legacy 'RSA PRIVATE KEY' PEM form pairs with its certificate."""
    store.import_file("server_cert", 2, m.dir / "ca.der")
    assert store.import_file("server_key", 2, m.dir / "ca_key.der").key_type == "RSA 2048"
    assert store.import_file("server_key", 2, m.dir / "ca_key.rsa.pem").key_type == "RSA 2048"
    assert store.get("server_key", 2).startswith(b"-----BEGIN PRIVATE KEY-----")


def test_ed25519_accepted_ed448_refused(store, m):
    """Ed25519 keys are accepted; other key types (Ed448) are refused by name."""
    assert store.import_file("client_key", 0, m.dir / "ed25519.pem").key_type == "Ed25519"
    with pytest.raises(PkiError, match=r"ed448\.pem: unsupported key type Ed448"):
        store.import_file("client_key", 1, m.dir / "ed448.pem")


def test_file_and_directory_modes(tmp_path, m):
    """The pki directory is 0700 and every file 0600, whatever the umask."""
    old = os.umask(0)
    try:
        store = PkiStore(tmp_path)
        store.import_file("client_ca", 0, m.dir / "ca.pem")
        store.import_file("client_key", 0, m.dir / "leaf_key.pem")
    finally:
        os.umask(old)
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    files = sorted(p.name for p in store.directory.iterdir())
    assert files == ["client_ca.0.pem", "client_key.0.pem"]  # no temporary files left
    for p in store.directory.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_existing_directory_mode_tightened(tmp_path, m):
    """A pki directory found with looser permissions is set back to 0700 on write."""
    (tmp_path / "pki").mkdir(mode=0o755)
    os.chmod(tmp_path / "pki", 0o755)
    PkiStore(tmp_path).import_file("client_ca", 0, m.dir / "ca.pem")
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700


def test_import_replaces(store, m):
    """Importing over an entry replaces it."""
    store.import_file("client_ca", 0, m.dir / "ca.pem")
    store.import_file("client_ca", 0, m.dir / "leaf.pem")
    assert store.entries()[0].subject == "CN=leaf.example"


def test_remove(store, m):
    """remove() deletes an entry and reports whether there was one."""
    store.import_file("server_ca", 9, m.dir / "ca.pem")
    assert store.remove("server_ca", 9) is True
    assert store.remove("server_ca", 9) is False
    assert store.get("server_ca", 9) is None
    assert store.entries() == []


def test_entries_order(store, m):
    """entries() lists in KINDS order, then by index."""
    store.import_file("server_ca", 0, m.dir / "ca.pem")
    store.import_file("client_ca", 5, m.dir / "ca.pem")
    store.import_file("client_ca", 1, m.dir / "ca.pem")
    store.import_file("client_key", 0, m.dir / "other_key.pem")
    assert [e.name for e in store.entries()] == [
        "client_key.0", "client_ca.1", "client_ca.5", "server_ca.0"]


def test_ca_chain_kept(store, m):
    """Every certificate of a PEM chain is kept (text around the blocks is dropped)."""
    entry = store.import_file("client_ca", 0, m.dir / "chain.pem")
    stored = store.get("client_ca", 0)
    assert [c.subject.rfc4514_string() for c in _pem_certs(stored)] == ["CN=Test CA", "CN=Other CA"]
    assert b"subject=" not in stored
    assert (entry.subject, entry.certs, entry.fingerprint) == ("CN=Test CA", 2, _sha256(m.ca_cert))


def test_expired_certificate_stored(store, m):
    """An expired certificate is stored (ESP-AT checks dates only at the handshake)."""
    entry = store.import_file("client_cert", 0, m.dir / "expired.pem")
    assert entry.not_after < datetime.datetime.now(datetime.UTC)


def test_fingerprint_of_files(store, m):
    """fingerprint() of a stored file equals the entry's fingerprint, for certificates and keys."""
    cert = store.import_file("client_cert", 0, m.dir / "leaf.pem")
    key = store.import_file("client_key", 0, m.dir / "leaf_key.pem")
    assert fingerprint(store.path("client_cert", 0)) == cert.fingerprint
    assert fingerprint(m.dir / "leaf.der") == cert.fingerprint
    assert fingerprint(store.path("client_key", 0)) == key.fingerprint


# -- refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["client", "server"])
def test_mismatch_refused_both_orders(store, m, kind):
    """A key not matching the certificate at its index is refused, whichever comes second."""
    store.import_file(f"{kind}_cert", 0, m.dir / "leaf.pem")
    with pytest.raises(PkiError, match=rf"other_key\.pem: {kind}_key\.0 does not match {kind}_cert\.0"):
        store.import_file(f"{kind}_key", 0, m.dir / "other_key.pem")
    assert store.get(f"{kind}_key", 0) is None

    store.import_file(f"{kind}_key", 1, m.dir / "other_key.pem")
    with pytest.raises(PkiError, match=rf"leaf\.pem: {kind}_cert\.1 does not match {kind}_key\.1"):
        store.import_file(f"{kind}_cert", 1, m.dir / "leaf.pem")
    assert store.get(f"{kind}_cert", 1) is None

    store.import_file(f"{kind}_key", 0, m.dir / "leaf_key.pem")  # matching pairs are fine
    store.import_file(f"{kind}_key", 2, m.dir / "other_key.pem")  # other indices are not checked
    store.import_file(f"{kind}_cert", 3, m.dir / "leaf.pem")


def test_ca_not_matched_against_keys(store, m):
    """client_ca.N is not paired with client_key.N."""
    store.import_file("client_key", 0, m.dir / "other_key.pem")
    store.import_file("client_ca", 0, m.dir / "ca.pem")


@pytest.mark.parametrize("name", ["enc_pkcs8.pem", "enc_pkcs8.der", "enc_legacy.pem"])
def test_encrypted_key_refused(store, m, name):
    """An encrypted key (PKCS#8 PEM or DER, legacy PEM) is refused, saying so."""
    with pytest.raises(PkiError) as info:
        store.import_file("client_key", 0, m.dir / name)
    assert str(info.value).startswith(f"{m.dir / name}: the private key is encrypted")
    assert store.entries() == []


@pytest.mark.parametrize("name, why", [
    ("garbage.bin", "neither PEM nor a DER certificate or private key"),
    ("garbage.txt", "neither PEM nor a DER"),
    ("empty.pem", "the file is empty"),
    ("public.pem", "a PEM block 'PUBLIC KEY'"),
    ("truncated.pem", "no complete PEM block"),
    ("bad_base64.pem", "certificate 1 does not parse"),
])
@pytest.mark.parametrize("kind", ["client_ca", "client_key"])
def test_garbage_refused(store, m, name, why, kind):
    """Content that is no certificate or key is refused, naming the file and the reason."""
    with pytest.raises(PkiError) as info:
        store.import_file(kind, 0, m.dir / name)
    message = str(info.value)
    assert message.startswith(f"{m.dir / name}: not a certificate or key: ")
    assert why in message
    assert "\n" not in message
    assert not store.directory.exists()


@pytest.mark.parametrize("kind, name, message", [
    ("client_cert", "leaf_key.pem", "holds a private key, but client_cert wants a certificate"),
    ("server_ca", "leaf_key.der", "holds a private key, but server_ca wants a certificate"),
    ("client_key", "leaf.pem", "holds a certificate, but client_key wants a private key"),
    ("server_key", "leaf.der", "holds a certificate, but server_key wants a private key"),
    ("client_cert", "leaf_and_key.pem", "holds both certificates and a private key"),
])
def test_wrong_type_refused(store, m, kind, name, message):
    """A key imported as a certificate (or the reverse, or both in one file) is refused."""
    with pytest.raises(PkiError, match=message):
        store.import_file(kind, 0, m.dir / name)


def test_unreadable_file(store, m, tmp_path):
    """A missing file or a directory is refused, naming it."""
    with pytest.raises(PkiError, match=r"nope\.pem: cannot read: No such file"):
        store.import_file("client_ca", 0, tmp_path / "nope.pem")
    with pytest.raises(PkiError, match=r"cannot read: Is a directory"):
        store.import_file("client_ca", 0, tmp_path)


@pytest.mark.parametrize("index", [-1, 10, True, "0"])
def test_index_out_of_range(store, m, index):
    """Indices are integers 0..9, in every method."""
    with pytest.raises(PkiError, match=r"out of range 0\.\.9"):
        store.import_file("client_ca", index, m.dir / "ca.pem")
    for call in (store.get, store.path, store.remove):
        with pytest.raises(PkiError, match="out of range"):
            call("client_ca", index)


def test_unknown_kind(store, m):
    """A kind outside KINDS is refused, listing the allowed ones."""
    with pytest.raises(PkiError, match="unknown kind 'mqtt_cert'; allowed: client_cert, client_key"):
        store.import_file("mqtt_cert", 0, m.dir / "ca.pem")
    assert len(KINDS) == 6


def test_damaged_stored_file_named(store, m):
    """A stored file damaged by hand makes entries() fail, naming it."""
    store.import_file("client_ca", 0, m.dir / "ca.pem")
    (store.directory / "client_ca.0.pem").write_bytes(b"junk")
    with pytest.raises(PkiError, match=r"client_ca\.0\.pem: not a certificate or key"):
        store.entries()
    assert store.remove("client_ca", 0)


# -- the generated server certificate ----------------------------------------------


def _handshake(cert: Path, key: Path, server_hostname: str) -> None:
    """A TLS handshake on a socketpair, the client trusting `cert` and checking the name."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(b, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(a, server_hostname=server_hostname) as tls:
            tls.sendall(b"x")
    finally:
        thread.join(5)
    assert not errors


def test_self_signed_generated_once(store):
    """The server certificate is made once (0600 files, 0700 directory) and reused."""
    cert, key = store.self_signed_server()
    assert (cert, key) == (store.directory / "generated" / "server_cert.pem",
                           store.directory / "generated" / "server_key.pem")
    for path in (cert, key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.parent.stat().st_mode) == 0o700
    first = (fingerprint(cert), cert.read_bytes(), key.read_bytes())
    assert PkiStore(store.directory.parent).self_signed_server() == (cert, key)
    assert (fingerprint(cert), cert.read_bytes(), key.read_bytes()) == first
    assert store.entries() == []  # not an imported entry

    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    assert parsed.subject.rfc4514_string() == "CN=bridged"
    assert isinstance(parsed.public_key(), ec.EllipticCurvePublicKey)
    assert parsed.public_key().curve.name == "secp256r1"
    span = parsed.not_valid_after_utc - parsed.not_valid_before_utc
    assert datetime.timedelta(days=3650) < span <= datetime.timedelta(days=3652)
    assert parsed.not_valid_before_utc < datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=23)
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["bridged", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


@pytest.mark.parametrize("name", ["localhost", "bridged", "127.0.0.1", "::1"])
def test_self_signed_valid_for_local_names(store, name):
    """A client trusting the generated certificate accepts it for localhost, the CN and loopback IPs."""
    cert, key = store.self_signed_server()
    _handshake(cert, key, name)


def test_self_signed_wrong_name_rejected(store):
    """Hostname checking still applies: another name fails verification."""
    cert, key = store.self_signed_server()
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(cert, key, "example.com")


def test_self_signed_regenerated_when_damaged_or_renamed(store):
    """A damaged pair, or a different common name, gives a new pair."""
    cert, key = store.self_signed_server()
    first = fingerprint(cert)
    key.write_bytes(b"junk")
    store.self_signed_server()
    second = fingerprint(cert)
    assert second != first
    assert store.self_signed_server("pi.local") == (cert, key)
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    assert parsed.subject.rfc4514_string() == "CN=pi.local"
    assert fingerprint(cert) != second
    _handshake(cert, key, "pi.local")


def test_self_signed_concurrent_first_use(tmp_path):
    """Simultaneous first uses (separate stores, as separate processes have) agree on one pair."""
    results: list[tuple[Path, Path]] = []
    threads = [threading.Thread(target=lambda: results.append(PkiStore(tmp_path).self_signed_server()))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cert, key = results[0]
    public = serialization.load_pem_private_key(key.read_bytes(), None).public_key()
    assert public == x509.load_pem_x509_certificate(cert.read_bytes()).public_key()


# -- the command line ------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return forkserver.run(["pki", *args], timeout=30, env=env)


def _assert_one_line_error(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    assert result.returncode == status, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bridged pki: ")
    return lines[0]


def test_cli_round_trip(tmp_path, m):
    """import, list and remove print one line each (list: a table) and exit 0, then remove exits 1."""
    state = str(tmp_path / "new" / "state")
    result = _cli("import", "--state-dir", state, "client_cert", "0", str(m.dir / "leaf.pem"))
    assert result.returncode == 0, result.stderr
    expires = m.leaf_cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert result.stdout == (f"client_cert.0 imported: CN=leaf.example, expires {expires},"
                             f" sha256 {_sha256(m.leaf_cert)}\n")
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700

    result = _cli("--state-dir", state, "import", "client_key", "0", str(m.dir / "leaf_key.der"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("client_key.0 imported: EC secp256r1 private key, sha256 ")

    result = _cli("list", "--state-dir", state)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ENTRY", "TYPE", "SUBJECT", "EXPIRES", "SHA256"]
    assert lines[1].split() == ["client_cert.0", "EC", "secp256r1", "CN=leaf.example", expires,
                                _sha256(m.leaf_cert)[:16]]
    assert lines[2].startswith("client_key.0") and "(private key)" in lines[2]
    assert len(lines) == 3

    result = _cli("remove", "--state-dir", state, "client_cert", "0")
    assert (result.returncode, result.stdout) == (0, "removed client_cert.0\n")
    result = _cli("remove", "--state-dir", state, "client_cert", "0")
    assert "client_cert.0: not present" in _assert_one_line_error(result, 1)
    _cli("remove", "--state-dir", state, "client_key", "0")
    result = _cli("list", "--state-dir", state)
    assert (result.returncode, result.stdout) == (0, "no entries\n")


def test_cli_chain_and_expired(tmp_path, m):
    """The import line counts extra chain certificates and says when a certificate has expired."""
    state = str(tmp_path)
    result = _cli("import", "--state-dir", state, "client_ca", "0", str(m.dir / "chain.pem"))
    assert result.stdout.startswith("client_ca.0 imported: CN=Test CA (+1 more), expires ")
    result = _cli("import", "--state-dir", state, "client_cert", "1", str(m.dir / "expired.pem"))
    assert result.stdout.startswith("client_cert.1 imported: CN=old.example, expired ")
    result = _cli("list", "--state-dir", state)
    assert "CN=Test CA (+1 more)" in result.stdout
    assert "expired " in result.stdout.splitlines()[1]  # client_cert sorts first


def test_cli_default_state_dir(tmp_path, m):
    """Without --state-dir the daemon's state directory is used ($STATE_DIRECTORY here)."""
    env = dict(os.environ, STATE_DIRECTORY=str(tmp_path / "sd"))
    result = _cli("import", "server_ca", "3", str(m.dir / "ca.der"), env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sd" / "pki" / "server_ca.3.pem").is_file()


@pytest.mark.parametrize("args, fragment", [
    (["import", "mqtt_cert", "0", "{dir}/ca.pem"], "unknown kind 'mqtt_cert'"),
    (["import", "client_ca", "x", "{dir}/ca.pem"], "index 'x' is not a number from 0 to 9"),
    (["import", "client_ca", "10", "{dir}/ca.pem"], "index 10 is out of range 0..9"),
    (["import", "client_ca", "-1", "{dir}/ca.pem"], "index '-1' is not a number"),
    (["import", "client_ca", "0", "{dir}/missing.pem"], "missing.pem: cannot read"),
    (["import", "client_ca", "0", "{dir}/garbage.bin"], "garbage.bin: not a certificate or key"),
    (["import", "client_key", "0", "{dir}/enc_pkcs8.pem"], "enc_pkcs8.pem: the private key is encrypted"),
    (["import", "client_key", "0", "{dir}/leaf.pem"], "wants a private key"),
    (["import", "client_ca", "0"], "the following arguments are required: FILE"),
    (["remove", "server_key", "11"], "out of range"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
    (["list", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_user_errors(tmp_path, m, args, fragment):
    """Each user mistake exits 2 with one 'bridged pki: ' line naming it, never a traceback."""
    args = [a.format(dir=m.dir) for a in args]
    line = _assert_one_line_error(_cli("--state-dir", str(tmp_path), *args))
    assert fragment in line


def test_cli_mismatch(tmp_path, m):
    """A key that does not match the stored certificate exits 2 and stores nothing."""
    state = str(tmp_path)
    assert _cli("import", "--state-dir", state, "client_cert", "0", str(m.dir / "leaf.pem")).returncode == 0
    result = _cli("import", "--state-dir", state, "client_key", "0", str(m.dir / "other_key.pem"))
    assert "client_key.0 does not match client_cert.0" in _assert_one_line_error(result)
    assert not (tmp_path / "pki" / "client_key.0.pem").exists()


def test_cli_state_dir_is_a_file(tmp_path):
    """An unusable --state-dir exits 2 with one line."""
    (tmp_path / "file").write_text("")
    line = _assert_one_line_error(_cli("list", "--state-dir", str(tmp_path / "file")))
    assert "file" in line


def test_cli_help():
    """--help exits 0 and lists the commands."""
    result = _cli("--help")
    assert result.returncode == 0
    assert "usage: bridged pki" in result.stdout
    assert "import" in result.stdout and "remove" in result.stdout


# -- the service instance's store (--instance) and its owner ------------------------


@pytest.fixture
def system_state(tmp_path, monkeypatch):
    """/var/lib/bridged relocated, no $STATE_DIRECTORY: as root at a shell."""
    from bridged.config import paths as config_paths  # where state_dir looks

    base = tmp_path / "lib" / "bridged"
    monkeypatch.setattr(config_paths, "_SYSTEM_STATE_DIR", base)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    return base


def test_cli_instance_uses_the_service_state_dir(system_state, m, capsys):
    """--instance NAME imports into the directory `bridged run --instance NAME` uses."""
    from bridged.config import load_config, state_dir
    from bridged.pki_cli import main

    assert main(["import", "--instance", "ttyAMA0", "client_ca", "0", str(m.dir / "ca.pem")]) == 0
    service = state_dir(load_config(None, None, {}, instance="ttyAMA0", system=True))
    assert service == system_state / "ttyAMA0"
    assert PkiStore(service).entries()[0].name == "client_ca.0"
    by_path = "/dev/serial/by-id/usb-X-if00"
    assert main(["--instance", by_path, "import", "client_ca", "1", str(m.dir / "ca.pem")]) == 0
    assert (system_state / "serial-by\\x2did-usb\\x2dX\\x2dif00" / "pki" / "client_ca.1.pem").is_file()
    capsys.readouterr()
    assert main(["list", "--instance", "ttyS9"]) == 0
    assert capsys.readouterr().out == "no entries\n"  # another instance, another store


def test_cli_instance_follows_its_config_file(system_state, m, tmp_path, monkeypatch):
    """[state] dir in /etc/bridged/<instance>.toml moves the store for pki as for the service."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "ttyAMA0.toml").write_text(f'[state]\ndir = "{tmp_path / "elsewhere"}"\n')
    monkeypatch.setenv("BRIDGED_CONFIG_DIR", str(etc))
    from bridged.pki_cli import main

    assert main(["import", "--instance", "ttyAMA0", "server_ca", "0", str(m.dir / "ca.pem")]) == 0
    assert (tmp_path / "elsewhere" / "pki" / "server_ca.0.pem").is_file()
    (etc / "ttyAMA0.toml").write_text("[state]\nplace = 1\n")
    result = _cli("list", "--instance", "ttyAMA0", env=dict(os.environ))
    assert f"{etc / 'ttyAMA0.toml'}: state.place: unknown key" in _assert_one_line_error(result)


def test_cli_instance_user_errors(tmp_path):
    """A bad instance name, or --instance with --state-dir, exits 2 with one line."""
    line = _assert_one_line_error(_cli("list", "--instance", "a b"))
    assert "instance: 'a b' is not allowed" in line
    line = _assert_one_line_error(_cli("list", "--instance", "x", "--state-dir", str(tmp_path)))
    assert "--state-dir and --instance exclude each other" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_cli_as_root_hands_files_to_the_state_dir_owner(tmp_path, m):
    """Run as root on the service user's state directory, pki leaves files that user owns."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    for kind, name in (("client_cert", "leaf.pem"), ("client_key", "leaf_key.pem")):
        result = _cli("import", "--state-dir", str(state), kind, "0", str(m.dir / name))
        assert result.returncode == 0, result.stderr
    paths = [state / "pki", *(state / "pki").iterdir()]
    assert {(p.name, p.stat().st_uid, p.stat().st_gid) for p in paths} == {
        ("pki", 65534, 65534), ("client_cert.0.pem", 65534, 65534), ("client_key.0.pem", 65534, 65534)}
    assert stat.S_IMODE((state / "pki" / "client_key.0.pem").stat().st_mode) == 0o600
    mine = tmp_path / "mine"  # root's own directory: nothing changes hands
    assert _cli("import", "--state-dir", str(mine), "client_ca", "0", str(m.dir / "ca.pem")).returncode == 0
    assert (mine / "pki" / "client_ca.0.pem").stat().st_uid == 0
