"""bridged ota keygen | sign | verify: the operator's side of signed updates, run as a
user runs them (python -m bridged, forked from tests/forkserver.py); and bridged check never showing a malformed token."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from bridged import ota_image
from tests import forkserver


def bridged(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return forkserver.run(list(args), timeout=60, cwd=None if cwd is None else str(cwd))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """One keygen for the module (a python -m bridged start is most of a test's time); no test changes it."""
    directory = tmp_path_factory.mktemp("keys")
    done = bridged("ota", "keygen", str(directory / "ota.key"))
    assert done.returncode == 0, done.stderr
    return directory / "ota.key"


def test_keygen_writes_a_private_key_0600_and_its_public_key(keys):
    """keygen: KEYFILE (PKCS#8, mode 0600) and KEYFILE.pub, which bridged reads as [ota] public_key."""
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    private = ota_image.load_private_key(keys)
    public = ota_image.read_public_key(keys.with_name("ota.key.pub"))
    assert public.public_bytes_raw() == private.public_key().public_bytes_raw()


def test_keygen_never_overwrites(keys):
    """A second keygen to the same name: exit 2, the key unchanged."""
    before = keys.read_bytes()
    done = bridged("ota", "keygen", str(keys))
    assert done.returncode == 2
    assert done.stderr == f"bridged ota: {keys} exists; not overwritten\n"
    assert keys.read_bytes() == before


def test_sign_then_verify_round_trip(keys, tmp_path):
    """sign writes IMAGE.sig; it verifies (CLI and bridged's own check) for that version and
    partition only, and not for a changed image."""
    image = tmp_path / "firmware.bin"
    image.write_bytes(os.urandom(100_000))
    done = bridged("ota", "sign", str(keys), str(image), "--version", "v1.2.3", "--partition", "ota")
    assert done.returncode == 0, done.stderr
    sig = tmp_path / "firmware.bin.sig"
    assert "serve it as ota.bin.sig" in done.stdout
    manifest = ota_image.Manifest("ota", "v1.2.3", 100_000, hashlib.sha256(image.read_bytes()).hexdigest())
    public = ota_image.load_public_keys([str(keys) + ".pub"])
    assert ota_image.verify(manifest, ota_image.parse_signature(sig.read_bytes()), public) == 0
    pub = str(keys) + ".pub"
    assert bridged("ota", "verify", pub, str(image), str(sig), "--version", "v1.2.3",
                   "--partition", "ota").returncode == 0
    for version, partition in (("v1.2.4", "ota"), ("v1.2.3", "client_ca")):
        done = bridged("ota", "verify", pub, str(image), str(sig), "--version", version, "--partition", partition)
        assert done.returncode == 1 and "no public key verifies the signature" in done.stderr
    data = image.read_bytes()
    image.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # flipped: a fixed byte may be the one there
    assert bridged("ota", "verify", pub, str(image), str(sig), "--version", "v1.2.3",
                   "--partition", "ota").returncode == 1


def test_sign_output_option(keys, tmp_path):
    """--output names the signature file."""
    image = tmp_path / "a.bin"
    image.write_bytes(b"abc")
    out = tmp_path / "served" / "ota.bin.sig"
    out.parent.mkdir()
    assert bridged("ota", "sign", str(keys), str(image), "--version", "1", "--partition", "ota",
                   "--output", str(out)).returncode == 0
    assert len(base64.b64decode(out.read_bytes().strip())) == 64


@pytest.mark.parametrize(("args", "message"), [
    (["--version", "v$(id)", "--partition", "ota"], "version 'v$(id)' is not 1 to 64"),
    (["--version", "v1", "--partition", "../nvs"], "partition '../nvs' is not"),
    (["--partition", "ota"], "the following arguments are required: --version"),
])
def test_sign_refuses_bad_arguments(keys, tmp_path, args, message):
    """A version or partition bridged would refuse is refused here too: exit 2, one line."""
    image = tmp_path / "a.bin"
    image.write_bytes(b"abc")
    done = bridged("ota", "sign", str(keys), str(image), *args)
    assert done.returncode == 2
    assert message in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "a.bin.sig").exists()


def test_sign_with_a_public_key_or_missing_file_is_a_usage_error(keys, tmp_path):
    """The public key given as KEYFILE, or an image that is not there: exit 2, no traceback."""
    image = tmp_path / "a.bin"
    image.write_bytes(b"abc")
    done = bridged("ota", "sign", str(keys) + ".pub", str(image), "--version", "1", "--partition", "ota")
    assert done.returncode == 2 and "not a PEM private key" in done.stderr
    done = bridged("ota", "sign", str(keys), str(tmp_path / "none.bin"), "--version", "1", "--partition", "ota")
    assert done.returncode == 2 and "No such file" in done.stderr and "Traceback" not in done.stderr


def test_check_never_shows_a_malformed_token(tmp_path):
    """bridged check with a token the config refuses: exit 2, the key named, the value not."""
    config = tmp_path / "bridged.toml"
    config.write_text('[ota]\ntoken = "S3CRET-' + "x" * 300 + '"\n')
    done = bridged("check", "--config", str(config))
    assert done.returncode == 2
    assert "ota.token: the value given (secret, not shown) is not allowed" in done.stderr
    assert "S3CRET" not in done.stderr + done.stdout
    config.write_text('[ota]\ntoken = "S3CRET-fine"\n')
    done = bridged("check", "--config", str(config))
    assert done.returncode == 0 and "S3CRET" not in done.stdout and "# token: set (secret, not shown)" in done.stdout
