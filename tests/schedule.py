"""The longest test files first, so that the xdist workers finish together.

``make test`` hands whole files to its workers (``--dist loadfile``), the next
file to whichever worker is free.  xdist's own order (``--loadscope-reorder``:
the files with the most tests first) left the files of few long tests -- the
mDNS namespaces, the Locust and pytest runs, the fleets -- for the end, where
one worker ran them while the other had nothing left.  Here the files go in
the order of their test time (setup, call and teardown of the tests collected
now), each test's time as the last run measured it (pytest's cache, key
``bridged/test_seconds``).  A file none of whose tests was measured yet (a
fresh clone, as CI's first run) takes its time from tests/file_seconds.json,
each file's time in a whole run, kept in git (``python -m tests.schedule``
writes it from the cache after a run); a file not there either, an estimate by
where it lives: a test starting daemons and processes under tests/integration
or tests/testing about a second, any other a few milliseconds.  (By those
estimates alone the in-process files that take half a minute -- read
batching's hostile peers, the SNTP client's runs -- came last, one worker
running them while the others had nothing left.)  Within a file the tests
keep their order.

The order changes only which worker runs a file, and when: no test depends
on it (each file gets its fixtures and daemons of its own, as before).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

_KEY = "bridged/test_seconds"
_SLOW_DIRS = ("tests/integration/", "tests/testing/")
_GUESS_SLOW, _GUESS_FAST = 1.0, 0.003
_KNOWN = pytest.StashKey[dict]()
_TABLE = pytest.StashKey[dict]()
TABLE_NAME = "tests/file_seconds.json"


def _read_table(root: Path) -> dict[str, float]:
    """tests/file_seconds.json under ``root``: {file: seconds}; {} if missing or unreadable."""
    try:
        table = json.loads((root / TABLE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(table, dict):
        return {}
    return {f: s for f, s in table.items() if isinstance(f, str) and isinstance(s, (int, float))}


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _guess(nodeid: str) -> float:
    return _GUESS_SLOW if nodeid.startswith(_SLOW_DIRS) else _GUESS_FAST


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # xdist's controller: keep the order made here
        config.option.loadscopereorder = False
    config.stash[_TABLE] = _read_table(config.rootpath)
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
    table = config.stash.get(_TABLE, {})
    tests: dict[str, list[str]] = {}
    for item in items:
        tests.setdefault(_file(item.nodeid), []).append(item.nodeid)
    seconds: dict[str, float] = {}
    for file, nodeids in tests.items():
        spent = [known.get(nodeid) for nodeid in nodeids]
        if file in table and not any(isinstance(s, (int, float)) for s in spent):
            seconds[file] = table[file]
        else:
            seconds[file] = sum(s if isinstance(s, (int, float)) else _guess(n) for s, n in zip(spent, nodeids))
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


def write_table(root: Path, cache: Path | None = None) -> int:
    """tests/file_seconds.json from the measurements in ``root``'s pytest cache (or the cache
    directory ``cache``), each file's tests summed, to a tenth of a second; how many files."""
    known = json.loads(((cache or root / ".pytest_cache") / "v" / "bridged" / "test_seconds").read_text())
    table: dict[str, float] = {}
    for nodeid, spent in known.items():
        if isinstance(spent, (int, float)) and (root / _file(nodeid)).exists():
            table[_file(nodeid)] = table.get(_file(nodeid), 0.0) + spent
    ordered = {f: round(s, 1) for f, s in sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))}
    (root / TABLE_NAME).write_text(json.dumps(ordered, indent=0) + "\n")
    return len(ordered)


if __name__ == "__main__":
    # python -m tests.schedule [ROOT [CACHE_DIR]]
    args = [Path(a) for a in sys.argv[1:3]]
    print(f"{write_table(args[0] if args else Path.cwd(), *args[1:])} files")
