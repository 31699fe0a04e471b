"""What makes an OTA image acceptable: its version, its order, its signature.

Theory of operation.  Next to every image ``<partition>.bin`` the update
server serves a detached signature, ``<partition>.bin.sig``, from the same
download URL with ``filename=<partition>.bin.sig``.  The file holds one line:
an Ed25519 signature (64 bytes) in base64.  What is signed is not the image
itself but a small canonical manifest that bridged rebuilds from what it asked
for and what it received::

    bridged-ota-image-v1
    partition=<partition>
    version=<version>
    size=<bytes, decimal>
    sha256=<64 lowercase hex digits>

(each line ending in one LF, ASCII).  So a signature made for one version or
partition does not verify for another, and no other image can take its place.
`bridged ota sign` writes such a file; `verify` accepts it when any of the
configured public keys verifies it.

Versions are 1 to 64 of ``A-Z a-z 0-9 . _ + -`` (``[ota]``'s and the MCU's
alike), nothing a shell, a path or an environment reads specially.  They are
ordered by their runs of digits, read as numbers from left to right
(``v4.1.10.0`` is newer than ``v4.1.9.0``); letters and separators do not
count, nor do trailing zeros (``1.0`` is ``1``, and ``1.0-rc1`` counts as
``1.0.1``), so use plain numbered versions.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bridged.config import OTA_PARTITION, OTA_VERSION

__all__ = ["Manifest", "SignatureError", "version_problem", "is_older", "load_public_keys", "read_public_key",
           "parse_signature", "verify", "sign", "load_private_key", "SIGNATURE_MAX"]

MAGIC = "bridged-ota-image-v1"
SIGNATURE_MAX = 1024  # bytes of a .sig file we read
_KEY_FILE_MAX = 16384
_VERSION = re.compile(OTA_VERSION)
_PARTITION = re.compile(OTA_PARTITION)
_DIGITS = re.compile(r"[0-9]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_P = 2**255 - 19
_Y8 = int.from_bytes(bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"), "little")
_SMALL_ORDER_Y = frozenset({0, 1, _P - 1, _Y8, _P - _Y8})  # y of the points of order 1, 2, 4, 8


class SignatureError(ValueError):
    """A key, a signature or a manifest is unusable; the message says why."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a signature covers."""

    partition: str
    version: str
    size: int
    sha256: str  # lowercase hex

    def __post_init__(self) -> None:
        problem = version_problem(self.version)
        if problem is not None:
            raise SignatureError(problem)
        if not _PARTITION.fullmatch(self.partition):
            raise SignatureError(f"partition {self.partition[:80]!r} is not 1 to 64 of A-Z a-z 0-9 _ . -")
        if not _SHA256.fullmatch(self.sha256) or self.size < 0:
            raise SignatureError("sha256 must be 64 lowercase hex digits and size not negative")

    def encode(self) -> bytes:
        """The canonical bytes that are signed."""
        return (f"{MAGIC}\npartition={self.partition}\nversion={self.version}\n"
                f"size={self.size}\nsha256={self.sha256}\n").encode("ascii")


def version_problem(version: str) -> str | None:
    """Why ``version`` is not allowed, or None."""
    if _VERSION.fullmatch(version):
        return None
    return f"version {version[:80]!r} is not 1 to 64 of A-Z a-z 0-9 . _ + -"


def _order(version: str) -> tuple[int, ...]:
    numbers = [int(run) for run in _DIGITS.findall(version)]
    while numbers and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


def is_older(version: str, than: str) -> bool:
    """True when ``version`` comes before ``than`` (see the module docstring)."""
    return _order(version) < _order(than)


# -- keys --------------------------------------------------------------------------------


