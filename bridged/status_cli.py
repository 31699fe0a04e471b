"""Command line: ``bridged status [--json] [--watch] [--instance NAME |
--control PATH | --state-dir DIR]``: what a running bridged is doing now.

It asks the daemon's control socket (`bridged.ops.protocol`) for
``{"cmd": "status"}`` and prints a compact table, or the reply's JSON with
``--json``.  ``--watch`` asks again every second until Ctrl-C (redrawing the
table, or one JSON line each time), riding out a daemon that restarts.

Which socket: ``--control PATH``; ``--instance NAME`` for the systemd
instance bridged@NAME (/run/bridged/NAME/control.sock); ``--state-dir DIR``
for a daemon run with that state directory (DIR/control.sock); else
$RUNTIME_DIRECTORY/control.sock, else the one instance under /run/bridged,
else the default state directory's.

Exit status: 0 shown; 1 the daemon cannot be reached or refused (one line on
stderr saying why); 2 a usage mistake.
"""

from __future__ import annotations


import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from bridged.ops.protocol import FILENAME, RUN_DIR, ProtocolError, instance_path, request, sun_address
from bridged.printable import printable
from bridged.ops.status import human_bytes

__all__ = ["main"]

PROG = "bridged status"
UNREACHABLE = 1
USAGE_ERROR = 2
_TIMEOUT = 5.0
_CLEAR = "\x1b[H\x1b[2J"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Show what a running bridged is doing: links, UART, errors.")
    parser.add_argument("--json", action="store_true", help="print the daemon's JSON reply")
    parser.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    parser.add_argument("--transcript", choices=("on", "off"),
                        help="switch the AT transcript on or off (to [log] transcript_path, else the log)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--instance", metavar="NAME", help="the systemd instance bridged@NAME")
    where.add_argument("--control", metavar="PATH", help="the control socket's path")
    where.add_argument("--state-dir", metavar="DIR", help="the state directory the daemon runs with")
    return parser


def socket_path(args: argparse.Namespace) -> Path:
    """The control socket to ask (see the module's docstring).

    Raises:
        _UsageError: several instances run and none was named.
    """
    if args.control:
        return Path(args.control)
    if args.instance:
        if "/" in args.instance or args.instance in ("", ".", ".."):
            raise _UsageError(f"--instance {args.instance!r}: the part after bridged@, e.g. ttyAMA0")
        return instance_path(args.instance)
    if args.state_dir:
        return Path(args.state_dir) / FILENAME
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / FILENAME
    found = sorted(RUN_DIR.glob(f"*/{FILENAME}")) if RUN_DIR.is_dir() else []
    if len(found) > 1:
        names = ", ".join(p.parent.name for p in found)
        raise _UsageError(f"several instances run ({names}); choose one with --instance NAME")
    if found:
        return found[0]
    return _default_state_dir() / FILENAME


def _default_state_dir() -> Path:
    """bridged.config.state_dir's choice for the built-in configuration, without creating it."""
    first = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if first:
        return Path(first)
    if Path("/var/lib/bridged").is_dir():
        return Path("/var/lib/bridged")
    xdg = os.environ.get("XDG_STATE_HOME", "")
    return (Path(xdg) if xdg.startswith("/") else Path.home() / ".local" / "state") / "bridged"


class _Unreachable(Exception):
    """str() is the one line to print."""


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(_TIMEOUT)
    try:
        with sun_address(path) as address:
            sock.connect(address)
    except FileNotFoundError:
        sock.close()
        raise _Unreachable(f"no control socket at {path}: is bridged running? "
                           "(name it with --instance, --control or --state-dir)") from None
    except PermissionError:
        sock.close()
        raise _Unreachable(f"{path}: permission denied; run as root or as a member of the service's group") from None
    except OSError as exc:
        sock.close()
        raise _Unreachable(f"{path}: {exc.strerror or exc} (bridged stopped?)") from None
    return sock


