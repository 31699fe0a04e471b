"""Command line: ``bridged fleet --count N --dir D [--config FILE] [--profile NAME]
[--baud N] [--concurrency K] [--start-timeout S]`` runs N devices (see
``bridged.fleet``); ``bridged fleet status --dir D [--json] [--all]
[--timeout S] [--probe [--within MS]]`` reports on them; ``bridged fleet fault
--dir D NAME [key=value ...] (--device N | --all)`` fires a fault in one or
every device.

Status and fault go through each running device's control socket
(``D/run/<i>/control.sock``), asked concurrently, each within ``--timeout``
(1 s): see `bridged.fleet_status`.  A device is healthy when its pid is still
its ``bridged run`` and its control socket answers.  ``--probe`` adds what the
socket cannot tell, the AT round trip on the serial line (the pty opened, its
pending input dropped, ``AT`` sent three times, the median compared with
``--within``, 10 ms); it talks on the device's serial line, so not while a host
drives the device.

Exit status: 0 (status: every device healthy; fault: fired on every device
asked); 1 a fleet that did not stop cleanly, a device down, silent or slow, or
a fault not fired somewhere; 2 a user mistake (bad option or config, no fleet
in D, a fleet already running in D, an unknown fault or key), one line on
stderr starting ``bridged fleet: ``, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import NoReturn

from bridged.atclient import AtClient, AtTimeout
from bridged.config import ConfigError, load_config
from bridged.fault_cli import _params, _said
from bridged.faults.catalog import kind
from bridged.faults.spec import parse_demand
from bridged.fleet import MANIFEST, MAX_COUNT, Fleet, FleetSpec, device_paths
from bridged.fleet_status import SHOW_ALL_UP_TO, DeviceRow, NoAnswer, ask, control_path, fan_out, render, row, totals
from bridged.status_cli import _UsageError as _BadParams
from bridged.status_cli import printable

__all__ = ["main"]

PROG = "bridged fleet"
UNHEALTHY = 1
USAGE_ERROR = 2
_MAX_CONCURRENCY = 64
_PROBES = 3


class _UsageError(Exception):
    """argparse refused the command line (message without usage text)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _run_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Run N emulated devices, each on its own pty"
                                            " (bridged fleet status --dir D: how they are;"
                                            " bridged fleet fault --dir D NAME: fire a fault).")
    parser.add_argument("--count", metavar="N", type=int, required=True, help=f"devices, 1 to {MAX_COUNT}")
    parser.add_argument("--dir", metavar="D", required=True,
                        help="ptys D/ttyESP<i>, state D/state/<i>, logs D/logs/<i>.log, D/run/<i>")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file, for every device")
    parser.add_argument("--profile", metavar="NAME", help="profile name or .toml path (default esp32)")
    parser.add_argument("--baud", metavar="N", type=int, help="UART speed when no speed is stored")
    default = min(8, 2 * (os.cpu_count() or 1))
    parser.add_argument("--concurrency", metavar="K", type=int, default=default,
                        help=f"devices starting at once, 1 to {_MAX_CONCURRENCY} (default {default})")
    parser.add_argument("--start-timeout", metavar="S", type=float, default=60.0,
                        help="seconds a device may take to be ready, 1 to 600 (default 60)")
    return parser


def _status_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=f"{PROG} status", description="How is each device of the fleet in D, and the"
                                                        " fleet in total? (each device's control socket)")
    parser.add_argument("--dir", metavar="D", required=True, help="the fleet's directory")
    parser.add_argument("--json", action="store_true", help="the whole structure, every device's status included")
    parser.add_argument("--all", action="store_true",
                        help=f"list every device (past {SHOW_ALL_UP_TO} devices only the unhealthy ones are)")
    parser.add_argument("--timeout", metavar="S", type=float, default=1.0,
                        help="seconds each device has to answer, 0.05 to 60 (default 1)")
    parser.add_argument("--probe", action="store_true",
                        help="also time AT round trips on each pty (not while a host drives it)")
    parser.add_argument("--within", metavar="MS", type=float, default=10.0,
                        help="with --probe: longest acceptable AT round trip in ms (default 10)")
    return parser


def _fault_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=f"{PROG} fault", description="Fire a fault now in one or every device of the"
                                                       " fleet in D (bridged fault --list shows them).")
    parser.add_argument("--dir", metavar="D", required=True, help="the fleet's directory")
    parser.add_argument("name", metavar="NAME", help="the fault")
    parser.add_argument("params", nargs="*", metavar="key=value", help="the fault's keys")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--device", metavar="N", type=int, help="the device with index N")
    which.add_argument("--all", action="store_true", help="every device")
    parser.add_argument("--timeout", metavar="S", type=float, default=1.0,
                        help="seconds each device has to answer, 0.05 to 60 (default 1)")
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return USAGE_ERROR


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["status"]:
            return status(_status_parser().parse_args(argv[1:]))
        if argv[:1] == ["fault"]:
            return fault(_fault_parser().parse_args(argv[1:]))
        return run(_run_parser().parse_args(argv))
    except _UsageError as exc:
        return _fail(str(exc))


