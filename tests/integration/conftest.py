"""Fixtures the integration tests share (the daemon's own are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.integration.fleetrun import FleetRun


@pytest.fixture
def fleet_of(tmp_path):
    """start(count, *options, config=...) -> a FleetRun; those still running at the end are stopped."""
    runs: list[FleetRun] = []

    def start(count: int, *extra: str, config: str = "") -> FleetRun:
        run = FleetRun(tmp_path, count, *extra, config=config)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.stop()
