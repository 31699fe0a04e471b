"""Certificates and keys for SSL links: what ESP-AT keeps in its mfg_nvs partition.

Theory of operation
-------------------
ESP-AT (v3.x) stores its PKI material in the ``mfg_nvs`` partition, one NVS
namespace per kind and one key per item: ``client_cert.0``, ``client_key.0``,
``client_ca.0``, ``server_cert.0`` ... (spec section 5.1). `AT+CIPSSLCCONF`'s
``<pki_number>`` N selects ``client_cert.N`` + ``client_key.N`` and its
``<ca_number>`` N selects ``client_ca.N``.

bridged keeps the same names as files under the state directory::

    <state_dir>/pki/                      0700
        client_cert.0.pem                 0600, always PEM
        client_key.0.pem                  PKCS#8, unencrypted
        client_ca.0.pem                   may hold several certificates
        ...
        generated/                        0700
            server_cert.pem, server_key.pem   the self-signed fallback

Imports are checked before anything is written: certificates must parse as
X.509 (PEM or DER; a PEM file may hold a chain, all of it is kept, the first
certificate is the one described and matched), keys must be unencrypted RSA, EC
or Ed25519 private keys (PEM or DER). A key and the certificate at the same
index (``client_key.N`` / ``client_cert.N``, ``server_key.N`` /
``server_cert.N``) must hold the same public key, whichever is imported second;
to replace a pair, remove one half first. Every write is atomic (temporary file
in the same directory, fsync, rename, fsync of the directory), so a reader sees
the old file or the new one.

When no ``server_cert.0`` is imported, an SSL server uses `self_signed_server`:
an EC P-256 key and a self-signed certificate made on first use and reused
afterwards (regenerated only when missing, damaged, expired or made for another
name). An flock on ``generated/.lock`` makes concurrent first uses from several
processes produce one pair.

Deviation: ESP-AT names a namespace's only key after the namespace itself
(``client_ca`` rather than ``client_ca.0``); bridged always uses the indexed form.
Indices are limited to 0..9.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridged.atomic import fsync_dir, write_atomic

__all__ = [
    "CERT_KINDS",
    "KEY_KINDS",
    "KINDS",
    "MAX_INDEX",
    "Entry",
    "PkiError",
    "PkiStore",
    "fingerprint",
]

KINDS = ("client_cert", "client_key", "client_ca", "server_cert", "server_key", "server_ca")
CERT_KINDS = ("client_cert", "client_ca", "server_cert", "server_ca")
KEY_KINDS = ("client_key", "server_key")
MAX_INDEX = 9

#: key kind <-> certificate kind that must hold the same public key.
_PARTNER = {"client_key": "client_cert", "client_cert": "client_key",
            "server_key": "server_cert", "server_cert": "server_key"}

_MAX_FILE = 1 << 20  # a whole system CA bundle is ~200 KB
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)
_KEY_LABELS = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY")
_IGNORED_LABELS = (b"EC PARAMETERS",)  # written by `openssl ecparam -genkey`
_ENCRYPTED = "the private key is encrypted; store it decrypted (openssl pkey -in KEY -out PLAIN)"
_GENERATED_DAYS = 3650

_PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class PkiError(Exception):
    """A certificate or key is refused, or a kind or index is invalid.

    The message names the file (or entry) and what is wrong.
    """


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored item, as `PkiStore.entries` describes it.

    Attributes:
        kind: one of `KINDS`.
        index: 0..9.
        subject: RFC 4514 subject of the first certificate; "" for keys.
        not_after: expiry of the first certificate (aware, UTC); None for keys.
        fingerprint: sha256 hex of the first certificate's DER, or of the key's
            public key (SubjectPublicKeyInfo DER).
        key_type: "RSA 2048", "EC secp256r1", "Ed25519"... (the public key's).
        certs: how many certificates the file holds; 0 for keys.
    """

    kind: str
    index: int
    subject: str
    not_after: datetime.datetime | None
    fingerprint: str
    key_type: str
    certs: int = 0

    @property
    def name(self) -> str:
        """The ESP-AT key name, ``<kind>.<index>``."""
        return f"{self.kind}.{self.index}"


@dataclass(frozen=True, slots=True)
class _Parsed:
    """Validated content: certificates or one private key, never both."""

    certs: tuple[x509.Certificate, ...] = ()
    key: _PrivateKey | None = None

    def public_der(self) -> bytes:
        public = self.key.public_key() if self.key is not None else self.certs[0].public_key()
        return public.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)

    def pem(self) -> bytes:
        if self.key is not None:
            return self.key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.certs)

    def entry(self, kind: str, index: int) -> Entry:
        if self.key is not None:
            return Entry(kind, index, "", None, hashlib.sha256(self.public_der()).hexdigest(),
                         _key_type(self.key.public_key()))
        first = self.certs[0]
        return Entry(kind, index, first.subject.rfc4514_string(), first.not_valid_after_utc,
                     first.fingerprint(hashes.SHA256()).hex(), _key_type(first.public_key()),
                     len(self.certs))


