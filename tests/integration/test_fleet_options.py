"""The options of `bridged fleet` that no other test made do something:
--concurrency, --baud, --start-timeout and `fleet status --probe --within`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import Host, Timeout

START_TIMEOUT = 45.0  # devices importing Python on a busy 2-core machine


class Fleet:
    """``python -m bridged fleet`` with a config of the test's, its output in a file."""

    def __init__(self, tmp: Path, config: str, *args: str) -> None:
        self.dir = tmp / "fleet"
        (tmp / "bridged.toml").write_text('[wifi]\nstation_interface = "lo"\n' + config)
        self.out_path = tmp / "fleet.out"
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridged", "fleet", "--dir", str(self.dir),
                 "--config", str(tmp / "bridged.toml"), *args], stdout=out, stderr=subprocess.STDOUT)

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def events(self) -> list[dict]:
        return [json.loads(line[3:]) for line in self.out().splitlines() if line.startswith("<")]

    def wait_event(self, name: str, timeout: float = START_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if e.get("event") == name]
            if found:
                return found[0]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise Timeout(f"no {name} from the fleet:\n{self.out()[-4000:]}")
            time.sleep(0.05)

    def status(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bridged", "fleet", "status", "--dir", str(self.dir),
                               "--timeout", "5", *args], capture_output=True, text=True, timeout=60)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(30)


@pytest.fixture
def fleets(tmp_path):
    started: list[Fleet] = []

    def start(config: str, *args: str) -> Fleet:
        fleet = Fleet(tmp_path, config, *args)
        started.append(fleet)
        return fleet

    yield start
    for fleet in started:
        if fleet.proc.poll() is None:
            fleet.proc.kill()
            fleet.proc.wait(10)


def test_concurrency_baud_and_probe_within(fleets):
    """--concurrency 1 starts the second device only once the first is ready; --baud is
    each device's speed (AT+UART_CUR?); --probe --within fails a bound no AT round trip meets."""
    fleet = fleets("[firmware]\nboot_ms = 300\n", "--count", "2", "--profile", "fleet",
                   "--concurrency", "1", "--baud", "921600")
    fleet.wait_event("fleet_ready")
    order = [(e["event"], e["index"]) for e in fleet.events() if e.get("event") in ("device_started", "device_ready")]
    assert order == [("device_started", 0), ("device_ready", 0), ("device_started", 1), ("device_ready", 1)], order
    for i in range(2):
        host = Host(str(fleet.dir / f"ttyESP{i}"))
        host.expect(b"\r\nready\r\n")
        assert host.command(b"AT+UART_CUR?").endswith(b"+UART_CUR:921600,8,1,0,1\r\n\r\nOK\r\n")
        host.close()
    assert fleet.status("--probe", "--within", "60000").returncode == 0
    tight = fleet.status("--probe", "--within", "0.01")
    assert tight.returncode == 1, tight.stdout + tight.stderr
    assert fleet.stop() == 0, fleet.out()[-3000:]


def test_start_timeout_kills_a_device_not_ready_in_time(fleets):
    """--start-timeout: a device not ready within it (a 5 s boot, a 1 s bound) is logged and killed."""
    fleet = fleets("[firmware]\nboot_ms = 5000\n", "--count", "1", "--profile", "fleet",
                   "--start-timeout", "1")
    event = fleet.wait_event("device_start_timeout", timeout=START_TIMEOUT)
    assert (event["index"], event["seconds"]) == (0, 1.0)
    died = fleet.wait_event("device_died", timeout=10)
    assert died["index"] == 0
    fleet.stop()
