"""``bridged status``: what is happening now, gathered in the front.

Theory of operation.  The front has the session, the UART and the link
table; each link worker has its connection's byte counters and its own
warnings; the supervisor has the uptime, the restart counts and its own
warnings.  Nothing here adds work to the byte path: the front counts what it
reads from the port and the +IPD frames it writes (an increment each), the
workers count what they already counted for their ``link_closed`` line.

- The supervisor's part arrives with every heartbeat (``Ping``, once a
  second); the answer (``Pong``) carries `StatusService.summary`, the line the
  supervisor gives systemd as STATUS=.
- A ``status`` request asks every worker for its counters (``StatsRequest``
  over its control socket) and waits at most `GATHER_TIMEOUT` for the
  answers; a worker that does not answer in time is shown without them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import itertools
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import structlog

from bridged import __version__
from bridged.ipc.control import send_message
from bridged.ipc.messages import LinkStats, Ping, StatsRequest
from bridged.ops import events
from bridged.ops.server import ControlServer

__all__ = ["GATHER_TIMEOUT", "StatusService", "UartCounters", "human_bytes"]

log = structlog.get_logger()

GATHER_TIMEOUT = 0.5
_TIOCGICOUNT = 0x545D
_ICOUNT = struct.Struct("20i")  # struct serial_icounter_struct
_STOP_BITS = {1: "1", 2: "1.5", 3: "2"}
_PARITY = {0: "none", 1: "odd", 2: "even"}
_FLOW = {0: "none", 1: "rts", 2: "cts", 3: "rtscts"}
_WIFI = {0: "not started", 1: "connected, no IP", 2: "connected", 3: "connecting", 4: "disconnected"}


@dataclass(slots=True)
class UartCounters:
    """The front's counts of the serial line (cheap increments)."""

    rx_bytes: int = 0  # read from the MCU, whatever became of it (a boot's or an injected overrun's loss)
    flow_pauses: int = 0  # times reading stopped because a link's uplink ring was full
    direct_sends: int = 0  # AT+CIPSEND payloads read whole straight into their ring (bridged.uart.direct)
    direct_fallbacks: int = 0  # ... begun that way, then handed to the general path (a +++ candidate, a fault)
    max_command_batch: int = 0  # the most command lines handled in one go (bounded: uart.dispatch._PASS_SHARE)


@dataclass(frozen=True)
class LinkStatus:
    link_id: int
    state: str  # no worker, idle, connecting, open, closing
    type: str
    remote: str
    remote_port: int
    local_port: int
    recv_mode: str  # active, passive
    passthrough: bool
    bytes_up: int | None  # None: the worker did not answer in time
    bytes_down: int | None
    ipd: int  # +IPD frames and notices sent for this connection
    errors: int | None  # warnings and errors its worker logged since it started
    worker_pid: int
    restarts: int


@dataclass(frozen=True)
class UartStatus:
    device: str
    kind: str  # serial, pty
    baud: int
    data_bits: int
    stop_bits: str
    parity: str
    flow_control: str
    source: str  # config, AT+UART_DEF (stored), AT+UART_CUR
    bytes_in: int
    bytes_out: int
    flow_pauses: int
    direct_sends: int  # AT+CIPSEND payloads read whole straight into their ring (uart.direct)
    direct_fallbacks: int  # ... begun that way, then handed to the general path
    max_command_batch: int  # the most command lines handled in one go, one callback of the front's event loop
    icount: dict[str, int] | None  # TIOCGICOUNT; None on a pty (n/a)


@dataclass(frozen=True)
class FaultsStatus:
    seed: int  # [faults] seed, configured or drawn at start: put it in the profile to replay the run
    counts: dict[str, int]  # injected faults per name, the front's and the link workers' together
    uart_hooks: dict[str, bool]  # the UART paths through a fault hook now: "input", "output"


@dataclass(frozen=True)
class Status:
    version: str
    uptime_s: float
    front_uptime_s: float
    front_pid: int
    front_restarts: int
    uart: UartStatus
    wifi: str
    ssid: str
    links: tuple[LinkStatus, ...]
    errors: tuple[dict[str, Any], ...]
    faults: FaultsStatus


