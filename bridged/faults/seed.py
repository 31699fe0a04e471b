"""The seed every process of one daemon draws its faults from."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import structlog

__all__ = ["faults_seeded", "log_seed"]

log = structlog.get_logger()


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