# -- bridged fleet ---------------------------------------------------------------------------


def _check_range(option: str, value: float, lo: float, hi: float, what: str) -> None:
    if not lo <= value <= hi:
        raise _UsageError(f"{option}: {value:g} is not allowed; allowed: {what} from {lo:g} to {hi:g}")


def _running_fleet(directory: Path) -> int | None:
    """The pid of a fleet manager still running in ``directory``, if any."""
    try:
        doc = json.loads((directory / MANIFEST).read_text())
        pid = int(doc["pid"]) if doc.get("running") else 0
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return pid if pid and _cmdline_has(pid, "fleet") else None


def _others_may_write(directory: Path) -> str | None:
    """Why another user may write in ``directory`` (or None): not ours, or
    writable by others or by a group that is not ours (a sticky bit does not
    help: they may still create the names the fleet uses)."""
    st = directory.stat()
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}"
    if st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != os.getegid()):
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def run(args: argparse.Namespace) -> int:
    _check_range("--count", args.count, 1, MAX_COUNT, "an integer")
    _check_range("--concurrency", args.concurrency, 1, _MAX_CONCURRENCY, "an integer")
    _check_range("--start-timeout", args.start_timeout, 1, 600, "seconds")
    directory = Path(args.dir).absolute()
    if directory.exists() and not directory.is_dir():
        return _fail(f"--dir: {directory} exists and is not a directory")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"--dir: {directory}: {exc.strerror}")
    if (unsafe := _others_may_write(directory)) is not None:
        return _fail(f"--dir: {directory} {unsafe}; other users could plant links where the fleet writes "
                     "(its logs, manifest, ptys): choose a directory of your own")
    if (pid := _running_fleet(directory)) is not None:
        return _fail(f"--dir: a fleet (pid {pid}) already runs in {directory}; stop it first")
    first = device_paths(directory, 0)
    overrides: dict[str, object] = {"uart.port": "", "uart.pty_link": str(first.pty),
                                    "state.dir": str(first.state_dir)}
    if args.baud is not None:
        overrides["uart.baud"] = args.baud
    try:  # every device loads the same sources: a mistake is found once, here
        config = load_config(args.config, args.profile, overrides)
    except ConfigError as exc:
        return _fail(str(exc))
    for sub in ("state", "run", "logs"):  # here, where a mistake is one line and exit 2
        try:
            (directory / sub).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            return _fail(f"--dir: {directory / sub}: {exc.strerror}")
    from bridged.log import setup_logging

    setup_logging(config.log.level, config.log.format, "fleet")
    config_path = os.path.abspath(args.config) if args.config else None
    profile = args.profile
    if profile is not None and (profile.endswith(".toml") or os.sep in profile):
        profile = os.path.abspath(profile)  # the devices resolve it from the same place
    spec = FleetSpec(args.count, directory, config_path, profile, args.baud,
                     args.concurrency, args.start_timeout)
    return Fleet(spec).run()


# -- bridged fleet status, bridged fleet fault -----------------------------------------------


