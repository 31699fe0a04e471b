"""Command line: ``bridged pki import KIND INDEX FILE | list | remove KIND INDEX``.

Each takes ``--instance NAME`` (the service instance, as ``bridged run
--instance``: the same state directory, /var/lib/bridged/NAME for a system
service, chosen by `bridged.config.state_dir` from the same configuration
files) or ``--state-dir DIR``.

Run as root on a state directory that belongs to another user (the service's
user, bridged), what it writes is handed to that user, so the service can read
it: files written by root would be root's, mode 0600.

Exit status: 0 done; 1 ``remove`` found nothing to remove; 2 a user mistake
(bad kind or index, unreadable or invalid file, a key and certificate that do
not match, an unusable state directory), reported as one line on stderr
starting ``bridged pki: ``, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from bridged.config import ConfigError, load_config, state_dir
from bridged.pki import KINDS, MAX_INDEX, Entry, PkiError, PkiStore
from bridged.subcommand import Parser, run

__all__ = ["main"]

PROG = "bridged pki"
NOT_PRESENT = 1


def _parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--state-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="state directory (default: the daemon's)")
    common.add_argument("--instance", metavar="NAME", default=argparse.SUPPRESS,
                        help="the service instance whose store this is (bridged@NAME)")
    parser = Parser(prog=PROG, parents=[common],
                     description="Manage the certificates and keys SSL links use"
                                 " (ESP-AT's mfg_nvs PKI namespaces).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    kinds = ", ".join(KINDS)
    add = commands.add_parser("import", parents=[common], help="store a PEM or DER file",
                              description=f"Store FILE as KIND.INDEX; KIND is one of {kinds}.")
    add.add_argument("kind", metavar="KIND")
    add.add_argument("index", metavar="INDEX", help=f"0 to {MAX_INDEX}")
    add.add_argument("file", metavar="FILE")
    commands.add_parser("list", parents=[common], help="show what is stored")
    remove = commands.add_parser("remove", parents=[common], help="delete KIND.INDEX")
    remove.add_argument("kind", metavar="KIND")
    remove.add_argument("index", metavar="INDEX")
    return parser


def _index(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise PkiError(f"index {text!r} is not a number from 0 to {MAX_INDEX}")
    return int(text)


def _state_dir(args: argparse.Namespace) -> Path:
    given = getattr(args, "state_dir", None)
    instance = getattr(args, "instance", None)
    if given is not None:
        if instance is not None:
            raise PkiError("--state-dir and --instance exclude each other; give one")
        directory = Path(given)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return directory
    return state_dir(load_config(None, None, {}, instance=instance, system=True))


def _hand_over(state: Path) -> None:
    """Run as root, give what is under ``state/pki`` to the owner of `state`.

    The service reads its store as its own user; files root wrote are mode
    0600 root's. Nothing to do when the owner is whoever runs this.
    """
    owner = state.stat()
    if os.geteuid() != 0 or owner.st_uid == 0:
        return
    top = state / "pki"
    for root, dirs, files in os.walk(top):
        for path in [Path(root), *(Path(root) / name for name in dirs + files)]:
            if path.lstat().st_uid != owner.st_uid:
                os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)


def _date(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _expiry(entry: Entry, now: datetime.datetime) -> str:
    """"2035-06-01T12:00:00Z", "expired 2020-01-01T00:00:00Z", or "-" for keys."""
    if entry.not_after is None:
        return "-"
    expired = "expired " if entry.not_after <= now else ""
    return f"{expired}{_date(entry.not_after)}"


def _describe(entry: Entry) -> str:
    """The import line's details: subject and expiry, or the key type."""
    if entry.not_after is None:
        return f"{entry.key_type} private key, sha256 {entry.fingerprint}"
    now = datetime.datetime.now(datetime.UTC)
    more = f" (+{entry.certs - 1} more)" if entry.certs > 1 else ""
    subject = entry.subject or "(empty subject)"
    expiry = _expiry(entry, now)
    expiry = expiry if expiry.startswith("expired") else f"expires {expiry}"
    return f"{subject}{more}, {expiry}, sha256 {entry.fingerprint}"


def _table(entries: list[Entry]) -> str:
    now = datetime.datetime.now(datetime.UTC)
    rows = [("ENTRY", "TYPE", "SUBJECT", "EXPIRES", "SHA256")]
    for e in entries:
        subject = e.subject or ("(private key)" if e.not_after is None else "(empty subject)")
        if e.certs > 1:
            subject += f" (+{e.certs - 1} more)"
        rows.append((e.name, e.key_type, subject, _expiry(e, now), e.fingerprint[:16]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths))
                     + "  " + row[4] for row in rows)


def _run(args: argparse.Namespace) -> int:
    if args.command == "list":
        entries = PkiStore(_state_dir(args)).entries()
        print(_table(entries) if entries else "no entries")
        return 0
    kind, index = args.kind, _index(args.index)
    if kind not in KINDS:
        raise PkiError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    state = _state_dir(args)
    store = PkiStore(state)
    if args.command == "import":
        try:
            entry = store.import_file(kind, index, args.file)
        finally:
            _hand_over(state)
        print(f"{entry.name} imported: {_describe(entry)}")
        return 0
    if not store.remove(kind, index):
        print(f"{PROG}: {kind}.{index}: not present", file=sys.stderr)
        return NOT_PRESENT
    print(f"removed {kind}.{index}")
    return 0


def main(argv: list[str]) -> int:
    """Run ``bridged pki`` with `argv` (the words after "pki"); returns the exit status."""
    # ConfigError: the configuration naming the state directory.
    return run(PROG, _parser(), argv, _run, (PkiError, ConfigError))

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