class PkiStore:
    """The certificate store under ``<state_dir>/pki``.

    Args:
        state_dir: the daemon's state directory (`bridged.config.state_dir`).
            Nothing is created until something is written.
    """

    def __init__(self, state_dir: Path | str) -> None:
        self._dir = Path(state_dir) / "pki"

    @property
    def directory(self) -> Path:
        """``<state_dir>/pki``."""
        return self._dir

    def import_file(self, kind: str, index: int, path: Path | str) -> Entry:
        """Validate a PEM or DER file and store it, as PEM, as ``<kind>.<index>``.

        An existing entry of that name is replaced.

        Raises:
            PkiError: bad kind or index; the file is unreadable, not of the
                right type, encrypted, or does not match its partner entry.
            OSError: the store could not be written.
        """
        _check_name(kind, index)
        try:
            with open(path, "rb") as file:
                data = file.read(_MAX_FILE + 1)
        except OSError as exc:
            raise PkiError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return self.import_bytes(kind, index, data, str(path))

    def import_bytes(self, kind: str, index: int, data: bytes, source: str = "<data>") -> Entry:
        """Like `import_file` for content already read (AT+SYSMFG writes).

        Args:
            source: how error messages name the content.
        """
        _check_name(kind, index)
        if len(data) > _MAX_FILE:
            raise PkiError(f"{source}: too large (more than {_MAX_FILE} bytes)")
        parsed = _parse(data, source)
        _check_kind(parsed, kind, source)
        self._check_partner(parsed, kind, index, source)
        self._ensure_dir()
        write_atomic(self._file(kind, index), parsed.pem())
        return parsed.entry(kind, index)

    def get(self, kind: str, index: int) -> bytes | None:
        """The stored PEM bytes of ``<kind>.<index>``, or None."""
        try:
            return self._file(kind, index).read_bytes()
        except FileNotFoundError:
            return None

    def path(self, kind: str, index: int) -> Path | None:
        """The file holding ``<kind>.<index>`` (for `ssl` loaders), or None."""
        file = self._file(kind, index)
        return file if file.is_file() else None

    def remove(self, kind: str, index: int) -> bool:
        """Delete ``<kind>.<index>``; False when it was not there."""
        file = self._file(kind, index)
        try:
            file.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self._dir)
        return True

    def entries(self) -> list[Entry]:
        """Every stored entry, in `KINDS` order then by index.

        Raises:
            PkiError: a stored file no longer parses (edited by hand?); the
                message names it.
        """
        found = []
        for kind, index, file in self._stored():
            found.append(_parse(file.read_bytes(), str(file)).entry(kind, index))
        return found

    def self_signed_server(self, common_name: str = "bridged") -> tuple[Path, Path]:
        """The generated server certificate and key, made on first use.

        The certificate is self-signed for EC P-256, CN and DNS SAN
        `common_name`, DNS:localhost, IP:127.0.0.1 and IP:::1, valid from one
        day ago for 10 years. Later calls return the same files; a new pair is
        made only when they are missing, damaged, expired or for another name.

        Returns:
            (certificate path, key path); `fingerprint` gives the sha256 to log.
        """
        directory = self._ensure_dir() / "generated"
        directory.mkdir(mode=0o700, exist_ok=True)
        cert_file, key_file = directory / "server_cert.pem", directory / "server_key.pem"
        with _locked(directory / ".lock"):
            if not _generated_ok(cert_file, key_file, common_name):
                cert_pem, key_pem = _make_self_signed(common_name)
                write_atomic(key_file, key_pem)
                write_atomic(cert_file, cert_pem)
        return cert_file, key_file

    # -- internals ---------------------------------------------------------

    def _file(self, kind: str, index: int) -> Path:
        _check_name(kind, index)
        return self._dir / f"{kind}.{index}.pem"

    def _ensure_dir(self) -> Path:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._dir.stat().st_mode & 0o777 != 0o700:
            os.chmod(self._dir, 0o700)
        return self._dir

    def _stored(self) -> Iterator[tuple[str, int, Path]]:
        for kind in KINDS:
            for index in range(MAX_INDEX + 1):
                file = self._dir / f"{kind}.{index}.pem"
                if file.is_file():
                    yield kind, index, file

    def _check_partner(self, parsed: _Parsed, kind: str, index: int, source: str) -> None:
        partner = _PARTNER.get(kind)
        if partner is None:
            return
        stored = self.get(partner, index)
        if stored is None:
            return
        other = _parse(stored, str(self._file(partner, index)))
        if other.public_der() != parsed.public_der():
            raise PkiError(f"{source}: {kind}.{index} does not match {partner}.{index}"
                           f" (remove {partner}.{index} first to replace the pair)")


