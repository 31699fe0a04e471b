"""Each test's CPU time, with its daemons', when ``BRIDGED_TEST_CPU`` names a file.

The suite is CPU-bound on two cores, so what a test costs the run is the CPU
it and its processes spend, not its wall time (which is mostly waits).  Per
test (setup, call and teardown): this pytest process's own CPU, its reaped
children's (subprocesses, ``ip netns exec`` daemons), and the fork server's
with its reaped daemons (tests/forkserver.py; /proc/PID/stat counts a
process's waited-for children).  A daemon still running at a test's end (a
module's shared daemon) counts for the test in which it is reaped.  One JSON
line per test is appended to the file: ``{"test": nodeid, "cpu": seconds, "pytest": seconds,
"daemons": count}``: all of it, the pytest process's own share, and how many daemons the
harness started (``Daemon.start``).
"""

from __future__ import annotations

import json
import os
import resource

import pytest

_TICK = os.sysconf("SC_CLK_TCK")


def _forkserver_cpu() -> float:
    from tests import forkserver

    client = forkserver._client
    if client is None or not client.alive():
        return 0.0
    try:
        with open(f"/proc/{client.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(field) for field in fields[11:15]) / _TICK  # utime stime cutime cstime


def _cpu() -> tuple[float, float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, _forkserver_cpu(), \
        own.ru_utime + own.ru_stime


_starts = [0]


def pytest_configure(config) -> None:
    if os.environ.get("BRIDGED_TEST_CPU"):
        from tests.harness import Daemon

        start = Daemon.start

        def counted(self):
            _starts[0] += 1
            return start(self)

        Daemon.start = counted


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = os.environ.get("BRIDGED_TEST_CPU")
    if not path:
        yield
        return
    starts = _starts[0]
    pid_before = id(__import__("tests.forkserver", fromlist=["_client"])._client)
    before = _cpu()
    yield
    after = _cpu()
    server = after[1] - before[1]
    if id(__import__("tests.forkserver", fromlist=["_client"])._client) != pid_before:
        server = after[1]  # a new fork server started within the test
    with open(path, "a") as out:
        out.write(json.dumps({"test": item.nodeid, "cpu": round(after[0] - before[0] + max(server, 0.0), 3),
                              "pytest": round(after[2] - before[2], 3), "daemons": _starts[0] - starts}) + "\n")