def _ask(sock: socket.socket, path: Path, req: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        reply = request(sock, req or {"cmd": "status"})
    except (OSError, ProtocolError) as exc:
        raise _Unreachable(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not reply.get("ok"):
        raise _Unreachable(printable(f"{path}: the daemon refused: {reply.get('error', 'no reason given')}"))
    return reply if req else reply["status"]


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _n(value: Any) -> str:
    return "?" if value is None else str(value)


def render(status: dict[str, Any]) -> str:
    """The compact human table of one status reply (see `printable`)."""
    u = status["uart"]
    framing = f"{u['data_bits']}{u['parity'][0].upper()}{u['stop_bits']}"
    ic = u["icount"]
    errors = "overruns n/a, framing errors n/a" if ic is None else \
        f"overruns {ic['overrun'] + ic['buf_overrun']}, framing errors {ic['frame']}, parity errors {ic['parity']}"
    lines = [
        f"bridged {status['version']}, up {_duration(status['uptime_s'])}; front pid {status['front_pid']}, "
        f"up {_duration(status['front_uptime_s'])}, restarts {status['front_restarts']}",
        f"UART {u['device']} ({u['kind']}): {u['baud']} {framing}, flow {u['flow_control']} (from {u['source']})",
        f"     in {human_bytes(u['bytes_in'])}, out {human_bytes(u['bytes_out'])}, "
        f"flow-control pauses {u['flow_pauses']}, {errors}",
        f"Wi-Fi {status['wifi']}" + (f" ({status['ssid']})" if status["ssid"] else ""),
        "",
        f"{'ID':<3}{'STATE':<11}{'TYPE':<6}{'REMOTE':<28}{'LOCAL':<7}{'RECV':<8}{'PT':<3}"
        f"{'UP':>10}{'DOWN':>10}{'+IPD':>7}{'ERR':>5}{'PID':>8}{'RST':>5}",
    ]
    for link in status["links"]:
        remote = f"{link['remote']}:{link['remote_port']}" if link["remote"] else "-"
        up = "-" if link["bytes_up"] is None else human_bytes(link["bytes_up"])
        down = "-" if link["bytes_down"] is None else human_bytes(link["bytes_down"])
        lines.append(
            f"{link['link_id']:<3}{link['state']:<11}{link['type'] or '-':<6}{remote:<28}"
            f"{link['local_port'] or '-'!s:<7}{link['recv_mode']:<8}{'y' if link['passthrough'] else '-':<3}"
            f"{up:>10}{down:>10}{link['ipd']:>7}{_n(link['errors']):>5}{link['worker_pid'] or '-'!s:>8}"
            f"{link['restarts']:>5}")
    faults = status.get("faults")
    if faults is not None:
        counts = ", ".join(f"{name} {n}" for name, n in faults["counts"].items()) or "none injected"
        lines += ["", f"Faults (seed {faults['seed']}): {counts}"]
    if status["errors"]:
        lines += ["", "Recent warnings and errors:"]
        for e in status["errors"]:
            who = e.get("proc", "") + (f" {e['link_id']}" if "link_id" in e else "")
            lines.append(f"  {e.get('time', '')[:19]} {e.get('level', ''):<8}{who:<13} {e.get('event', '')} "
                         f"{e.get('detail', '')}".rstrip())
    return "\n".join(printable(line) for line in lines)


def _show(status: dict[str, Any], as_json: bool, watch: bool) -> None:
    if as_json:
        print(json.dumps(status, separators=(",", ":") if watch else None, indent=None if watch else 2))
    else:
        print((_CLEAR if watch else "") + render(status))
    sys.stdout.flush()


def _watch(path: Path, as_json: bool) -> int:
    sock = None
    try:
        while True:
            try:
                sock = sock or _connect(path)
                _show(_ask(sock, path), as_json, True)
            except _Unreachable as exc:
                if sock is not None:
                    sock.close()
                    sock = None
                print((_CLEAR if not as_json else "") + f"bridged status: {exc} (retrying)", flush=True)
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0
    finally:
        if sock is not None:
            sock.close()


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
        path = socket_path(args)
    except _UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    if args.transcript is not None:
        try:
            with _connect(path) as sock:
                reply = _ask(sock, path, {"cmd": "transcript", "on": args.transcript == "on"})
        except _Unreachable as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return UNREACHABLE
        print(f"transcript {'on' if reply['transcript'] else 'off'}")
        return 0
    if args.watch:
        return _watch(path, args.json)
    try:
        with _connect(path) as sock:
            status = _ask(sock, path)
    except _Unreachable as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return UNREACHABLE
    _show(status, args.json, False)
    return 0
