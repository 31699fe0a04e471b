"""Certificates and keys read from PEM or DER bytes, checked: what `bridged.pki`
stores and what `fingerprint` describes.

Certificates must parse as X.509 (PEM or DER; a PEM file may hold a chain,
all of it is kept, the first certificate is the one described and matched),
keys must be unencrypted RSA, EC or Ed25519 private keys (PEM or DER). A file
holds certificates or one key, never both. Anything else is a `PkiError`
naming the source and what is wrong.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

__all__ = ["Entry", "Parsed", "PkiError", "parse"]

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)
_KEY_LABELS = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY")
_IGNORED_LABELS = (b"EC PARAMETERS",)  # written by `openssl ecparam -genkey`
_ENCRYPTED = "the private key is encrypted; store it decrypted (openssl pkey -in KEY -out PLAIN)"

_PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class PkiError(Exception):
    """A certificate or key is refused, or a kind or index is invalid.

    The message names the file (or entry) and what is wrong.
    """


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored item, as `PkiStore.entries` describes it.

    Attributes:
        kind: one of `bridged.pki.KINDS`.
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
class Parsed:
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


def parse(data: bytes, source: str) -> Parsed:
    """Certificates or one private key from PEM or DER bytes; PkiError if neither."""
    if not data.strip():
        raise PkiError(f"{source}: not a certificate or key: the file is empty")
    if b"-----BEGIN " in data:
        return _parse_pem(data, source)
    try:
        with _quiet():
            return Parsed(certs=(x509.load_der_x509_certificate(data),))
    except ValueError:
        pass
    try:
        key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise PkiError(f"{source}: {_ENCRYPTED}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError(f"{source}: not a certificate or key: neither PEM nor a DER"
                       " certificate or private key") from None
    return Parsed(key=_accepted_key(key, source))


def _parse_pem(data: bytes, source: str) -> Parsed:
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
        return Parsed(key=keys[0])
    if certs:
        return Parsed(certs=tuple(certs))
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
