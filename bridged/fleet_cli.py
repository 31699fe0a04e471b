"""Command line: ``bridged fleet --count N --dir D [--config FILE] [--profile NAME]
[--baud N] [--concurrency K] [--start-timeout S]`` runs N devices (see
``bridged.fleet``); ``bridged fleet status --dir D [--within MS] [--json]``
reports on them.

The status is an interim one, until each device has its own status/control
socket (it will live in the device's runtime directory, ``D/run/i``, which the
fleet already hands each device as ``$RUNTIME_DIRECTORY``): per device, from
the manifest ``D/fleet.json``, whether its pid is alive (and still that
device's ``bridged run``), its pty, and whether it answers ``AT`` with OK --
the pty is opened, its pending input dropped, ``AT`` sent three times, and the
median round trip compared with ``--within`` (10 ms). It talks on the device's
serial line: do not run it while a host drives that device.

Exit status: 0 (status: every device alive and answering in time); 1 a fleet
that did not stop cleanly, or (status) a device that is down or slow; 2 a user
mistake (bad option or config, no fleet in D, a fleet already running in D),
one line on stderr starting ``bridged fleet: ``, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

from bridged.atclient import AtClient, AtTimeout
from bridged.config import ConfigError, load_config
from bridged.fleet import MANIFEST, MAX_COUNT, Fleet, FleetSpec, device_paths

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
                                            " (bridged fleet status --dir D: how they are).")
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
    parser = _Parser(prog=f"{PROG} status", description="Is each device of the fleet in D alive"
                                                        " and answering AT? (interim status)")
    parser.add_argument("--dir", metavar="D", required=True, help="the fleet's directory")
    parser.add_argument("--within", metavar="MS", type=float, default=10.0,
                        help="longest acceptable AT round trip in ms (default 10)")
    parser.add_argument("--json", action="store_true", help="one JSON object per device")
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return USAGE_ERROR


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["status"]:
            return status(_status_parser().parse_args(argv[1:]))
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


# -- bridged fleet status --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    index: int
    pid: int
    state: str  # as the manifest says
    alive: bool
    pty: str
    pty_target: str | None  # /dev/pts/N, None when the link is missing or dangling
    at_ms: float | None  # median AT round trip, None without an OK
    problem: str | None  # why there is no answer


def _cmdline_has(pid: int, word: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return word.encode() in file.read().split(b"\0")
    except OSError:
        return False


def _pty_target(pty: str) -> str | None:
    try:
        target = os.readlink(pty)
    except OSError:
        return None
    return target if os.path.exists(target) else None


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


def device_status(directory: Path, entry: dict) -> DeviceStatus:
    """One device's interim status (its control socket in ``entry["run_dir"]`` will answer
    this instead once it exists).

    Its pty is the fleet's ``D/ttyESP<index>``, whatever the manifest says, and
    it is opened only while the device runs: a dead device's pty number may
    be anyone's terminal by now, which the probe would put in raw mode, read
    the pending input of and write AT to.
    """
    index, pid = int(entry["index"]), int(entry["pid"])
    pty = str(device_paths(directory, index).pty)
    alive = pid > 0 and _cmdline_has(pid, pty)  # its `bridged run --pty PTY`, not a reused pid
    target = _pty_target(pty)
    if not alive:
        at_ms, problem = None, "not running"
    elif target is None:
        at_ms, problem = None, "no pty"
    else:
        at_ms, problem = _probe(pty)
    return DeviceStatus(index, pid, str(entry["state"]), alive, pty, target, at_ms, problem)


def _read_manifest(directory: Path) -> dict:
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


def status(args: argparse.Namespace) -> int:
    directory = Path(args.dir).absolute()
    doc = _read_manifest(directory)
    within = args.within
    _check_range("--within", within, 0.01, 60_000, "milliseconds")
    manager = int(doc["pid"])
    running = bool(doc.get("running")) and _cmdline_has(manager, "fleet")
    rows = [device_status(directory.resolve(), entry) for entry in doc["devices"]]
    healthy = [r for r in rows if r.alive and r.at_ms is not None and r.at_ms <= within]
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
    else:
        print(f"fleet {directory}: manager pid {manager} {'running' if running else 'not running'},"
              f" {len(rows)} devices")
        print(f"{'device':>6}  {'pid':>7}  {'state':<8}  {'alive':<5}  {'pty':<40}  AT")
        for r in rows:
            pty = f"{r.pty} -> {r.pty_target}" if r.pty_target else f"{r.pty} (missing)"
            answer = f"OK {r.at_ms:.2f} ms" if r.at_ms is not None else r.problem
            print(f"{r.index:>6}  {r.pid:>7}  {r.state:<8}  {'yes' if r.alive else 'no':<5}  {pty:<40}  {answer}")
        print(f"{len(healthy)} of {len(rows)} devices alive and answering AT within {within:g} ms")
    return 0 if len(healthy) == len(rows) else UNHEALTHY
