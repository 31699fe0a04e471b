"""``bridged fleet status`` and ``bridged fleet fault``: every device of a
fleet asked through its own control socket, at once.

Theory of operation.  Device ``i``'s control socket is ``D/run/i/control.sock``
(the fleet hands it ``D/run/i`` as ``$RUNTIME_DIRECTORY``; see
`bridged.ops.protocol.daemon_path`).  The path is derived from ``D`` and the
index, never taken from the manifest, and a device whose pid is not its
``bridged run`` any more is not asked at all.  The socket must be served by
that pid or its child (the front), under our uid (SO_PEERCRED): one that
another process made or took over is not asked (`bridged.fleet_cli` refuses,
too, a fleet directory other users may write).  A reply is checked before it is used (`row`): a device
that answers something else than a status (a wrong type, a negative or
infinite count, nesting past `MAX_DEPTH`) is shown with a bad status reply,
never a traceback.  Requests go out from a
bounded pool of threads (`MAX_PARALLEL`), each with one deadline for its
connect, request and reply: a device that is stopped, wedged or slow costs
at most that long and is shown as not answering, so the command's time is
bounded by about ``devices / MAX_PARALLEL * timeout``.  Nothing is written on
a device's pty (a host may be driving it), unless the AT probe is asked for.

The aggregate is plain sums over the devices that answered: links open,
bytes over the UARTs and the links, warnings, restarts, and injected faults
per fault name.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from bridged.fleet import device_paths
from bridged.ops.protocol import FILENAME, HEADER, MAX_REPLY, ProtocolError, decode, encode, sun_address
from bridged.ops.status import human_bytes
from bridged.status_cli import _duration, printable

__all__ = ["DeviceRow", "MAX_PARALLEL", "NoAnswer", "SHOW_ALL_UP_TO", "Totals", "ask", "control_path", "fan_out",
           "render", "row", "totals"]

MAX_DEPTH = 32  # nesting of a status reply (bridged's own is 4 deep)
SHOW_ALL_UP_TO = 50  # past this many devices the table lists only the unhealthy ones
MAX_PARALLEL = 16  # the daemon's own MAX_CLIENTS; the machine's cores, not the sockets, limit us
_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid
T = TypeVar("T")
R = TypeVar("R")


class NoAnswer(Exception):
    """str() says why a device did not answer."""


def control_path(directory: Path, index: int) -> Path:
    """Where device ``index`` of the fleet in ``directory`` serves its control socket."""
    return device_paths(directory, index).run_dir / FILENAME


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise NoAnswer("closed the connection")
        data += chunk
    return bytes(data)


def _parent(pid: int) -> int:
    """``pid``'s parent, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return int(file.read().rpartition(b")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _check_server(sock: socket.socket, pid: int) -> None:
    """The socket listens under our uid in ``pid`` (the device's supervisor binds it) or a
    child of it (its front serves it: asyncio's listen() again makes the front the peer)."""
    peer_pid, peer_uid, _gid = _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
    if peer_uid != os.geteuid() or pid not in (peer_pid, _parent(peer_pid)):
        raise NoAnswer(f"its control socket is served by pid {peer_pid} (uid {peer_uid}), "
                       f"not by the device (pid {pid}, uid {os.geteuid()}) or its front: not asked")


def ask(path: Path, req: dict[str, Any], timeout: float, pid: int | None = None) -> dict[str, Any]:
    """One request on a fresh connection, all of it within ``timeout`` seconds; with
    ``pid``, only if the socket is served by that process or its child, under our uid.

    Raises:
        NoAnswer: no socket, refused, timed out, closed, someone else's socket, or
            a reply that is not a message or says ``ok: false``.
    """
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        with sun_address(path) as address:
            sock.connect(address)
        if pid is not None:
            _check_server(sock, pid)
        sock.sendall(encode(req))
        (size,) = HEADER.unpack(_recv_exact(sock, HEADER.size, deadline))
        if size > MAX_REPLY:
            raise NoAnswer(f"a reply of {size} bytes, over the limit")
        reply = decode(_recv_exact(sock, size, deadline))
    except TimeoutError:
        raise NoAnswer(f"no answer within {timeout:g} s") from None
    except FileNotFoundError:
        raise NoAnswer("no control socket") from None
    except ProtocolError as exc:
        raise NoAnswer(f"bad reply: {exc}") from None
    except OSError as exc:
        raise NoAnswer(exc.strerror or str(exc)) from None
    finally:
        sock.close()
    if not reply.get("ok"):
        raise NoAnswer(f"refused: {reply.get('error', 'no reason given')}")
    return reply