def _read_key_file(path: str | Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(_KEY_FILE_MAX + 1)
    if len(data) > _KEY_FILE_MAX:
        raise SignatureError(f"{path}: over {_KEY_FILE_MAX} bytes, not a key file")
    return data


def read_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file, 32 raw bytes, or their base64 on one line.

    Raises:
        SignatureError: unreadable, not one Ed25519 public key, or a weak one.
        OSError: the file cannot be read.
    """
    data = _read_key_file(path)
    raw = _pem_key(path, data) if data.lstrip().startswith(b"-----BEGIN") else _bare_key(path, data)
    if _small_order(raw):
        raise SignatureError(f"{path}: a point of small order (a zeroed or damaged file?), which"
                             " would verify signatures made without any private key")
    return Ed25519PublicKey.from_public_bytes(raw)


def _pem_key(path: str | Path, data: bytes) -> bytes:
    # load_pem_public_key reads the first block and ignores the rest: a second key
    # in the file would look configured and never verify anything.
    blocks = data.count(b"-----BEGIN")
    if blocks != 1:
        raise SignatureError(f"{path}: {blocks} PEM blocks; one key per file (list the files in public_key)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key.public_bytes_raw()


def _bare_key(path: str | Path, data: bytes) -> bytes:
    raw = data
    if len(data) != 32:
        try:
            raw = base64.b64decode(data.strip(), validate=True)
        except binascii.Error:
            raw = b""
    if len(raw) != 32:
        raise SignatureError(f"{path}: not an Ed25519 public key (PEM, 32 raw bytes or their base64)")
    return raw


def _small_order(raw: bytes) -> bool:
    """Whether ``raw`` encodes one of the 8 points of order 1, 2, 4 or 8 (libsodium's
    blocklist, non-canonical encodings included).

    OpenSSL verifies against such a key without complaint, and with it a
    signature made without any private key verifies (for the identity point,
    any message): all zeros is one of them.
    """
    y = (int.from_bytes(raw, "little") & ((1 << 255) - 1)) % _P  # the sign bit of x dropped
    return y in _SMALL_ORDER_Y


def load_public_keys(paths: Sequence[str]) -> list[Ed25519PublicKey]:
    """Every key of ``[ota] public_key``.

    Raises:
        SignatureError: one of them cannot be read or is not an Ed25519 public key.
    """
    keys = []
    for path in paths:
        try:
            keys.append(read_public_key(path))
        except OSError as exc:
            raise SignatureError(f"[ota] public_key {path}: {exc.strerror or exc}") from None
        except SignatureError as exc:
            raise SignatureError(f"[ota] public_key {exc}") from None
    return keys


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The signing key `bridged ota keygen` wrote (unencrypted PKCS#8 PEM).

    Raises:
        SignatureError: not an unencrypted Ed25519 private key.
        OSError: the file cannot be read.
    """
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SignatureError(f"{path}: an encrypted key; bridged ota sign needs an unencrypted one") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError(f"{path}: not a PEM private key (a public key or another file?)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    return key


# -- signatures --------------------------------------------------------------------------


def parse_signature(body: bytes) -> bytes:
    """The 64 signature bytes of a .sig file.

    Raises:
        SignatureError: not one base64 line of 64 bytes.
    """
    try:
        raw = base64.b64decode(body.strip(b" \t\r\n"), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 64:
        raise SignatureError("the signature file is not one line of base64 holding 64 bytes")
    return raw


def sign(key: Ed25519PrivateKey, manifest: Manifest) -> bytes:
    """The .sig file for ``manifest``: its base64 signature and a line end."""
    return base64.b64encode(key.sign(manifest.encode())) + b"\n"


def verify(manifest: Manifest, signature: bytes, keys: Sequence[Ed25519PublicKey]) -> int:
    """The index of the key that verifies ``signature`` over ``manifest``.

    Raises:
        SignatureError: none does.
    """
    data = manifest.encode()
    for index, key in enumerate(keys):
        try:
            key.verify(signature, data)
        except InvalidSignature:
            continue
        return index
    raise SignatureError(
        f"no public key verifies the signature for partition {manifest.partition},"
        f" version {manifest.version}, {manifest.size} bytes, sha256 {manifest.sha256}"
        " (signed with another key, or for another version, partition or image)")
