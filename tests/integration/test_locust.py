"""bridged.locust: Locust users that are emulated devices, each with its own bridged.

Locust monkey-patches the process with gevent when imported, so it never runs
inside the pytest process: each test runs it in a subprocess (the shipped
example through the ``locust`` command, failure reporting through Locust's
library API) against servers on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import psutil
import pytest

from tests.harness import _Server

REPO = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).parent / "locust"
# No association wait: the esp32 profile's 3-s join would take a third of the 9-s run.
CONFIG = '[wifi]\nstation_interface = "lo"\nconnect_delay_ms = 0\n'


@pytest.fixture
def tmp_dir():
    """A directory with a short path, for the devices' temporary directories: under
    pytest's (and xdist's) own, a device's control socket path passed 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="bl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class LineServer(_Server):
    """Keeps what each connection sent, in accept order."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        self.lock = threading.Lock()
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            buf = bytearray()
            self.received.append(buf)
        try:
            while data := conn.recv(65536):
                buf += data
        except OSError:
            return


def _leftovers(tmp: Path) -> list[str]:
    """Processes whose command line names a path under ``tmp``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(tmp) in cmdline:
            found.append(cmdline)
    return found


def _run(argv: list[str], tmp: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(REPO))  # the devices' temp dirs land in tmp
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_example_locustfile_headless(tmp_dir):
    """The shipped locustfile, run headless with 3 users for 9 s: every device joins,
    connects and sends contiguous telemetry lines that reach the server, with no failure.

    (9 s, not 6: the run's clock starts before the three devices do, and each needs two lines
    at 0.5 s apart; on a loaded 2-core machine three bridged processes starting at once can
    take seconds -- as slow starts once failed this run -- and 6 s left a device too few.)"""
    config = tmp_dir / "bridged.toml"
    config.write_text(CONFIG)
    server = LineServer()
    try:
        result = _run([str(LOCUST), "-f", "examples/locustfile.py", "--headless", "-u", "3", "-r", "3",
                       "-t", "9s", "--stop-timeout", "5", "--host", f"127.0.0.1:{server.port}",
                       "--bridged-config", str(config), "--telemetry-interval", "0.5",
                       "--json-file", str(tmp_dir / "stats"), "--skip-log"], tmp_dir, 50)
    finally:
        server.close()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    stats = {(e["method"], e["name"]): e for e in json.loads((tmp_dir / "stats.json").read_text())}
    counts = {key: (e["num_requests"], e["num_failures"]) for key, e in stats.items()}
    for key in (("device", "start"), ("AT", "ATE0"), ("AT", "join"), ("AT", "connect")):
        assert counts[key] == (3, 0), counts
    sent, failed = counts[("AT", "telemetry")]
    assert failed == 0 and sent >= 3 * 2, counts
    assert len(server.received) == 3
    lines = [[json.loads(line) for line in bytes(buf).splitlines()] for buf in server.received]
    assert all(len(device) >= 2 for device in lines), [len(d) for d in lines]
    for device in lines:  # one device per connection, every message in order
        assert [m["seq"] for m in device] == list(range(1, len(device) + 1))
        assert len({m["device"] for m in device}) == 1
    assert sum(map(len, lines)) == sent  # each SEND OK reached the server
    assert stats[("AT", "telemetry")]["max_response_time"] < 1000
    assert not list(tmp_dir.glob("bridged-locust-*")), "a device's temporary directory stayed"
    assert not _leftovers(tmp_dir)


