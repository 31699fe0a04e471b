"""A fault as configured (`FaultSpec`) or fired on demand (`Demand`), checked.

A ``[faults]`` entry is a table::

    [faults.at_busy]
    rate = 0.05                  # the share of commands hit (0..1)

    [faults.wifi_drop]
    at = 30                      # first window: 30 s after start ...
    every = 120                  # ... then every 120 s
    duration_ms = 5000           # a kind's own key (bridged.faults.catalog)

    [faults.net_latency]
    ms = 80
    jitter_ms = 40               # a condition: in force while active (here: always)

Schedule keys, in seconds from the process's start: ``at`` (the first window
opens; default 0), ``for`` (how long a window stays open; default: until the
next one, or for ever), ``every`` (windows repeat with this period; at least
``for``, and 0.01 s for an event kind).  ``rate`` is a probability per
occasion (per second for event kinds).  An occasion kind needs a rate or a schedule (a schedule alone hits
every occasion in its windows); an event kind needs one of them too; a
condition needs neither.

Every check raises `FaultError` (a ValueError) naming the key inside the
fault's table and what is allowed; `bridged.config` adds the file and the
fault's name (``faults.at_busy.rate``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bridged.faults.catalog import FaultKind, Per, kind

__all__ = ["Demand", "FaultError", "FaultSpec", "parse_demand", "parse_spec", "SCHEDULE_KEYS"]

SCHEDULE_KEYS = ("rate", "at", "for", "every")
_LONGEST = 365 * 86400.0  # a year, in seconds: anything longer is a typo
# An event kind's shortest period: each event is a timer in the front (a period of
# a microsecond kept it busy, one of 1e-320 s overflowed its arithmetic).
EVENT_EVERY_MIN = 0.01
ALLOWED = "a table of rate (0..1), at, for, every (seconds) and the fault's own keys"


class FaultError(ValueError):
    """A fault's table or one of its keys is not allowed.

    `key` is the key inside the fault's table ("" for the table itself),
    `problem` what is wrong, `allowed` what would be."""

    def __init__(self, key: str, problem: str, allowed: str) -> None:
        super().__init__(f"{key + ': ' if key else ''}{problem}; allowed: {allowed}")
        self.key, self.problem, self.allowed = key, problem, allowed


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One configured fault.  `params` holds every key of the kind, defaults filled in."""

    name: str
    rate: float | None = None
    at: float = 0.0
    for_: float | None = None
    every: float | None = None
    params: tuple[tuple[str, int | float], ...] = ()

    @property
    def kind(self) -> FaultKind:
        return kind(self.name)

    def param(self, name: str) -> int | float:
        return dict(self.params)[name]

    def as_table(self) -> dict[str, int | float]:
        """The TOML table that gives this spec back (`bridged check`)."""
        table: dict[str, int | float] = {}
        if self.rate is not None:
            table["rate"] = self.rate
        if self.at:
            table["at"] = self.at
        if self.for_ is not None:
            table["for"] = self.for_
        if self.every is not None:
            table["every"] = self.every
        table.update(self.params)
        return table


@dataclass(frozen=True, slots=True)
class Demand:
    """A fault fired now (``bridged fault NAME k=v``): an event happens now, an
    occasion kind hits the next `count` occasions, a condition holds for `for_` s."""

    name: str
    params: tuple[tuple[str, int | float], ...]
    count: int = 1
    for_: float = 10.0

    def param(self, name: str) -> int | float:
        return dict(self.params)[name]


def _seconds(key: str, value: object, *, positive: bool) -> float:
    allowed = f"{'more than 0' if positive else '0'} to {int(_LONGEST)} seconds"
    # Compared, never converted to float: a huge whole number (TOML and JSON set
    # no bound) is too long, not an OverflowError.
    if (isinstance(value, bool) or not isinstance(value, int | float) or value != value
            or value < 0 or (positive and value == 0) or value > _LONGEST):
        raise FaultError(key, f"{value!r} is not allowed", allowed)
    return float(value)


def _params(fault: FaultKind, table: Mapping[str, object], skip: tuple[str, ...]) -> tuple[tuple[str, int | float], ...]:
    known = {p.name for p in fault.params}
    for key in table:
        if key not in known and key not in skip:
            raise FaultError(str(key), "unknown key", ", ".join([*skip, *(p.name for p in fault.params)]))
    out = []
    for p in fault.params:
        try:
            out.append((p.name, p.check(table[p.name]) if p.name in table else p.kind(p.default)))
        except ValueError:
            raise FaultError(p.name, f"{table[p.name]!r} is not allowed",
                             f"{'a whole number' if p.kind is int else 'a number'} from {p.allowed()}") from None
    return tuple(out)


def parse_spec(name: str, table: object) -> FaultSpec:
    """Check one ``[faults.NAME]`` table."""
    fault = kind(name)  # KeyError for an unknown name: bridged.config reports the section's keys
    if not isinstance(table, Mapping):
        raise FaultError("", f"{table!r} is not a table", ALLOWED + ", e.g. { rate = 0.1 }")
    rate = table.get("rate")
    if rate is not None:
        if fault.per is Per.CONDITION:
            raise FaultError("rate", "a condition takes no rate (it applies while its schedule is active)",
                             "at, for, every and the fault's own keys")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise FaultError("rate", f"{rate!r} is not allowed", "a number from 0 to 1")
        rate = float(rate)
    at = _seconds("at", table["at"], positive=False) if "at" in table else 0.0
    for_ = _seconds("for", table["for"], positive=True) if "for" in table else None
    every = _seconds("every", table["every"], positive=True) if "every" in table else None
    if every is not None and fault.per is Per.SECOND and every < EVENT_EVERY_MIN:
        raise FaultError("every", f"{every:g} is shorter than an event kind's shortest period",
                         f"{EVENT_EVERY_MIN:g} to {int(_LONGEST)} seconds")
    if every is not None and for_ is not None and for_ > every:
        raise FaultError("for", f"{for_:g} is longer than every = {every:g}", "at most every")
    scheduled = "at" in table or for_ is not None or every is not None
    if fault.per is not Per.CONDITION and rate is None and not scheduled:
        raise FaultError("", "neither a rate nor a schedule", "a rate (0..1) or a schedule (at, for, every)")
    return FaultSpec(name, rate, at, for_, every, _params(fault, table, SCHEDULE_KEYS))


def _number(key: str, text: object) -> object:
    if not isinstance(text, str):
        return text
    try:
        return int(text, 0)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise FaultError(key, f"{text!r} is not a number", "a number") from None


def parse_demand(name: str, given: Mapping[str, object]) -> Demand:
    """Check a fault fired on demand; values may be strings (``k=v`` on the command line)."""
    fault = kind(name)
    values = {key: _number(key, value) for key, value in given.items()}
    count = values.pop("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1_000_000:
        raise FaultError("count", f"{count!r} is not allowed", "a whole number from 1 to 1000000")
    for_ = _seconds("for", values.pop("for"), positive=True) if "for" in values else 10.0
    extra = ("count", "for")
    return Demand(name, _params(fault, values, extra), count, for_)