def fan_out(fn: Callable[[T], R], items: Iterable[T], parallel: int = MAX_PARALLEL) -> list[R]:
    """``[fn(item) for item in items]``, at most ``parallel`` at a time, in order."""
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(parallel, len(items))) as pool:
        return list(pool.map(fn, items))


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """One device: the manifest's view, and what its control socket said."""

    index: int
    pid: int
    state: str  # as the manifest says (starting, ready, backoff, failed, stopped)
    fleet_restarts: int  # times the fleet restarted it
    alive: bool  # its pid is still its `bridged run`
    answering: bool
    problem: str | None  # why not alive or not answering
    uptime_s: float | None = None
    front_restarts: int = 0
    worker_restarts: int = 0
    links_open: int = 0
    uart_up: int = 0  # bytes from the MCU
    uart_down: int = 0  # bytes to the MCU
    net_up: int = 0  # bytes the links sent to the network (workers that answered)
    net_down: int = 0
    warnings: int = 0  # recent warnings and errors the daemon keeps (at most 20)
    wifi: str = ""
    fault_seed: int | None = None
    faults: dict[str, int] = field(default_factory=dict)
    at_ms: float | None = None  # --probe: median AT round trip on the pty
    status: dict[str, Any] | None = None  # the device's whole status reply (JSON only)

    def healthy(self, within_ms: float | None) -> bool:
        if not (self.alive and self.answering):
            return False
        return within_ms is None or (self.at_ms is not None and self.at_ms <= within_ms)


def _of(kind: type, value: Any, what: str) -> Any:
    if not isinstance(value, kind):
        raise ValueError(f"{what} is not a{'n object' if kind is dict else ' list'}")
    return value


