"""Command line: ``bridged fault NAME [key=value ...] [--instance NAME | --control
PATH | --state-dir DIR]`` fires a fault in a running bridged now; ``bridged
fault --list`` shows every fault kind and its keys (no daemon needed).

Fired on demand (`bridged.faults.spec.Demand`): an event kind (at_reset,
wifi_drop) happens now; an occasion kind hits the next ``count`` occasions
(default 1: the next command, join, lookup, byte ...); a condition holds for
``for`` seconds (default 10).  A link worker's kind goes to every link, or to
the one ``link=N`` names.  The keys are checked here before the daemon is
asked, so a typo is a usage error naming the key.

Which daemon: as ``bridged status`` finds it (`bridged.status_cli.socket_path`).

Exit status: 0 fired; 1 the daemon cannot be reached or refused (one line on
stderr saying why); 2 a usage mistake or a bad fault (unknown name, unknown
key, a value out of range).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bridged.faults.catalog import CATALOG, Per, kind
from bridged.faults.spec import parse_demand
from bridged.status_cli import _ask, _connect, _Parser, _Unreachable, _UsageError, printable, socket_path

__all__ = ["main", "listing"]

PROG = "bridged fault"
UNREACHABLE = 1
USAGE_ERROR = 2

_SCHEDULE = (
    ("rate", "0 to 1: the share of occasions hit; for an event kind, events per second (not for a condition)"),
    ("at", "seconds from the start when the first window opens (default 0)"),
    ("for", "seconds a window stays open (default: until the next one, or for ever)"),
    ("every", "seconds between the starts of two windows (at least `for`)"),
)
_DEMAND = (
    ("count", "on demand: how many of the next occasions are hit (default 1)"),
    ("for", "on demand: how many seconds a condition holds (default 10)"),
)


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Fire a fault in a running bridged now, or list the faults.")
    parser.add_argument("--list", action="store_true", help="list every fault kind and its keys")
    parser.add_argument("name", nargs="?", metavar="NAME", help="the fault (bridged fault --list)")
    parser.add_argument("params", nargs="*", metavar="key=value", help="the fault's keys")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--instance", metavar="NAME", help="the systemd instance bridged@NAME")
    where.add_argument("--control", metavar="PATH", help="the control socket's path")
    where.add_argument("--state-dir", metavar="DIR", help="the state directory the daemon runs with")
    return parser


def listing() -> str:
    """Every fault kind: where it applies, what it is drawn per, its keys; then the schedule keys."""
    lines = ["Faults ([faults.NAME] in a profile, or `bridged fault NAME key=value ...`):", ""]
    for fault in CATALOG:
        per = {Per.SECOND: "event", Per.CONDITION: "condition"}.get(fault.per, f"per {fault.per.value}")
        lines.append(f"{fault.name:<20} {fault.where.value:<7} {per:<15} {fault.doc}")
        for p in fault.params:
            default = int(p.default) if float(p.default).is_integer() else p.default
            shown = f"0x{default:08x}" if p.name == "code" and p.hi > 0xFFFF else default  # an ERR CODE
            lines.append(f"    {p.name:<16} {p.allowed()} (default {shown}): {p.doc}")
    lines += ["", "Schedule keys (every fault, in its [faults.NAME] table; seconds from the start):"]
    lines += [f"    {k:<16} {doc}" for k, doc in _SCHEDULE]
    lines += ["", "On demand (bridged fault NAME ...), besides the fault's own keys:"]
    lines += [f"    {k:<16} {doc}" for k, doc in _DEMAND]
    lines += ["", "[faults] seed = N makes a run reproducible; without it bridged draws one and logs it."]
    return "\n".join(lines)


def _params(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _UsageError(f"{pair!r} is not key=value")
        out[key] = value
    return out


def _said(reply: dict[str, Any]) -> str:
    """The daemon's answer in words; one of another shape is shown as it came (a fleet's
    device, or another version, may send anything)."""
    name = reply.get("fault", "?")
    links, for_s, armed = reply.get("links"), reply.get("for_s"), reply.get("armed", 1)
    if isinstance(links, list):
        return f"{name}: sent to link worker{'s' if len(links) != 1 else ''} {', '.join(map(str, links))}"
    if isinstance(reply.get("fired"), bool):
        return f"{name}: fired" if reply["fired"] else f"{name}: nothing to act on now (the daemon's log says why)"
    if isinstance(for_s, int | float) and not isinstance(for_s, bool):
        return f"{name}: in force for {for_s:g} s"
    if "links" not in reply and "fired" not in reply and "for_s" not in reply and type(armed) is int:
        return f"{name}: armed for the next {armed} occasion(s)"
    return f"{name}: done; the reply: {json.dumps(reply)[:200]}"


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.list:
            print(listing())
            return 0
        if not args.name:
            raise _UsageError("name a fault (bridged fault --list shows them)")
        params = _params(args.params)
        try:
            kind(args.name)
        except KeyError as exc:
            raise _UsageError(exc.args[0]) from None
        try:
            parse_demand(args.name, params)
        except ValueError as exc:
            raise _UsageError(f"{args.name}: {exc}") from None
        path: Path = socket_path(args)
    except _UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    try:
        with _connect(path) as sock:
            reply = _ask(sock, path, {"cmd": "fault", "name": args.name, "params": params})
    except _Unreachable as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return UNREACHABLE
    print(printable(_said(reply)))  # the daemon's words: no escape sequence reaches the terminal
    return 0
