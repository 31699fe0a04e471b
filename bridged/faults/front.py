"""The front's injected faults: AT commands, Wi-Fi, DNS and the UART line.

Theory of operation
-------------------
The front holds one `FaultPlan` (``where=FRONT``, scope "front") and this
object wires it to the session through a few hooks the front calls:

- `refuse(line)` before a command line is echoed: ``at_busy`` answers it
  ``busy p...`` (with ``ERR CODE:0x010b0000`` under AT+SYSLOG=1) and drops it,
  as ESP-AT does with input while a command runs.  Each command line draws
  every AT kind configured (each from its own stream) whatever the others
  drew, so one kind's sequence does not depend on another's; when several
  hit, busy wins over an error code, which wins over a delay;
- `dispatch(ctx, line)` instead of the registry's: ``at_errcode`` fails the
  command without running it (``ERR CODE:0x<code>`` then ERROR: the line is
  the point of the fault, so it is printed whatever AT+SYSLOG says);
  ``at_delay`` runs it and holds its final answer ms +- jitter_ms (uniform),
  the session staying busy meanwhile, as a slow command keeps it;
- the UART paths (`bridged.faults.uart`, hooked by `bridged.faults.line`),
  installed only while a UART kind is enabled, so a daemon without them
  keeps its byte paths as they are, and removed again once an on-demand
  fault is over: the output goes the plain way again, and AT+CIPSEND's
  payload is read straight into its ring (`bridged.uart.direct`);
- the DNS hook in `bridged.net.resolver`, for the lookups this process does;
- `join_code()` from `bridged.commands.wifi.join`: ``wifi_join_fail``, and
  "AP not found" while a ``wifi_drop`` lasts;
- a timer for the event kinds (``at_reset``, ``wifi_drop``).

Every injected fault is reported once (`_report`): counted (for ``bridged
status``, in the supervisor's `bridged.faults.tally`, so a new front goes on
counting where the last one stopped), marked in the AT transcript, and logged as ``fault_injected``.
Per-byte kinds may hit thousands of times a second: their log line comes at
most once a second per kind, with the number of hits since the last one (the
counts and the transcript keep every hit), so a noisy line cannot flood the
journal.  Faults the link workers injected arrive as ``FaultFired`` and are
counted and marked the same way (the worker logged them).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from dataclasses import dataclass
from typing import Any

import structlog

from bridged.at import format as fmt
from bridged.at.errors import AtError
from bridged.commands import registry
from bridged.commands.wifi_reconnect import lose_ap
from bridged.faults.catalog import CATALOG, Per, Where, kind
from bridged.faults.line import LineHooks
from bridged.faults.plan import FaultPlan, Hit
from bridged.faults.seed import schedule_start
from bridged.faults.spec import parse_demand
from bridged.faults.tally import Tally, inherited
from bridged.faults.uart import INCOMING, OUTGOING, ByteFaults
from bridged.ipc.messages import FaultFired, FireFault
from bridged.net import resolver
from bridged.uart.transcript import MarkKind

__all__ = ["FrontFaults", "InjectedError"]

log = structlog.get_logger()

_BUSY_CODE = 0x010B0000
_LOG_EVERY = 1.0  # seconds between two log lines of one per-byte kind
_SKIP_QUIET = 0.1  # seconds between two fault_skipped lines of one event kind
_KINDS = frozenset(k.name for k in CATALOG)
_AT_KINDS = ("at_busy", "at_errcode", "at_delay")  # drawn per command line


class InjectedError(AtError):
    """``at_errcode``: the command fails with the fault's ERR CODE line."""

    def __init__(self, code: int, syslog: bool) -> None:
        # Under AT+SYSLOG=1 the front prints the ERR CODE line itself (from .code).
        super().__init__(f"injected fault at_errcode 0x{code:08x}", body=b"" if syslog else fmt.err_code(code))
        self._code = code

    @property
    def code(self) -> int:
        return self._code


@dataclass(slots=True)
class _Quiet:
    """Log lines held back for a per-byte kind."""

    hits: int = 0
    last: float = -math.inf
    handle: asyncio.TimerHandle | None = None
    details: dict[str, Any] | None = None


