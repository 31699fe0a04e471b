"""``python -m bridged fleet`` run by a test: its output in a file, its events,
manifest, status and faults, and a stop that leaves no process behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import psutil

from tests import forkserver
from tests.harness import Timeout

START_TIMEOUT = 45.0  # three devices importing Python on a busy 2-core machine

T = TypeVar("T")


class FleetRun:
    """``python -m bridged fleet --count N`` in a test directory, [wifi] on lo plus `config`."""

    def __init__(self, tmp: Path, count: int, *extra: str, directory: Path | None = None,
                 config: str = "") -> None:
        self.dir = directory or tmp / "fleet"
        self.config = tmp / "bridged.toml"
        self.config.write_text('[wifi]\nstation_interface = "lo"\n' + config)
        self.out_path = tmp / "fleet.out"
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridged", "fleet", "--count", str(count), "--dir",
                 str(self.dir), "--config", str(self.config), *extra],
                stdout=out, stderr=subprocess.STDOUT)

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def _poll(self, found: Callable[[], T], what: str, timeout: float) -> T:
        """found()'s first true answer; Timeout if the fleet ends or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while not (got := found()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise Timeout(f"no {what} from the fleet:\n{self.out()[-4000:]}")
            time.sleep(0.05)
        return got

    def wait_for(self, text: str, timeout: float = START_TIMEOUT) -> None:
        self._poll(lambda: text in self.out(), repr(text), timeout)

    def wait_event(self, name: str, timeout: float = START_TIMEOUT) -> dict:
        """The fleet's first `name` event."""
        return self._poll(lambda: self.events(name), name, timeout)[0]

    def events(self, name: str | None = None) -> list[dict]:
        """The fleet's JSON log events (those called `name`, if given), in order."""
        lines = [line[3:] for line in self.out().splitlines() if line.startswith("<")]
        return [e for e in map(json.loads, lines) if name is None or e.get("event") == name]

    def manifest(self) -> dict:
        return json.loads((self.dir / "fleet.json").read_text())

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def status(self, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return forkserver.run(["fleet", "status", "--dir", str(self.dir), *extra], timeout=timeout)

    def fault(self, *args: str) -> subprocess.CompletedProcess:
        return forkserver.run(["fleet", "fault", "--dir", str(self.dir), "--timeout", "5", *args], timeout=30)

    def status_json(self, *extra: str) -> tuple[int, dict]:
        result = self.status("--json", *extra)
        assert result.returncode in (0, 1), result.stdout + result.stderr
        return result.returncode, json.loads(result.stdout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Its exit status after `sig`; every process of its killed and Timeout if it does not end within `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for p in self.tree():
                p.kill()
            raise Timeout(f"the fleet ignored {sig!r}:\n{self.out()[-4000:]}")