def _cmdline_has(pid: int, word: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return word.encode() in file.read().split(b"\0")
    except OSError:
        return False


def _alive(directory: Path, entry: dict) -> bool:
    """Whether the device's pid is still its ``bridged run --pty D/ttyESP<i>`` (not a reused pid)."""
    pid = int(entry["pid"])
    return pid > 0 and _cmdline_has(pid, str(device_paths(directory, int(entry["index"])).pty))


def _probe(pty: str) -> tuple[float | None, str | None]:
    """Median AT round trip in ms over a few probes, or (None, why not)."""
    try:
        with AtClient(pty, timeout=1.0) as client:
            client.flush_input()
            times = [client.round_trip(1.0) for _ in range(_PROBES)]
    except AtTimeout as exc:
        return None, f"no OK: {exc}"
    except OSError as exc:
        return None, str(exc)
    return statistics.median(times) * 1000, None


def _read_manifest(directory: Path) -> dict:
    """The manifest of the fleet in ``directory`` (resolved), if no other user could have
    written it: the devices' sockets and ptys are found from it."""
    try:
        unsafe = _others_may_write(directory)
    except FileNotFoundError:
        raise _UsageError(f"--dir: no fleet in {directory} (no such directory)") from None
    except OSError as exc:
        raise _UsageError(f"--dir: {directory}: {exc.strerror}") from None
    if unsafe is not None:
        raise _UsageError(f"--dir: {directory} {unsafe}; another user could have put the manifest and the "
                          "control sockets there: only the fleet's own user may ask its devices")
    path = directory / MANIFEST
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc.get("devices"), list) or "pid" not in doc:
            raise ValueError("no devices")
        for entry in doc["devices"]:
            int(entry["index"]), int(entry["pid"]), str(entry["pty"]), str(entry["state"])
    except FileNotFoundError:
        raise _UsageError(f"--dir: no fleet in {directory} (no {MANIFEST})") from None
    except OSError as exc:
        raise _UsageError(f"{path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _UsageError(f"{path}: not a fleet manifest ({exc})") from None
    return doc


def _query(directory: Path, entry: dict, timeout: float) -> DeviceRow:
    if not _alive(directory, entry):
        return row(entry, False, None, "not running")
    try:
        reply = ask(control_path(directory, int(entry["index"])), {"cmd": "status"}, timeout, int(entry["pid"]))
        status = reply["status"]
        return row(entry, True, status, None)
    except NoAnswer as exc:
        return row(entry, True, None, str(exc))
    except (KeyError, TypeError, ValueError) as exc:  # a reply that is not a status
        return row(entry, True, None, f"bad status reply ({exc!r:.80})")


def _probed(directory: Path, r: DeviceRow) -> DeviceRow:
    """``r`` with its AT round trip; sequential on purpose: concurrent probes would time
    the machine's contention, not the devices; never on a device that is not running
    (its pty number may be someone's terminal by now)."""
    pty = device_paths(directory, r.index).pty
    if not r.alive:
        return r
    if not os.path.exists(pty):
        return replace(r, problem=r.problem or "no pty")
    at_ms, problem = _probe(str(pty))
    return replace(r, at_ms=at_ms, problem=r.problem or problem)


def status(args: argparse.Namespace) -> int:
    directory = Path(args.dir).absolute()
    resolved = directory.resolve()
    doc = _read_manifest(resolved)
    _check_range("--timeout", args.timeout, 0.05, 60, "seconds")
    within = args.within if args.probe else None
    if within is not None:
        _check_range("--within", within, 0.01, 60_000, "milliseconds")
    manager = int(doc["pid"])
    running = bool(doc.get("running")) and _cmdline_has(manager, "fleet")
    rows = fan_out(lambda entry: _query(resolved, entry, args.timeout), doc["devices"])
    if args.probe:
        rows = [_probed(resolved, r) for r in rows]
    tot = totals(rows, within)
    if args.json:
        print(json.dumps({"dir": str(directory), "manager_pid": manager, "manager_running": running,
                          "totals": asdict(tot), "devices": [asdict(r) for r in rows]}, indent=1))
    else:
        head = f"fleet {directory}: manager pid {manager} {'running' if running else 'not running'}, " \
               f"{len(rows)} devices"
        print(render(head, rows, tot, within, args.all))
    return 0 if tot.healthy == tot.devices else UNHEALTHY


def _fire(directory: Path, entry: dict, req: dict, timeout: float) -> tuple[int, str | None, str]:
    """(index, None if fired else why not, what to print)."""
    index = int(entry["index"])
    if not _alive(directory, entry):
        return index, "not running", f"device {index}: not running"
    try:
        reply = ask(control_path(directory, index), req, timeout, int(entry["pid"]))
    except NoAnswer as exc:
        return index, str(exc), f"device {index}: {exc}"
    return index, None, f"device {index}: {_said(reply)}"


def fault(args: argparse.Namespace) -> int:
    try:
        params = _params(args.params)
        kind(args.name)
        parse_demand(args.name, params)
    except _BadParams as exc:
        raise _UsageError(str(exc)) from None
    except KeyError as exc:
        raise _UsageError(exc.args[0]) from None
    except ValueError as exc:
        raise _UsageError(f"{args.name}: {exc}") from None
    _check_range("--timeout", args.timeout, 0.05, 60, "seconds")
    directory = Path(args.dir).absolute()
    resolved = directory.resolve()
    doc = _read_manifest(resolved)
    entries = doc["devices"]
    if args.device is not None:
        entries = [e for e in entries if int(e["index"]) == args.device]
        if not entries:
            raise _UsageError(f"--device: {args.device} is not allowed; allowed: 0 to {len(doc['devices']) - 1}")
    req = {"cmd": "fault", "name": args.name, "params": params}
    results = fan_out(lambda entry: _fire(resolved, entry, req, args.timeout), entries)
    for _index, _why, line in results:
        print(printable(line))
    failed = [index for index, why, _ in results if why is not None]
    if len(results) > 1:
        print(f"fired on {len(results) - len(failed)} of {len(results)} devices"
              + (f"; not on {failed}" if failed else ""))
    return UNHEALTHY if failed else 0