DRIVER = textwrap.dedent("""
    import json, sys, time
    from locust.env import Environment  # first: gevent's monkey patching
    import gevent
    from locust import constant, task
    from locust.exception import StopUser
    from bridged.locust import BridgedDevice

    class Probe(BridgedDevice):
        fixed_count = 1
        wait_time = constant(0)
        config_text = '[wifi]\\nstation_interface = "lo"\\nconnect_delay_ms = 2000\\n'

        @task
        def once(self):
            self.at.command("ATE0")
            assert not self.at.command("AT+BOGUS").ok
            assert self.at.command("AT", name="ok").ok
            answer = self.at.command('AT+CWJAP="bridged","pw"', name="slow join", timeout=1.0)
            assert answer.final == "TIMEOUT", answer
            gevent.sleep(1.5)  # its late OK arrives meanwhile and must not answer the next
            after = self.at.command("AT+CWJAP?", name="after timeout")
            assert after.text.startswith(b"+CWJAP:"), after
            raise StopUser()

    class Broken(BridgedDevice):
        fixed_count = 1
        wait_time = constant(1)
        profile = "no-such-profile"

        @task
        def never(self):
            raise AssertionError("a device that did not start ran a task")

    gaps = [0.0, 0.0]  # the longest stall, and the longest gap with the waits for a CPU in it

    def waited():  # seconds this thread waited for a CPU (a loaded machine's delay, not a stall)
        with open("/proc/thread-self/schedstat") as schedstat:
            return int(schedstat.read().split()[1]) / 1e9

    def ticker():  # runs only if the devices' waits (boot, a 1 s timeout) yield to it
        last, was = time.monotonic(), waited()
        while True:
            gevent.sleep(0.01)
            now, now_was = time.monotonic(), waited()
            gaps[0] = max(gaps[0], (now - last) - (now_was - was))
            gaps[1] = max(gaps[1], now - last)
            last, was = now, now_was

    env = Environment(user_classes=[Probe, Broken])
    runner = env.create_local_runner()
    tick = gevent.spawn(ticker)
    runner.start(2, spawn_rate=2)
    for _ in range(300):  # 30 s at most
        gevent.sleep(0.1)
        if runner.user_count == 0 or all(g.dead for g in runner.user_greenlets):
            break
    runner.quit()
    tick.kill()
    print(json.dumps({
        "longest_stall": gaps[0],
        "longest_gap": gaps[1],
        "requests": {f"{e.method} {e.name}": [e.num_requests, e.num_failures]
                     for e in env.stats.entries.values()},
        "errors": [[e.method, e.name, repr(e.error)] for e in env.stats.errors.values()],
    }))
""")


def test_failures_and_timeouts_reach_locust_stats(tmp_dir):
    """Through Locust's library API: ERROR and a timeout are failures with their reason, a
    late answer is not taken for the next command's, a device that cannot start is a
    failed "start" whose temporary directory (and log) is kept, waits on the pty never
    stall the other greenlets, and no process is left."""
    driver = tmp_dir / "driver.py"
    driver.write_text(DRIVER)
    result = _run([sys.executable, str(driver)], tmp_dir, 50)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    requests = report["requests"]
    assert requests["AT AT+BOGUS"] == [1, 1]
    assert requests["AT ok"] == [1, 0] and requests["AT ATE0"] == [1, 0]
    assert requests["AT slow join"] == [1, 1]
    assert requests["AT after timeout"] == [1, 0]
    assert requests["device start"] == [2, 1]
    errors = {name: error for _, name, error in report["errors"]}
    assert "AtFailure" in errors["AT+BOGUS"] and "ERROR" in errors["AT+BOGUS"]
    assert "AtTimeout" in errors["slow join"]
    assert "exited with 2" in errors["start"]
    # Under gevent a device's waits yield: other greenlets ran every few ms throughout (a
    # blocking wait stalls them 1.6 s).  The time the process waited for a CPU is not counted:
    # on a loaded 2-core machine a driver burst of CPU (a fork, a collection) stretched by the
    # run queue, not a wait on the pty, passed for a stall of over 0.5 s.
    assert report["longest_stall"] < 0.5, (report["longest_stall"], report["longest_gap"])
    kept = list(tmp_dir.glob("bridged-locust-*"))
    assert len(kept) == 1 and "no-such-profile" in (kept[0] / "bridged.log").read_text()
    assert not _leftovers(tmp_dir)
