"""The longest test files first, so that the xdist workers finish together.

``make test`` hands whole files to its workers (``--dist loadfile``), the next
file to whichever worker is free.  xdist's own order (``--loadscope-reorder``:
the files with the most tests first) left the files of few long tests -- the
mDNS namespaces, the Locust and pytest runs, the fleets -- for the end, where
one worker ran them while the other had nothing left.  Here the files go in
the order of their test time (setup, call and teardown of the tests collected
now), each test's time as the last run measured it (pytest's cache, key
``bridged/test_seconds``), or, for a test not measured yet (a fresh clone), an
estimate by where it lives: a test starting daemons and processes under
tests/integration or tests/testing about a second, any other a few
milliseconds.  Within a file the tests keep their order.

The order changes only which worker runs a file, and when: no test depends
on it (each file gets its fixtures and daemons of its own, as before).
"""

from __future__ import annotations

import pytest

_KEY = "bridged/test_seconds"
_SLOW_DIRS = ("tests/integration/", "tests/testing/")
_GUESS_SLOW, _GUESS_FAST = 1.0, 0.003
_KNOWN = pytest.StashKey[dict]()


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _guess(nodeid: str) -> float:
    return _GUESS_SLOW if nodeid.startswith(_SLOW_DIRS) else _GUESS_FAST


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # xdist's controller: keep the order made here
        config.option.loadscopereorder = False
    cache = getattr(config, "cache", None)
    worker = getattr(config, "workerinput", None)
    if worker is not None:
        # The controller's copy: every worker must collect in the same order
        # (xdist aborts otherwise), even if another run rewrites the cache meanwhile.
        config.stash[_KNOWN] = worker.get(_KEY, {})
    else:
        config.stash[_KNOWN] = cache.get(_KEY, {}) if cache is not None else {}
        if cache is not None:  # the process that sees every report
            config.pluginmanager.register(_Recorder(cache), "bridged-test-seconds")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist's controller hands each worker the measurements it read."""
    node.workerinput[_KEY] = node.config.stash[_KNOWN]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    known = config.stash.get(_KNOWN, {})
    seconds: dict[str, float] = {}
    for item in items:
        spent = known.get(item.nodeid)
        guess = spent if isinstance(spent, (int, float)) else _guess(item.nodeid)
        seconds[_file(item.nodeid)] = seconds.get(_file(item.nodeid), 0.0) + guess
    # sorted() is stable: a file's tests stay together and in their order.
    items[:] = sorted(items, key=lambda item: -seconds[_file(item.nodeid)])


class _Recorder:
    """Each test's setup + call + teardown of this run, merged into the cache at its end
    (a run of some tests only updates theirs)."""

    def __init__(self, cache: pytest.Cache) -> None:
        self.cache = cache
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self) -> None:
        if self.seconds:
            known = self.cache.get(_KEY, {})
            known.update({nodeid: round(spent, 3) for nodeid, spent in self.seconds.items()})
            self.cache.set(_KEY, known)
