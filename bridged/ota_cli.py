"""Command line: ``bridged ota keygen KEYFILE``, ``bridged ota sign KEYFILE IMAGE
--version V --partition P [--output SIG]`` and ``bridged ota verify PUBKEY IMAGE
SIG --version V --partition P``: the operator's side of signed updates
(bridged.ota_image says what is signed).

* keygen writes an Ed25519 private key (PKCS#8 PEM, unencrypted, mode 0600;
  keep it off the gateways) to KEYFILE and its public key (PEM) to
  KEYFILE.pub, the file ``[ota] public_key`` names; neither is overwritten.
* sign writes the signature file the update server serves as
  ``<partition>.bin.sig`` next to the image (default: IMAGE.sig).
* verify checks a signature file as bridged will, before it is published.

Exit status: 0 done; 1 verify found the signature wrong; 2 a user mistake
(bad arguments, an unreadable or wrong key, a file in the way), reported as
one line on stderr starting ``bridged ota: ``, never a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridged import ota_image
from bridged.subcommand import Parser, run

__all__ = ["main"]

PROG = "bridged ota"
BAD_SIGNATURE = 1


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Keys and signatures for bridged's signed OTA images.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keygen = commands.add_parser("keygen", help="make a signing key and its public key",
                                 description="Write an Ed25519 private key to KEYFILE (0600) and its"
                                             " public key to KEYFILE.pub.")
    keygen.add_argument("keyfile", metavar="KEYFILE")
    for name, helptext in (("sign", "write IMAGE's signature file"), ("verify", "check a signature file")):
        command = commands.add_parser(name, help=helptext, description=helptext + ".")
        if name == "sign":
            command.add_argument("key", metavar="KEYFILE", help="the private key keygen wrote")
            command.add_argument("image", metavar="IMAGE")
            command.add_argument("--output", metavar="SIG", help="default: IMAGE.sig")
        else:
            command.add_argument("key", metavar="PUBKEY", help="a public key ([ota] public_key)")
            command.add_argument("image", metavar="IMAGE")
            command.add_argument("signature", metavar="SIG")
        command.add_argument("--version", required=True, help="the version the server offers it as")
        command.add_argument("--partition", required=True, help="the partition it is for, e.g. ota")
    return parser


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; an existing file is an error, never overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _keygen(args: argparse.Namespace) -> int:
    private = Path(args.keyfile)
    public = private.with_name(private.name + ".pub")
    for path in (private, public):
        if os.path.lexists(path):
            raise ota_image.SignatureError(f"{path} exists; not overwritten")
    key = Ed25519PrivateKey.generate()
    _write_new(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), 0o600)
    _write_new(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
    print(f"private key: {private} (mode 0600; keep it off the gateways)")
    print(f"public key:  {public} (copy it to each gateway and name it in [ota] public_key)")
    return 0


def _manifest(args: argparse.Namespace) -> ota_image.Manifest:
    """The manifest of IMAGE as bridged will rebuild it (the image read in pieces)."""
    digest, size = hashlib.sha256(), 0
    with open(args.image, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return ota_image.Manifest(args.partition, args.version, size, digest.hexdigest())


def _sign(args: argparse.Namespace) -> int:
    ota_image.Manifest(args.partition, args.version, 0, "0" * 64)  # bad names before any file is read
    key = ota_image.load_private_key(args.key)
    manifest = _manifest(args)
    output = Path(args.output or f"{args.image}.sig")
    signature = ota_image.sign(key, manifest)
    output.write_bytes(signature)
    print(f"{output}: partition={manifest.partition} version={manifest.version}"
          f" size={manifest.size} sha256={manifest.sha256}")
    print(f"serve it as {manifest.partition}.bin.sig next to {manifest.partition}.bin of version"
          f" {manifest.version}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    ota_image.Manifest(args.partition, args.version, 0, "0" * 64)
    keys = [ota_image.read_public_key(args.key)]
    manifest = _manifest(args)
    with open(args.signature, "rb") as f:
        signature = ota_image.parse_signature(f.read(ota_image.SIGNATURE_MAX))
    try:
        ota_image.verify(manifest, signature, keys)
    except ota_image.SignatureError as exc:
        print(f"{PROG}: {args.signature}: {exc}", file=sys.stderr)
        return BAD_SIGNATURE
    print(f"{args.signature}: good signature for partition={manifest.partition}"
          f" version={manifest.version} sha256={manifest.sha256}")
    return 0


def _command(args: argparse.Namespace) -> int:
    return {"keygen": _keygen, "sign": _sign, "verify": _verify}[args.command](args)


def main(argv: list[str]) -> int:
    """Run ``bridged ota`` with `argv` (the words after "ota"); returns the exit status."""
    return run(PROG, _parser(), argv, _command, (ota_image.SignatureError,))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