class FrontFaults:
    """The front's plan and its hooks (see the module's docstring)."""

    def __init__(self, front: Any) -> None:
        self.front = front
        self.loop = asyncio.get_running_loop()
        faults = front.config.faults
        self.seed = faults.seed if faults.seed is not None else 0
        start, again = schedule_start(self.loop.time())
        self.plan = FaultPlan(faults.specs(), self.seed, where=Where.FRONT, scope="front", start=start,
                              resume_at=self.loop.time() if again else None, report=self._report)
        self.bytes = ByteFaults(self.plan, self.loop.time)
        self.line = LineHooks(self.bytes, front)  # the UART paths, hooked while a kind is on
        # Some AT kind is configured or armed: every command line draws (`refuse`), and the
        # quick send line (uart.direct) is off. Read by the front before each line; off again
        # once no AT kind is left (an on-demand one spent: `refuse`), on at the next demand.
        self.at_commands = any(self.plan.enabled(name) for name in _AT_KINDS)
        self.tally = inherited() or Tally()  # the front's and the workers' faults, since the daemon started
        self.ap_back_at = 0.0  # a wifi_drop's AP is gone until then
        self._jitter = random.Random(f"{self.seed}/at_delay/front/jitter")
        self._pending: tuple[Hit | None, Hit | None] = (None, None)  # this command's errcode, delay
        self._quiet: dict[str, _Quiet] = {}
        self._skips: dict[str, tuple[float, int]] = {}  # event kind: (last fault_skipped line, held back since)
        self._timer: asyncio.TimerHandle | None = None
        front.links.on_fault = self._on_worker_fault
        resolver.set_fault_hook(self._lookup)

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> None:
        """Install the UART hooks of configured kinds and arm the event timer."""
        self.line.install()
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for quiet in self._quiet.values():
            if quiet.handle is not None:
                quiet.handle.cancel()
        resolver.set_fault_hook(None)

    # -- AT commands ----------------------------------------------------------------------

    def refuse(self, line: Any) -> bool:
        """Draw this command's AT faults; True when at_busy took it (answered, dropped)."""
        plan = self.plan
        if not any(plan.enabled(name) for name in _AT_KINDS):
            self.at_commands = False  # spent: the lines go the usual way again (quick send line)
            return False
        now = self.loop.time()
        busy = plan.hit("at_busy", now)
        errcode = plan.hit("at_errcode", now)
        delay = plan.hit("at_delay", now)
        if busy is not None:
            plan.fired("at_busy", command="AT" + line.name)
            output = self.front.output
            if self.front.ctx.state.syslog:
                output.reply(fmt.err_code(_BUSY_CODE))
            output.reply(fmt.BUSY)
            return True
        self._pending = (errcode, delay)
        return False

    def dispatch(self, ctx: Any, line: Any) -> Any:
        """The registry's dispatch, failed or slowed as this command's draw said."""
        (errcode, delay), self._pending = self._pending, (None, None)
        if errcode is not None:
            code = int(errcode["code"])
            self.plan.fired("at_errcode", command="AT" + line.name, code=f"0x{code:08x}")
            raise InjectedError(code, ctx.state.syslog)
        if delay is None:
            return registry.dispatch(ctx, line)
        ms, jitter = float(delay["ms"]), float(delay["jitter_ms"])
        if jitter:
            ms = max(0.0, ms + self._jitter.uniform(-jitter, jitter))
        seconds = ms / 1000
        self.plan.fired("at_delay", command="AT" + line.name, ms=round(seconds * 1000, 3))
        try:
            result = registry.dispatch(ctx, line)
        except AtError as error:
            return _late(None, error, seconds)
        return _late(result, None, seconds)

    # -- Wi-Fi and DNS ----------------------------------------------------------------------

    def join_code(self) -> int | None:
        """A join's injected +CWJAP code: 3 while a dropped AP is gone, or wifi_join_fail's."""
        now = self.loop.time()
        if now < self.ap_back_at:
            return 3
        hit = self.plan.hit("wifi_join_fail", now)
        if hit is None:
            return None
        code = int(hit["code"])
        self.plan.fired("wifi_join_fail", code=code)
        return code

    async def _lookup(self, host: str, timeout: float) -> float:
        """resolver's hook: dns_fail, dns_slow; returns the timeout left."""
        plan = self.plan
        if not (plan.enabled("dns_fail") or plan.enabled("dns_slow")):
            return timeout
        now = self.loop.time()
        if plan.hit("dns_fail", now) is not None:
            plan.fired("dns_fail", host=host)
            raise resolver.ResolveError(f"cannot resolve {host}: injected fault dns_fail")
        slow = plan.hit("dns_slow", now)
        if slow is None:
            return timeout
        delay = float(slow["ms"]) / 1000
        plan.fired("dns_slow", host=host, ms=float(slow["ms"]))
        if delay >= timeout:
            await asyncio.sleep(timeout)
            raise resolver.ResolveError(f"no answer for {host} within {timeout:g} s (injected fault dns_slow)")
        await asyncio.sleep(delay)
        return timeout - delay

    # -- events: at_reset, wifi_drop ---------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.plan.next_deadline()
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        for name, params in self.plan.due(self.loop.time()):
            self._event(name, params)
        self._arm()

    def _event(self, name: str, params: Hit) -> bool:
        """Run an event kind now; False when it had nothing to act on (logged why)."""
        front = self.front
        if front.boot is not None:
            return self._skipped(name, "the chip is booting")
        if name == "at_reset":
            self.plan.fired("at_reset")
            front._restart(False)  # as AT+RST, without its OK (the session's Restart ends a command or a send)
            return True
        if name == "wifi_drop":
            ctx = front.ctx
            if not ctx.state.wifi_connected:
                return self._skipped(name, "the station is not connected")
            duration = float(params["duration_ms"])
            self.ap_back_at = self.loop.time() + duration / 1000
            self.plan.fired("wifi_drop", duration_ms=duration)
            return lose_ap(ctx, self._say, self._close_links)
        raise AssertionError(f"{name} is not an event kind")

    def _skipped(self, name: str, why: str) -> bool:
        """An event with nothing to act on: logged, but not more than once per _SKIP_QUIET
        per kind (``every = 0.001`` would log a thousand lines a second); `skipped` counts
        the ones since the last line."""
        now = self.loop.time()
        last, held = self._skips.get(name, (-math.inf, 0))
        if now - last < _SKIP_QUIET:
            self._skips[name] = (last, held + 1)
            return False
        self._skips[name] = (now, 0)
        log.info("fault_skipped", fault=name, why=why, skipped=held + 1)
        return False

    def _say(self, message: bytes) -> None:
        if self.front._status_shown():  # passthrough hides Wi-Fi lines unless AT+SYSMSG bit 2
            self.front.output.urc(message)

    def _close_links(self) -> None:
        """Every open link is closed; each reports CLOSED when its worker has closed it."""
        links = self.front.links
        for slot in links.slots:
            if slot.state.name == "OPEN":
                links.hang_up(slot.link_id)

    # -- on demand ------------------------------------------------------------------------

    def demand(self, name: object, params: object) -> dict[str, Any]:
        """``bridged fault NAME k=v``; ValueError names what is wrong."""
        if not isinstance(name, str):
            raise ValueError('"name" must be a fault name (bridged fault --list)')
        if not isinstance(params, dict):
            raise ValueError('"params" must be an object of key: value')
        try:
            fault = kind(name)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        d = parse_demand(name, params)  # FaultError (a ValueError) names the key
        if fault.where is Where.WORKER:
            return {"fault": name, "where": "worker", "links": self._fire_workers(d)}
        if fault.per is Per.SECOND:
            return {"fault": name, "where": "front", "fired": self._event(name, Hit(d.params))}
        self.plan.demand(d, self.loop.time())
        if name in _AT_KINDS:
            self.at_commands = True
        if name in OUTGOING or name in INCOMING:
            self.bytes.rearm(name)
            self.line.install()
        if fault.per is Per.CONDITION:
            return {"fault": name, "where": "front", "for_s": d.for_}
        return {"fault": name, "where": "front", "armed": d.count}

    def _fire_workers(self, d: Any) -> list[int]:
        link = int(dict(d.params).get("link", -1))
        # Whole ms, rounded up: a `for` under 1 ms would reach the worker as 0 s, which it refuses.
        msg = FireFault(d.name, tuple(f"{k}={v}" for k, v in d.params), d.count, max(1, math.ceil(d.for_ * 1000)))
        targets = range(self.front.links.count) if link == -1 else [link]
        told = [i for i in targets if i < self.front.links.count and self.front.links.tell(i, msg)]
        if not told:
            raise ValueError(f"no link worker is running to take {d.name}; try again in a moment")
        return told

    # -- reporting ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Injected faults per name, the front's and the workers' together, since the daemon
        started (every front's: `bridged.faults.tally`)."""
        return self.tally.counts()

    def _report(self, name: str, details: dict[str, Any]) -> None:
        tap = self.front.tap
        if tap is not None:
            tap.mark(MarkKind.FAULT, name=name, **details)
        count = self.tally.add(name)
        if kind(name).per is Per.BYTE:
            self._log_quietly(name, details, count)
        else:
            log.info("fault_injected", fault=name, count=count, **details)

    def _log_quietly(self, name: str, details: dict[str, Any], count: int) -> None:
        quiet = self._quiet.setdefault(name, _Quiet())
        quiet.hits += 1
        quiet.details = details
        if self.loop.time() - quiet.last >= _LOG_EVERY:
            self._flush(name)
        elif quiet.handle is None:
            quiet.handle = self.loop.call_at(quiet.last + _LOG_EVERY, self._flush, name)

    def _flush(self, name: str) -> None:
        quiet = self._quiet[name]
        if quiet.handle is not None:
            quiet.handle.cancel()
            quiet.handle = None
        if quiet.hits:
            log.info("fault_injected", fault=name, count=self.tally.get(name), hits=quiet.hits,
                     **(quiet.details or {}))
        quiet.hits, quiet.last = 0, self.loop.time()

    def _on_worker_fault(self, slot: Any, msg: FaultFired) -> None:
        hits = max(1, msg.hits)
        if msg.name in _KINDS:  # (a name of another version is marked, not counted)
            self.tally.add(msg.name, hits)
        tap = self.front.tap
        if tap is not None:
            try:
                details = json.loads(msg.details)
            except ValueError:
                details = {}
            extra = {k: v for k, v in details.items() if k not in ("name", "link")} if isinstance(details, dict) else {}
            if hits > 1:
                extra["hits"] = hits
            tap.mark(MarkKind.FAULT, name=msg.name, link=slot.link_id, **extra)


async def _late(result: Any, error: AtError | None, seconds: float) -> Any:
    """at_delay: the command's answer (or its error) after ``seconds`` more."""
    if registry.is_async(result):
        result = await result
    await asyncio.sleep(seconds)
    if error is not None:
        raise error
    return result
