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

Imports are checked before anything is written (`bridged.pki_parse`:
X.509 certificates, a PEM chain kept whole, unencrypted RSA, EC or Ed25519
keys, PEM or DER). A key and the certificate at the same
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
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridged.atomic import fsync_dir, write_atomic
from bridged.pki_parse import Entry, Parsed, PkiError, parse

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
_GENERATED_DAYS = 3650


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
        parsed = parse(data, source)
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
            found.append(parse(file.read_bytes(), str(file)).entry(kind, index))
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

    def _check_partner(self, parsed: Parsed, kind: str, index: int, source: str) -> None:
        partner = _PARTNER.get(kind)
        if partner is None:
            return
        stored = self.get(partner, index)
        if stored is None:
            return
        other = parse(stored, str(self._file(partner, index)))
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
    return parse(data, str(path)).entry("", 0).fingerprint


# -- names and kinds -------------------------------------------------------


def _check_name(kind: str, index: int) -> None:
    if kind not in KINDS:
        raise PkiError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= MAX_INDEX:
        raise PkiError(f"{kind}: index {index!r} is out of range 0..{MAX_INDEX}")


def _check_kind(parsed: Parsed, kind: str, source: str) -> None:
    if kind in KEY_KINDS and parsed.key is None:
        raise PkiError(f"{source}: holds a certificate, but {kind} wants a private key")
    if kind in CERT_KINDS and parsed.key is not None:
        raise PkiError(f"{source}: holds a private key, but {kind} wants a certificate")


# -- the generated server certificate ------------------------------------------


def _generated_ok(cert_file: Path, key_file: Path, common_name: str) -> bool:
    """Whether the generated pair exists, parses, matches, is current and for `common_name`."""
    try:
        cert = parse(cert_file.read_bytes(), str(cert_file))
        key = parse(key_file.read_bytes(), str(key_file))
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
            Parsed(key=key).pem())


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
