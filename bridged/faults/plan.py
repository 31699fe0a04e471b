"""The faults one process injects: seeded draws, schedules, faults on demand.

Theory of operation
-------------------
Each process that injects faults (the front, each link worker) holds one
`FaultPlan` built from the configured specs of its kinds (`Where`).  The code
that owns an occasion asks the plan and acts on the answer::

    if plan.hit("at_busy", now):           # an occasion kind
        plan.fired("at_busy", command=name)  # logged, counted, marked
        ...

Sans-I/O: `now` is passed in (monotonic seconds) and nothing here sleeps.

Reproducible: every (fault, scope) pair draws from a stream of its own,
``random.Random(f"{seed}/{name}/{scope}")`` (string seeds are hashed with
SHA-512, so the streams do not depend on PYTHONHASHSEED or on the process),
and a stream moves only when its fault is drawn.  The same seed and the same
sequence of occasions give the same faults, whatever else is configured;
schedules are times from `start`, when the daemon started the process's
configuration (`bridged.faults.seed`).  A process forked again after a crash
passes ``resume_at`` (now): an event kind's windows that opened before it
are not opened again.

Cheap when off: `enabled(name)` is a set lookup; hot paths ask it once and
skip the plan entirely for kinds that are neither configured nor armed.
Per-byte kinds draw the gap to the next hit (`gap`) instead of a draw per
byte.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from bridged.faults.catalog import Per, Where, kind
from bridged.faults.spec import Demand, FaultSpec

__all__ = ["FaultPlan", "Hit", "Report"]

#: Called for every injected fault: (name, details).
Report = Callable[[str, dict[str, Any]], None]


class Hit(dict[str, int | float]):
    """A fault's parameters, handed out when it hits: true even when empty
    (``if plan.hit(...)`` must not miss a fault that takes no keys)."""

    def __bool__(self) -> bool:
        return True


@dataclass(slots=True)
class _Armed:
    params: Hit
    count: int = 0  # occasions left to hit
    until: float = 0.0  # a condition: in force until then


class FaultPlan:
    """The faults of one process (`where`, `scope` such as "front" or "link2")."""

    def __init__(self, specs: Iterable[FaultSpec], seed: int, *, where: Where, scope: str,
                 start: float, link: int | None = None, report: Report | None = None,
                 resume_at: float | None = None) -> None:
        self.seed = seed
        self.scope = scope
        self.start = start
        self.link = link
        self.report = report
        self.specs = {s.name: s for s in specs if s.kind.where is where and self._for_me(s.params)}
        self.counts: dict[str, int] = {}
        self._rngs: dict[str, random.Random] = {}
        self._armed: dict[str, _Armed] = {}
        self._next_event: dict[str, float] = {}
        self._on = set(self.specs)
        for spec in self.specs.values():
            if spec.kind.per is Per.SECOND:
                self._next_event[spec.name] = self._first_event(spec, resume_at)

    # -- asking ---------------------------------------------------------------------------

    def enabled(self, name: str) -> bool:
        """Configured here, or armed on demand: worth asking `hit`/`condition` about."""
        return name in self._on

    def hit(self, name: str, now: float, *, rate_drawn: bool = False) -> Hit | None:
        """Draw one occasion of `name`: its parameters when hit, else None.

        `rate_drawn`: the occasion that ends a `gap` (the rate is in the gap).
        """
        if name not in self._on:
            return None
        armed = self._armed.get(name)
        if armed is not None and armed.count > 0:
            armed.count -= 1
            if armed.count == 0:
                self._disarm(name)
            return armed.params
        spec = self.specs.get(name)
        if spec is None or not self._active(spec, now):
            return None
        if spec.rate is not None and not rate_drawn and self._rng(name).random() >= spec.rate:
            return None
        return Hit(spec.params)

    def gap(self, name: str) -> int:
        """For a per-byte kind: how many bytes pass before the next hit (at least 1).

        Geometric with the configured rate, drawn from the fault's stream; a
        very large number when the rate is 0 or none is configured (armed
        faults hit at the next byte).  When the gap runs out, ask
        ``hit(name, now, rate_drawn=True)``: it checks the schedule and any
        armed fault without drawing again.
        """
        armed = self._armed.get(name)
        if armed is not None and armed.count > 0:
            return 1
        spec = self.specs.get(name)
        rate = 1.0 if spec is not None and spec.rate is None else (spec.rate if spec else 0.0)
        if not rate:
            return 1 << 62
        if rate >= 1.0:
            return 1
        u = self._rng(name).random()
        return 1 + int(math.log1p(-u) / math.log1p(-rate))

    def condition(self, name: str, now: float) -> Hit | None:
        """A condition kind's parameters while it is in force, else None."""
        if name not in self._on:
            return None
        armed = self._armed.get(name)
        if armed is not None and armed.until:
            if now < armed.until:
                return armed.params
            self._disarm(name)
        spec = self.specs.get(name)
        if spec is not None and self._active(spec, now):
            return Hit(spec.params)
        return None

    def due(self, now: float) -> list[tuple[str, Hit]]:
        """The event kinds whose time has come (each at most once per call)."""
        out = []
        for name, when in self._next_event.items():
            if when <= now:
                spec = self.specs[name]
                self._next_event[name] = self._following_event(spec, when, now)
                if self._active(spec, when):
                    out.append((name, Hit(spec.params)))
        return out

    def next_deadline(self) -> float | None:
        """When `due` next has something (monotonic seconds), None for never."""
        finite = [t for t in self._next_event.values() if t != math.inf]
        return min(finite) if finite else None

    # -- on demand ------------------------------------------------------------------------

    def demand(self, d: Demand, now: float) -> bool:
        """Arm a fault fired on demand.  False for an event kind: the caller runs it now."""
        per = kind(d.name).per
        if per is Per.SECOND:
            return False
        params = Hit(d.params)
        if per is Per.CONDITION:
            self._armed[d.name] = _Armed(params, until=now + d.for_)
        else:
            self._armed[d.name] = _Armed(params, count=d.count)
        self._on.add(d.name)
        return True

    def wants(self, params: Iterable[tuple[str, int | float]]) -> bool:
        """A fault's `link` key names this process's link (or every link)."""
        return self._for_me(tuple(params))

    # -- reporting ------------------------------------------------------------------------

    def fired(self, name: str, **details: Any) -> None:
        """An injected fault: counted here and reported (log, status, transcript)."""
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.report is not None:
            self.report(name, details)

    # -- inside ---------------------------------------------------------------------------

    def _for_me(self, params: tuple[tuple[str, int | float], ...]) -> bool:
        link = dict(params).get("link", -1)
        return link == -1 or self.link is None or link == self.link

    def _disarm(self, name: str) -> None:
        del self._armed[name]
        if name not in self.specs:
            self._on.discard(name)

    def _rng(self, name: str) -> random.Random:
        rng = self._rngs.get(name)
        if rng is None:
            rng = self._rngs[name] = random.Random(f"{self.seed}/{name}/{self.scope}")
        return rng

    def _active(self, spec: FaultSpec, now: float) -> bool:
        t = now - self.start - spec.at
        if t < 0:
            return False
        if spec.every is not None:
            t %= spec.every
        return spec.for_ is None or t < spec.for_

    def _first_event(self, spec: FaultSpec, resume_at: float | None) -> float:
        first = self.start + spec.at
        if resume_at is not None and first < resume_at:  # that one happened before a crash
            if spec.rate is not None:
                return self._arrival(spec, resume_at)
            return self._following_event(spec, first, resume_at)
        if spec.rate is None:
            return first  # at each window's start
        return self._arrival(spec, first)

    def _following_event(self, spec: FaultSpec, when: float, now: float) -> float:
        if spec.rate is not None:
            return self._arrival(spec, max(when, now))
        if spec.every is None:
            return math.inf
        base = self.start + spec.at
        periods = math.floor((now - base) / spec.every) + 1
        return base + periods * spec.every

    def _arrival(self, spec: FaultSpec, after: float) -> float:
        if not spec.rate:
            return math.inf
        return after + self._rng(spec.name).expovariate(spec.rate)
