"""The one seed of a daemon: drawn once in the supervisor, kept across a reload, logged."""

import dataclasses

import structlog

from bridged.config import default_config
from bridged.faults.seed import faults_seeded, log_seed
from bridged.faults.spec import parse_spec


def with_faults(seed=None):
    config = default_config()
    faults = dataclasses.replace(config.faults, seed=seed, at_busy=parse_spec("at_busy", {"rate": 0.1}))
    return dataclasses.replace(config, faults=faults)


def test_a_configured_seed_is_kept_and_logged():
    """seed = 42 stays 42, and the start-up log says so with the faults in force."""
    with structlog.testing.capture_logs() as logs:
        config = faults_seeded(with_faults(42))
        log_seed(config, drawn=False)
    assert config.faults.seed == 42
    assert {"event": "faults_seed", "seed": 42, "drawn": False, "faults": ["at_busy"],
            "log_level": "info"} in logs


def test_without_a_seed_one_is_drawn_and_logged_for_replay():
    """No seed: a 63-bit one is drawn, logged (drawn=true), and differs between runs."""
    with structlog.testing.capture_logs() as logs:
        a = faults_seeded(with_faults())
        log_seed(a, drawn=True)
    b = faults_seeded(with_faults())
    assert a.faults.seed is not None and 0 <= a.faults.seed < 2**63
    assert a.faults.seed != b.faults.seed
    assert [e["seed"] for e in logs if e["event"] == "faults_seed"] == [a.faults.seed]


def test_a_reload_keeps_the_drawn_seed():
    """A reload without a seed keeps the one drawn at start, so the run stays replayable."""
    first = faults_seeded(with_faults())
    assert faults_seeded(with_faults(), first).faults.seed == first.faults.seed


def test_no_faults_no_log_line():
    """Without faults the seed is still set (children need one) but nothing is logged."""
    with structlog.testing.capture_logs() as logs:
        config = faults_seeded(default_config())
        log_seed(config, drawn=True)
    assert config.faults.seed is not None
    assert logs == []
