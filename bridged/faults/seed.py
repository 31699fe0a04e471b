"""The seed every process of one daemon draws its faults from, and the
instant its fault schedules count from.

Schedules (``at``, ``for``, ``every``) are seconds from the moment the
supervisor started the children with the configuration in force (at start,
and at a reload that restarted them), not from a child's own start: a worker
or a front forked again after a crash keeps the daemon's windows instead of
opening its ``at = 0`` window once more.  The supervisor marks that moment
before it forks (`mark_epoch`); a child inherits it and maps it onto its own
loop's clock (`schedule_start`), and learns whether it is one of the
children first started with it or one forked again: the latter does not
repeat the event kinds' windows that opened before it (`FaultPlan`'s
``resume_at``).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Any

import structlog

__all__ = ["children_started", "faults_seeded", "log_seed", "mark_epoch", "schedule_start"]

log = structlog.get_logger()

_epoch: float | None = None  # time.monotonic() when the supervisor started the children
_first = True  # forked by the supervisor as one of the children first started since _epoch


def mark_epoch() -> None:
    """The supervisor starts the children with a configuration now."""
    global _epoch, _first
    _epoch, _first = time.monotonic(), True


def children_started() -> None:
    """The supervisor forked the first children: any forked from now on is one started again."""
    global _first
    _first = False


def schedule_start(loop_now: float) -> tuple[float, bool]:
    """When this daemon's fault schedules began, on the clock `loop_now` reads
    (a process not forked by a supervisor, such as a test's: now), and
    whether this process was forked again after its predecessor ended."""
    if _epoch is None:
        return loop_now, False
    return loop_now - max(0.0, time.monotonic() - _epoch), not _first


def faults_seeded(config: Any, before: Any = None) -> Any:
    """`config` with ``[faults] seed`` set.

    Without a configured seed one is drawn here, in the supervisor, before any
    child is forked, so the front and every worker share it; a reload keeps
    the seed in force (`before`'s), so a reload that changes nothing else
    changes nothing, and the run stays replayable.
    """
    if config.faults.seed is not None:
        return config
    seed = before.faults.seed if before is not None else secrets.randbits(63)
    return dataclasses.replace(config, faults=dataclasses.replace(config.faults, seed=seed))


def log_seed(config: Any, drawn: bool) -> None:
    """Say the seed when faults are configured: what makes a run with a drawn
    seed reproducible (put that seed in the profile to replay it)."""
    specs = config.faults.specs()
    if specs:
        log.info("faults_seed", seed=config.faults.seed, drawn=drawn, faults=[s.name for s in specs])
