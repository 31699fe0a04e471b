"""bridged.ota_image: version syntax and order, the signed manifest, public key formats."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bridged import ota_image
from bridged.ota_image import Manifest, SignatureError

SHA = "ab" * 32


@pytest.mark.parametrize(("older", "newer"), [
    ("v4.1.9.0", "v4.1.10.0"), ("4.1.1.0", "v4.1.2.0"), ("1.0", "1.0.1"), ("v1", "v2-beta"), ("9", "10"),
])
def test_version_order_is_by_numbers(older, newer):
    """Runs of digits compare as numbers, left to right; letters do not count."""
    assert ota_image.is_older(older, newer) and not ota_image.is_older(newer, older)


@pytest.mark.parametrize(("a", "b"), [("1.0", "1"), ("v4.1.2.0", "4.1.2"), ("beta", "alpha")])
def test_equal_versions_are_not_older(a, b):
    """Trailing zeros and letters alone make no difference: a reinstall is not a downgrade."""
    assert not ota_image.is_older(a, b) and not ota_image.is_older(b, a)


@pytest.mark.parametrize("version", ["", "v" * 65, "a b", "a\nb", "$(x)", "a/b", "a\x00", "é"])
def test_bad_versions(version):
    """Only 1 to 64 of A-Z a-z 0-9 . _ + -."""
    assert ota_image.version_problem(version) is not None
    with pytest.raises(SignatureError):
        Manifest("ota", version, 1, SHA)


def test_manifest_bytes_are_canonical():
    """What is signed, byte for byte (documented in the module and the README)."""
    assert Manifest("ota", "v4.1.2.0", 200000, SHA).encode() == (
        b"bridged-ota-image-v1\npartition=ota\nversion=v4.1.2.0\nsize=200000\nsha256=" + SHA.encode() + b"\n")


@pytest.mark.parametrize("form", ["pem", "raw", "base64"])
def test_public_key_formats(tmp_path, form):
    """A public key file may be PEM, the 32 raw bytes, or their base64 on one line."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    raw = public.public_bytes_raw()
    data = {"pem": public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "raw": raw, "base64": base64.b64encode(raw) + b"\n"}[form]
    (tmp_path / "k.pub").write_bytes(data)
    manifest = Manifest("ota", "1", 3, SHA)
    signature = ota_image.parse_signature(ota_image.sign(key, manifest))
    assert ota_image.verify(manifest, signature, ota_image.load_public_keys([str(tmp_path / "k.pub")])) == 0


def test_a_non_ed25519_key_is_refused(tmp_path):
    """An EC public key is not an Ed25519 one: a clear error naming the file."""
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ec.pub").write_bytes(pem)
    with pytest.raises(SignatureError, match="not an Ed25519 public key"):
        ota_image.load_public_keys([str(tmp_path / "ec.pub")])


_P = 2**255 - 19
_Y8 = int.from_bytes(bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"), "little")
IDENTITY = (1).to_bytes(32, "little")
# Every encoding of a point of order 1, 2, 4 or 8, with either sign bit, and p, p + 1 (non-canonical 0, 1).
SMALL_ORDER = [(y + sign).to_bytes(32, "little") for y in (0, 1, _P - 1, _Y8, _P - _Y8, _P, _P + 1)
               for sign in (0, 1 << 255)]


def _key_file(tmp_path, raw: bytes, form: str):
    data = {"raw": lambda: raw, "base64": lambda: base64.b64encode(raw) + b"\n",
            "pem": lambda: Ed25519PublicKey.from_public_bytes(raw).public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)}[form]()
    (tmp_path / "k.pub").write_bytes(data)
    return str(tmp_path / "k.pub")


def test_a_small_order_key_would_verify_a_forgery():
    """Why small-order keys are refused: OpenSSL takes the identity point as a key, and a
    signature made without any private key (R = identity, S = 0) verifies any manifest."""
    manifest = Manifest("ota", "v9", 1, SHA)
    Ed25519PublicKey.from_public_bytes(IDENTITY).verify(IDENTITY + bytes(32), manifest.encode())


@pytest.mark.parametrize("form", ["raw", "base64", "pem"])
@pytest.mark.parametrize("raw", SMALL_ORDER, ids=lambda raw: raw.hex()[:8] + ".." + raw.hex()[-4:])
def test_small_order_public_keys_are_refused(tmp_path, raw, form):
    """A key file holding a point of small order (all zeros: a zeroed file) is refused in any form."""
    with pytest.raises(SignatureError, match="small order"):
        ota_image.load_public_keys([_key_file(tmp_path, raw, form)])


def test_two_pem_keys_in_one_file_are_refused(tmp_path):
    """One key per file: OpenSSL would read the first PEM block only, and the second key
    would look configured yet never verify."""
    pems = [Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo) for _ in range(2)]
    (tmp_path / "two.pub").write_bytes(pems[0] + pems[1])
    with pytest.raises(SignatureError, match="2 PEM blocks; one key per file"):
        ota_image.load_public_keys([str(tmp_path / "two.pub")])
