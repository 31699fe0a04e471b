"""Run a test's independent runs at the same time instead of one after another.

A test that compares runs -- the same fault seed twice and another seed once --
waits out each run's timers (fault delays, event rates) in turn, though the
runs share nothing: each has its own daemon, pty and log, and what is compared
(times between a daemon's own log stamps, each round trip's own clock) is
measured inside one run.  ``together`` overlaps those waits.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

__all__ = ["one_at_a_time", "together"]

T = TypeVar("T")

# The longest a run may take; each run's own waits have their own, shorter, timeouts.
RUN_TIMEOUT = 50.0


def together(*runs: Callable[[], T]) -> list[T]:
    """Each of ``runs`` in a thread of its own, all at once; their results in order.

    The first run that raised (in order) raises here, after every run has ended,
    so that no run is left behind using a daemon the test's teardown stops."""
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = [pool.submit(run) for run in runs]
        for future in futures:
            future.exception(timeout=RUN_TIMEOUT)
        return [future.result() for future in futures]


def one_at_a_time(make: Callable[..., T]) -> Callable[..., T]:
    """``make`` (e.g. conftest's make_daemon, which names each daemon's directory by
    how many it started) called by one thread at a time."""
    lock = threading.Lock()

    def locked(*args, **kwargs) -> T:
        with lock:
            return make(*args, **kwargs)

    return locked
