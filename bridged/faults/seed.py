"""The seed every process of one daemon draws its faults from."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import structlog

__all__ = ["faults_seeded"]

log = structlog.get_logger()


def faults_seeded(config: Any, before: Any = None) -> Any:
    """`config` with ``[faults] seed`` set, logged when faults are configured.

    Without a configured seed one is drawn here, in the supervisor, before any
    child is forked, so the front and every worker share it; a reload keeps
    the seed drawn before (the same run stays replayable).  The log line is
    what makes a run with a drawn seed reproducible: put that seed in the
    profile to replay it.
    """
    seed = config.faults.seed
    drawn = seed is None
    if drawn:
        seed = before.faults.seed if before is not None else secrets.randbits(63)
        config = dataclasses.replace(config, faults=dataclasses.replace(config.faults, seed=seed))
    specs = config.faults.specs()
    if specs:
        log.info("faults_seed", seed=seed, drawn=drawn, faults=[s.name for s in specs])
    return config