def fingerprint(path: Path | str) -> str:
    """sha256 hex of the first certificate in a PEM/DER file, or of a key's public key.

    Raises:
        PkiError: the file is unreadable or holds neither.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PkiError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return _parse(data, str(path)).entry("", 0).fingerprint


# -- parsing -----------------------------------------------------------------


def _check_name(kind: str, index: int) -> None:
    if kind not in KINDS:
        raise PkiError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= MAX_INDEX:
        raise PkiError(f"{kind}: index {index!r} is out of range 0..{MAX_INDEX}")


def _check_kind(parsed: _Parsed, kind: str, source: str) -> None:
    if kind in KEY_KINDS and parsed.key is None:
        raise PkiError(f"{source}: holds a certificate, but {kind} wants a private key")
    if kind in CERT_KINDS and parsed.key is not None:
        raise PkiError(f"{source}: holds a private key, but {kind} wants a certificate")


def _parse(data: bytes, source: str) -> _Parsed:
    """Certificates or one private key from PEM or DER bytes; PkiError if neither."""
    if not data.strip():
        raise PkiError(f"{source}: not a certificate or key: the file is empty")
    if b"-----BEGIN " in data:
        return _parse_pem(data, source)
    try:
        with _quiet():
            return _Parsed(certs=(x509.load_der_x509_certificate(data),))
    except ValueError:
        pass
    try:
        key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise PkiError(f"{source}: {_ENCRYPTED}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError(f"{source}: not a certificate or key: neither PEM nor a DER"
                       " certificate or private key") from None
    return _Parsed(key=_accepted_key(key, source))


def _parse_pem(data: bytes, source: str) -> _Parsed:
    certs: list[x509.Certificate] = []
    keys: list[_PrivateKey] = []
    for match in _PEM_BLOCK.finditer(data):
        label, block = match.group(1), match.group(0)
        if label == b"CERTIFICATE":
            certs.append(_load_pem_cert(block, source, len(certs) + 1))
        elif label in _KEY_LABELS:
            keys.append(_load_pem_key(block, source))
        elif label == b"ENCRYPTED PRIVATE KEY":
            raise PkiError(f"{source}: {_ENCRYPTED}")
        elif label not in _IGNORED_LABELS:
            raise PkiError(f"{source}: not a certificate or key: a PEM block"
                           f" {label.decode()!r} (expected CERTIFICATE or PRIVATE KEY)")
    if certs and keys:
        raise PkiError(f"{source}: holds both certificates and a private key;"
                       " import them separately")
    if len(keys) > 1:
        raise PkiError(f"{source}: holds {len(keys)} private keys; import one per entry")
    if keys:
        return _Parsed(key=keys[0])
    if certs:
        return _Parsed(certs=tuple(certs))
    raise PkiError(f"{source}: not a certificate or key: no complete PEM block")


def _load_pem_cert(block: bytes, source: str, number: int) -> x509.Certificate:
    try:
        with _quiet():
            return x509.load_pem_x509_certificate(block)
    except ValueError as exc:
        raise PkiError(f"{source}: not a certificate or key: certificate {number}"
                       f" does not parse: {exc}") from None


def _load_pem_key(block: bytes, source: str) -> _PrivateKey:
    try:
        key = serialization.load_pem_private_key(block, password=None)
    except TypeError:
        raise PkiError(f"{source}: {_ENCRYPTED}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{source}: not a certificate or key: the private key"
                       f" does not parse: {exc}") from None
    return _accepted_key(key, source)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence cryptography's deprecation warnings (negative serial numbers and the like).

    System CA bundles hold such certificates, which OpenSSL still loads; the
    warning would only add lines to the command line's output.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


def _accepted_key(key: object, source: str) -> _PrivateKey:
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
                  | ed25519.Ed25519PrivateKey):
        return key
    raise PkiError(f"{source}: unsupported key type {_key_type(key)}"
                   " (RSA, EC or Ed25519 only)")


def _key_type(key: object) -> str:
    """"RSA 2048", "EC secp256r1", "Ed25519"... for a public or private key."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey | ed448.Ed448PrivateKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPublicKey | dsa.DSAPrivateKey):
        return f"DSA {key.key_size}"
    return type(key).__name__


# -- the generated server certificate ------------------------------------------


def _generated_ok(cert_file: Path, key_file: Path, common_name: str) -> bool:
    """Whether the generated pair exists, parses, matches, is current and for `common_name`."""
    try:
        cert = _parse(cert_file.read_bytes(), str(cert_file))
        key = _parse(key_file.read_bytes(), str(key_file))
    except (OSError, PkiError):
        return False
    if not cert.certs or key.key is None or cert.public_der() != key.public_der():
        return False
    first = cert.certs[0]
    names = first.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    now = datetime.datetime.now(datetime.UTC)
    return (bool(names) and names[0].value == common_name
            and first.not_valid_before_utc <= now < first.not_valid_after_utc)


def _make_self_signed(common_name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, PKCS#8 key PEM) for a new EC P-256 self-signed server certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    public = key.public_key()
    alt_names: list[x509.GeneralName] = [x509.DNSName(common_name)]
    if common_name != "localhost":
        alt_names.append(x509.DNSName("localhost"))
    alt_names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                  x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=_GENERATED_DAYS + 1))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            _Parsed(key=key).pem())


# -- files -------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created 0600) for the with block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
