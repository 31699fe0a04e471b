"""Command line: ``bridged run [--config FILE] [--profile NAME] [--port DEVICE]
[--baud N] [--pty LINK] [--state-dir DIR]``, ``bridged check`` with the same
options (validate the configuration and print what it amounts to, without
serving), and ``bridged pki import|list|remove`` (the certificate store, see
``bridged.pki_cli``).

A user mistake (bad argument, bad config, a port that cannot be opened) ends
with exit status 2 and one line naming what is wrong; never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from bridged import __version__
from bridged.config import Config, ConfigError, load_config, state_dir, to_toml
from bridged.log import setup_logging

__all__ = ["main"]

USAGE_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridged", description="An ESP-AT endpoint on a Linux serial port.")
    parser.add_argument("--version", action="version", version=f"bridged {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="serve ESP-AT on a serial port or a pseudo-terminal")
    check = commands.add_parser("check", help="check the configuration and print it, without serving")
    for command in (run, check):
        command.add_argument("--config", metavar="FILE", help="TOML configuration file")
        command.add_argument("--profile", metavar="NAME", help="profile name or .toml path (default esp32)")
        command.add_argument("--port", metavar="DEVICE", help="serial device, e.g. /dev/ttyAMA0")
        command.add_argument("--baud", metavar="N", type=int, help="UART speed when no speed is stored")
        command.add_argument("--pty", metavar="LINK", help="create a pseudo-terminal and symlink it at LINK")
        command.add_argument("--state-dir", metavar="DIR", help="where persistent settings live")
    commands.add_parser("pki", help="manage the TLS certificate store (bridged pki --help)", add_help=False)
    commands.add_parser("fleet", help="run many devices for load testing (bridged fleet --help)",
                        add_help=False)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    if args.port is not None:
        overrides["uart.port"] = args.port
    if args.pty is not None:
        overrides["uart.port"] = ""
        overrides["uart.pty_link"] = os.path.abspath(args.pty)
    if args.baud is not None:
        overrides["uart.baud"] = args.baud
    if args.state_dir is not None:
        overrides["state.dir"] = os.path.abspath(args.state_dir)
    return overrides


def _fail(message: str) -> int:
    print(f"bridged: {message}", file=sys.stderr)
    return USAGE_ERROR


def _load(args: argparse.Namespace):
    """(config, None), or (None, exit status) after saying what is wrong."""
    if args.port is not None and args.pty is not None:
        return None, _fail("--port and --pty exclude each other; give one")
    try:
        config = load_config(args.config, args.profile, _overrides(args))
    except ConfigError as exc:
        return None, _fail(str(exc))
    if config.uart.port and not os.path.exists(config.uart.port):
        return None, _fail(f"uart.port: {config.uart.port} does not exist")
    return config, None


def check(args: argparse.Namespace) -> int:
    config, failed = _load(args)
    if config is None:
        return failed
    sys.stdout.write(to_toml(config))
    return 0


def run(args: argparse.Namespace) -> int:
    config, failed = _load(args)
    if config is None:
        return failed
    try:
        directory = state_dir(config)
    except OSError as exc:
        return _fail(f"state directory: {exc}")
    device = config.uart.port
    setup_logging(config.log.level, config.log.format, "supervisor")
    from bridged.supervisor import Supervisor  # after logging: it imports every module

    def reload() -> Config:
        return load_config(args.config, args.profile, _overrides(args))

    return Supervisor(config, device, config.uart.pty_link or None, directory, reload).run()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pki"]:
        from bridged.pki_cli import main as pki_main

        return pki_main(argv[1:])
    if argv[:1] == ["fleet"]:
        from bridged.fleet_cli import main as fleet_main

        return fleet_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "check":
        return check(args)
    return _fail(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
