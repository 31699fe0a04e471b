"""Command line: ``bridged run [--instance NAME] [--config FILE] [--profile NAME]
[--port DEVICE] [--baud N] [--pty LINK] [--state-dir DIR] [--transcript FILE]
[--control PATH]``, ``bridged check`` with the same options (validate the
configuration and print what it amounts to, without serving), ``bridged pki
import|list|remove`` (the certificate store, see ``bridged.pki_cli``) and
``bridged status`` (what a running daemon is doing, see ``bridged.status_cli``)
and ``bridged ota keygen|sign|verify`` (signed updates, see ``bridged.ota_cli``)
and ``bridged fault NAME [key=value ...] | --list`` (faults on demand, see ``bridged.fault_cli``).

Without --config, /etc/bridged/bridged.toml and then /etc/bridged/<instance>.toml
are read when present; --config FILE replaces them (see bridged.config).

Every failure to start is one line on stderr, ``bridged: <cause>; <remedy>``,
never a traceback, and an exit status systemd can act on:

- 2: a usage or configuration mistake (bad argument, bad config file or key);
- 1: everything else: the serial port is missing, locked or busy, not a tty or
  not permitted; the pty link cannot be made; the state directory cannot be
  created; a descriptor, memory or process limit is reached; the front keeps
  failing.  (Restart=on-failure retries these.)
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
import threading

from bridged import __version__
from bridged.caps import make_undumpable
from bridged.config import Config, ConfigError, load_config, profile_header, state_dir, to_toml
from bridged.log import setup_logging
from bridged.systemd import stderr_is_journal
from bridged.uart.transcript_file import RotatingFile

__all__ = ["main"]

USAGE_ERROR = 2
START_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridged", description="An ESP-AT endpoint on a Linux serial port.")
    parser.add_argument("--version", action="version", version=f"bridged {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="serve ESP-AT on a serial port or a pseudo-terminal")
    check = commands.add_parser("check", help="check the configuration and print it, without serving")
    for command in (run, check):
        command.add_argument("--instance", metavar="NAME",
                             help="service instance (the unit's %%i): reads /etc/bridged/NAME.toml"
                                  " too and keeps state in <state base>/NAME")
        command.add_argument("--config", metavar="FILE",
                             help="TOML configuration file, instead of /etc/bridged/bridged.toml and NAME.toml")
        command.add_argument("--profile", metavar="NAME", help="profile name or .toml path (default esp32)")
        command.add_argument("--port", metavar="DEVICE", help="serial device, e.g. /dev/ttyAMA0")
        command.add_argument("--baud", metavar="N", type=int, help="UART speed when no speed is stored")
        command.add_argument("--pty", metavar="LINK", help="create a pseudo-terminal and symlink it at LINK")
        command.add_argument("--state-dir", metavar="DIR", help="where persistent settings live")
        command.add_argument("--transcript", metavar="FILE",
                             help="write the AT transcript (every byte to and from the MCU) to FILE")
    run.add_argument("--control", metavar="PATH", help="the control socket for `bridged status` (default: "
                     "$RUNTIME_DIRECTORY/control.sock, else <state dir>/control.sock)")
    commands.add_parser("pki", help="manage the TLS certificate store (bridged pki --help)", add_help=False)
    commands.add_parser("status", help="show what a running bridged is doing (bridged status --help)",
                        add_help=False)
    commands.add_parser("ota", help="keys and signatures for OTA images (bridged ota --help)", add_help=False)
    commands.add_parser("fault", help="fire a fault in a running bridged, or list them (bridged fault --help)",
                        add_help=False)
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
    if args.transcript is not None:
        overrides["log.transcript"] = True
        overrides["log.transcript_path"] = os.path.abspath(args.transcript)
    return overrides


def _fail(message: str, status: int = USAGE_ERROR) -> int:
    # In the journal, "<3>" makes the line an error (journalctl -p err), as sd-daemon(3) says.
    priority = "<3>" if stderr_is_journal() else ""
    print(f"{priority}bridged: {message}", file=sys.stderr, flush=True)
    return status


def _load_config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.profile, _overrides(args),
                       instance=args.instance, system=True)


def _load(args: argparse.Namespace):
    """(config, None), or (None, exit status) after saying what is wrong."""
    if args.port is not None and args.pty is not None:
        return None, _fail("--port and --pty exclude each other; give one")
    try:
        config = _load_config(args)
    except ConfigError as exc:
        return None, _fail(str(exc))
    return config, None


def _profile_says(config: Config) -> str:
    """The profile's header comment (what it models, where its figures come from)."""
    if not config.profile_file:
        return ""  # the built-in defaults: no profile file was read
    path = config.profile_file
    header = profile_header(path)
    return f"#\n# ---- {path} ----\n{header}\n# ----\n" if header else ""