class StatusService:
    """The front's control-socket operations; wired in ``bridged.uart.main``."""

    def __init__(self, front: Any, listener: socket.socket | None, kind: str) -> None:
        self.front = front
        self.kind = kind
        self.started = time.monotonic()
        self._ping = Ping(0)
        self._pinged_at = self.started
        self._sup_events: tuple[str, ...] = ()
        self._seq = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, dict[int, LinkStats], int]] = {}
        handlers = {"status": self.status, "transcript": self.transcript, "fault": self.fault}
        self.server = ControlServer(listener, handlers) if listener is not None else None
        front.links.on_stats = self._on_stats
        front.on_ping = self.on_ping

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    # -- the supervisor's heartbeat ------------------------------------------------------

    def on_ping(self, msg: Ping) -> str:
        """Take the supervisor's part; return the summary line for its Pong."""
        self._ping, self._pinged_at = msg, time.monotonic()
        if msg.events:
            self._sup_events = msg.events
        return self.summary()

    def summary(self) -> str:
        """One line: the port, the open links, the bytes over the serial line."""
        front = self.front
        n = sum(1 for slot in front.links.slots if slot.state.name == "OPEN")
        return (f"serving {front.port_name}, {n} link{'' if n == 1 else 's'} open, "
                f"{human_bytes(front.counters.rx_bytes)} up {human_bytes(front.output.written)} down")

    # -- status -------------------------------------------------------------------------------

    async def status(self, _request: dict[str, Any]) -> dict[str, Any]:
        stats = await self._gather()
        return {"status": dataclasses.asdict(self.snapshot(stats))}

    async def transcript(self, request: dict[str, Any]) -> dict[str, Any]:
        """Switch the AT transcript on or off ({"on": true|false}) where [log] sends it."""
        on = request.get("on")
        if not isinstance(on, bool):
            raise ValueError('"on" must be true or false')
        transcript = self.front.transcript
        if on and not transcript.enable():
            raise ValueError("the transcript cannot be written; the daemon's log says why")
        if not on:
            transcript.disable()
        return {"transcript": transcript.enabled}

    async def fault(self, request: dict[str, Any]) -> dict[str, Any]:
        """Fire a fault now ({"name": NAME, "params": {key: value}}): bridged.faults.front."""
        return self.front.faults.demand(request.get("name"), request.get("params", {}))

    async def _gather(self) -> dict[int, LinkStats]:
        seq = next(self._seq)
        asked = 0
        for slot in self.front.links.slots:
            if slot.control is None:
                continue
            try:
                send_message(slot.control, StatsRequest(seq))
                asked += 1
            except OSError:
                pass  # a full or dead socket: shown without counters (its reader sees the death)
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        got: dict[int, LinkStats] = {}
        if not asked:
            return got
        self._pending[seq] = (done, got, asked)
        try:
            async with asyncio.timeout(GATHER_TIMEOUT):
                await done
        except TimeoutError:
            log.info("status_worker_silent", answered=len(got), asked=asked)
        finally:
            del self._pending[seq]
        return got

    def _on_stats(self, slot: Any, msg: LinkStats) -> None:
        pending = self._pending.get(msg.seq)
        if pending is None:
            return  # too late
        done, got, asked = pending
        got[slot.link_id] = msg
        if len(got) >= asked and not done.done():
            done.set_result(None)

    def snapshot(self, stats: dict[int, LinkStats]) -> Status:
        front, ping = self.front, self._ping
        restarts = ping.restarts or (0,) * (1 + front.links.count)
        uptime = ping.uptime_ms / 1000 + (time.monotonic() - self._pinged_at)
        state = front.ctx.state
        links = tuple(self._link(slot, stats.get(slot.link_id), restarts) for slot in front.links.slots)
        return Status(__version__, round(uptime, 1), round(time.monotonic() - self.started, 1), os.getpid(),
                      restarts[0], self._uart(), _WIFI.get(state.wifi_state, str(state.wifi_state)),
                      state.wifi_ssid, links, self._errors(stats),
                      FaultsStatus(front.faults.seed, front.faults.counts(), front.faults.line.hooked()))

    def _link(self, slot: Any, stats: LinkStats | None, restarts: tuple[int, ...]) -> LinkStatus:
        view = slot.view if slot.state.name == "OPEN" else None
        pt = self.front.passthrough
        answered = stats is not None
        return LinkStatus(
            slot.link_id, slot.state.name.lower().replace("_", " "), slot.type if slot.conn_id else "",
            view.remote_ip if view else "", view.remote_port if view else 0, view.local_port if view else 0,
            "passive" if slot.passive else "active", pt is not None and pt.link_id == slot.link_id,
            stats.bytes_up if answered else None, stats.bytes_down if answered else None, slot.ipd,
            stats.errors if answered else None, stats.pid if answered else slot.pid,
            restarts[1 + slot.link_id] if 1 + slot.link_id < len(restarts) else 0)

    def _uart(self) -> UartStatus:
        front = self.front
        u = front.uart
        return UartStatus(front.port_name, self.kind, u.baud, u.data_bits, _STOP_BITS.get(u.stop_bits, "?"),
                          _PARITY.get(u.parity, "?"), _FLOW.get(u.flow, "?"), self._uart_source(),
                          front.counters.rx_bytes, front.output.written, front.counters.flow_pauses,
                          front.counters.direct_sends, front.counters.direct_fallbacks,
                          front.counters.max_command_batch,
                          _icount(front.fd))

    def _uart_source(self) -> str:
        from bridged.uart.restart import factory_uart  # not at import: the front imports us

        front = self.front
        if front.uart == factory_uart(front.config):
            return "config"
        stored = front.store.get("uart_def")
        if stored is not None and tuple(stored) == front.uart.fields():
            return "AT+UART_DEF"
        return "AT+UART_CUR"

    def _errors(self, stats: dict[int, LinkStats]) -> tuple[dict[str, Any], ...]:
        lines = [*self._sup_events, *events.recent()]
        for msg in stats.values():
            lines.extend(msg.events)
        parsed = []
        for line in lines:
            try:
                parsed.append(json.loads(line))
            except ValueError:
                continue
        parsed.sort(key=lambda e: str(e.get("time", "")))
        return tuple(parsed[-events.RING_SIZE:])


def _icount(fd: int) -> dict[str, int] | None:
    """The UART driver's counters (TIOCGICOUNT); None where there are none (a pty)."""
    buf = bytearray(_ICOUNT.size)
    try:
        fcntl.ioctl(fd, _TIOCGICOUNT, buf)
    except OSError:
        return None
    v = _ICOUNT.unpack(buf)
    return {"rx": v[4], "tx": v[5], "frame": v[6], "overrun": v[7], "parity": v[8], "brk": v[9],
            "buf_overrun": v[10]}


def human_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as systemd shows sizes)."""
    if n < 1000:
        return f"{n} B"
    size = float(n)
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000:
            break
    return f"{size:.1f} {unit}"