def _number(value: Any, what: str) -> float:
    """A count, a number of bytes or of seconds: finite, at least 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"{what} is {value!r:.40}, not a number from 0")
    return value


def _count(value: Any, what: str) -> int:
    return int(_number(value, what))


def _depth_ok(value: Any) -> bool:
    """No list or object nested deeper than MAX_DEPTH (asdict and json.dumps recurse)."""
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                return False
            todo += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return True


def row(entry: dict[str, Any], alive: bool, status: Any, problem: str | None) -> DeviceRow:
    """A device's row from its manifest entry and its status reply (None: no answer).

    Raises:
        ValueError: ``status`` is not a status (what is wrong in it, for the row's problem).
    """
    base = dict(index=int(entry["index"]), pid=int(entry["pid"]), state=str(entry["state"]),
                fleet_restarts=int(entry.get("restarts", 0)), alive=alive)
    if status is None:
        return DeviceRow(**base, answering=False, problem=problem)
    if not _depth_ok(_of(dict, status, "status")):
        raise ValueError(f"status is nested more than {MAX_DEPTH} deep")
    links = [_of(dict, link, "a link") for link in _of(list, status.get("links", []), "links")]
    faults = _of(dict, status.get("faults") or {}, "faults")
    counts = _of(dict, faults.get("counts") or {}, "faults.counts")
    uart = _of(dict, status.get("uart"), "uart")
    uptime = status.get("uptime_s")
    seed = faults.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int | None):
        raise ValueError(f"faults.seed is {seed!r:.40}, not a whole number")
    return DeviceRow(
        **base, answering=True, problem=None, uptime_s=None if uptime is None else _number(uptime, "uptime_s"),
        front_restarts=_count(status.get("front_restarts", 0), "front_restarts"),
        worker_restarts=sum(_count(link.get("restarts", 0), "a link's restarts") for link in links),
        links_open=sum(link.get("state") == "open" for link in links),
        uart_up=_count(uart.get("bytes_in"), "uart.bytes_in"),
        uart_down=_count(uart.get("bytes_out"), "uart.bytes_out"),
        net_up=sum(_count(link.get("bytes_up") or 0, "a link's bytes_up") for link in links),
        net_down=sum(_count(link.get("bytes_down") or 0, "a link's bytes_down") for link in links),
        warnings=len(_of(list, status.get("errors", []), "errors")), wifi=str(status.get("wifi", "")),
        fault_seed=seed, faults={str(k): _count(v, "a fault count") for k, v in counts.items()},
        status=status)


@dataclass(frozen=True, slots=True)
class Totals:
    devices: int
    running: int
    answering: int
    healthy: int
    links_open: int
    uart_up: int
    uart_down: int
    net_up: int
    net_down: int
    warnings: int
    restarts: int  # the fleet's, the fronts' and the workers' together
    faults: dict[str, int]  # injected faults per name, over every device that answered


def totals(rows: list[DeviceRow], within_ms: float | None) -> Totals:
    faults: Counter[str] = Counter()
    for r in rows:
        faults.update(r.faults)
    return Totals(
        len(rows), sum(r.alive for r in rows), sum(r.answering for r in rows),
        sum(r.healthy(within_ms) for r in rows), sum(r.links_open for r in rows),
        sum(r.uart_up for r in rows), sum(r.uart_down for r in rows),
        sum(r.net_up for r in rows), sum(r.net_down for r in rows), sum(r.warnings for r in rows),
        sum(r.fleet_restarts + r.front_restarts + r.worker_restarts for r in rows),
        dict(sorted(faults.items())))


def _faults(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "-"


def render(head: str, rows: list[DeviceRow], tot: Totals, within_ms: float | None, show_all: bool) -> str:
    """The compact table: one line per device (only the unhealthy ones past
    `SHOW_ALL_UP_TO` devices, unless ``show_all``), then the totals; every
    line through `printable` (fault names and reasons come from devices)."""
    shown = rows if show_all or len(rows) <= SHOW_ALL_UP_TO else [r for r in rows if not r.healthy(within_ms)]
    probe = within_ms is not None
    lines = [head, f"{'DEV':>4} {'PID':>7} {'STATE':<8} {'UP':>7} {'RST':>4} {'LINKS':>5} {'UART UP':>9} "
                   f"{'DOWN':>9} {'NET UP':>9} {'DOWN':>9} {'WARN':>4}" + (f" {'AT':>8}" if probe else "")
             + "  FAULTS / PROBLEM"]
    for r in shown:
        up = _duration(r.uptime_s) if r.uptime_s is not None else "-"
        at = (f"{r.at_ms:.2f}ms" if r.at_ms is not None else "-") if probe else None
        note = _faults(r.faults) if r.answering else f"NOT ANSWERING: {r.problem}"
        if r.answering and r.problem:
            note += f"; {r.problem}"
        if r.answering:
            counts = (f"{r.links_open:>5} {human_bytes(r.uart_up):>9} {human_bytes(r.uart_down):>9} "
                      f"{human_bytes(r.net_up):>9} {human_bytes(r.net_down):>9} {r.warnings:>4}")
        else:  # nothing known: not zeros
            counts = f"{'-':>5} {'-':>9} {'-':>9} {'-':>9} {'-':>9} {'-':>4}"
        lines.append(f"{r.index:>4} {r.pid:>7} {r.state:<8} {up:>7} "
                     f"{r.fleet_restarts + r.front_restarts + r.worker_restarts:>4} {counts}"
                     + (f" {at:>8}" if at is not None else "") + f"  {note}")
    if len(shown) < len(rows):
        lines.append(f"({len(rows) - len(shown)} healthy devices not shown; --all shows them)")
    lines.append(
        f"total: {tot.running} of {tot.devices} running, {tot.answering} answering, {tot.healthy} healthy; "
        f"{tot.links_open} links open; UART {human_bytes(tot.uart_up)} up {human_bytes(tot.uart_down)} down; "
        f"network {human_bytes(tot.net_up)} up {human_bytes(tot.net_down)} down; "
        f"{tot.restarts} restarts, {tot.warnings} recent warnings")
    lines.append(f"faults injected: {_faults(tot.faults)}")
    return "\n".join(printable(line) for line in lines)