def check(args: argparse.Namespace) -> int:
    config, failed = _load(args)
    if config is None:
        return failed
    head, _, body = to_toml(config).partition("\n\n")  # the "# instance/profile" lines, then the keys
    sys.stdout.write(f"{head}\n{_profile_says(config)}\n{body}")
    if config.uart.port:
        from bridged.uart.port import serial_error

        try:
            os.stat(config.uart.port)
        except OSError as exc:  # valid, but `run` would stop here now: say so, as it would
            return _fail(str(serial_error(config.uart.port, exc)), START_FAILED)
    return 0


def _import_quietly() -> None:
    """Import every module the daemon runs (bridged.supervisor's) without the collector.

    They make most of the daemon's objects (about 50,000 the collector tracks)
    and a few hundred of garbage: collections meanwhile walked the young ones
    again and again (9 ms of the import's 125 ms of CPU here). Frozen at once
    (as the supervisor freezes what it makes before forking), they are never
    walked again, and the children's collections leave their pages shared.
    """
    if "bridged.supervisor" in sys.modules:  # imported already (a fork server's child)
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        import bridged.supervisor  # noqa: F401

        gc.freeze()
    finally:
        if enabled:
            gc.enable()


def run(args: argparse.Namespace) -> int:
    # Before the configuration (its secrets) is read; kept by every child (bridged.caps).
    make_undumpable()
    config, failed = _load(args)
    if config is None:
        return failed
    try:
        directory = state_dir(config)
    except OSError as exc:
        return _fail(f"state directory {exc.filename}: {exc.strerror}; choose another --state-dir "
                     "or [state] dir", START_FAILED)
    if config.log.transcript and config.log.transcript_path:
        try:  # the front opens it again; a mistake shows here, before serving
            RotatingFile(config.log.transcript_path, config.log.transcript_max_bytes,
                         config.log.transcript_files).close()
        except OSError as exc:
            return _fail(f"log.transcript_path: {config.log.transcript_path}: {exc.strerror or exc}")
    device = config.uart.port
    setup_logging(config.log.level, config.log.format, "supervisor")
    _import_quietly()
    from bridged.ops.protocol import daemon_path
    from bridged.spawn import StartError
    from bridged.supervisor import Supervisor  # after logging: it imports every module
    from bridged.uart.port import PortError

    def reload() -> Config:
        return _load_config(args)

    try:
        status = Supervisor(config, device, config.uart.pty_link or None, directory, reload,
                            daemon_path(args.control, directory)).run()
    except (PortError, StartError) as exc:
        status = _fail(str(exc), START_FAILED)
    return _end(status)


def _end(status: int) -> int:
    """End the daemon, once the supervisor has stopped its children and closed what it owns,
    without tearing its interpreter down.

    The interpreter's exit would free every object of every module one by one,
    writing to each of their pages: the larger part of a daemon's stop (20 ms
    of CPU in a daemon forked from the tests' fork server, whose pages it
    copies as it writes them; 12 ms exec'd). What that exit does that is seen
    is kept: the atexit callbacks (logging's), standard output and error
    flushed (status 120 when that fails, as Python's own), the status. A
    thread left running (none is expected) gets the interpreter's usual exit.
    """
    if threading.active_count() > 1:
        return status
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            status = 120
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pki"]:
        from bridged.pki_cli import main as pki_main

        return pki_main(argv[1:])
    if argv[:1] == ["status"]:
        from bridged.status_cli import main as status_main

        return status_main(argv[1:])
    if argv[:1] == ["ota"]:
        from bridged.ota_cli import main as ota_main

        return ota_main(argv[1:])
    if argv[:1] == ["fault"]:
        from bridged.fault_cli import main as fault_main

        return fault_main(argv[1:])
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
