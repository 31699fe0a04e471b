"""Fixtures the tests/uart tests share."""

from __future__ import annotations

import os
import tty

import pytest
import structlog


@pytest.fixture
def plain_structlog():
    """structlog's defaults: no level filter left by another test's setup_logging hides info events."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def pty_pair():
    """A raw pty, (master, slave), the master non-blocking; both closed afterwards."""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    yield master, slave
    os.close(master)
    os.close(slave)
