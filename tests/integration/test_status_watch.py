"""`bridged status --watch` (redrawn every second until Ctrl-C, riding out a daemon
that goes away) and `--instance NAME` (the unit's /run/bridged/NAME)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import forkserver
from tests.harness import Timeout


def _line(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """The watcher's next line of output, within ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise Timeout("bridged status --watch printed nothing")
    return proc.stdout.readline()


def _as_from_a_shell() -> None:
    """Ctrl-C as a terminal's user has it: SIGINT neither ignored nor blocked (a pytest
    worker may hand its children either, and an exec keeps both)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signals(pid: int) -> str:
    """The process's signal masks, for a failure's message."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return " ".join(line.strip() for line in status if line.startswith(("State", "Sig")))
    except OSError as exc:
        return str(exc)


def test_watch_redraws_every_second_rides_out_a_stop_and_ends_on_ctrl_c(make_daemon):
    """--watch --json prints the status about once a second, says it retries while the
    daemon is gone, and exits 0 on SIGINT."""
    daemon = make_daemon()
    daemon.host().expect(b"\r\nready\r\n")
    proc = subprocess.Popen([sys.executable, "-m", "bridged", "status", "--watch", "--json",
                             "--state-dir", str(daemon.state_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            preexec_fn=_as_from_a_shell)
    try:
        first = json.loads(_line(proc))
        started = time.monotonic()
        second = json.loads(_line(proc))
        assert 0.7 < time.monotonic() - started < 5
        assert first["uart"] and second["uart"]
        assert daemon.stop() == 0
        deadline = time.monotonic() + 10
        while "retrying" not in (line := _line(proc)):
            assert time.monotonic() < deadline, line
        assert proc.poll() is None  # still watching
        os.kill(proc.pid, signal.SIGINT)
        try:
            assert proc.wait(10) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit on SIGINT: {_signals(proc.pid)}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_status_and_fault_find_an_instance_under_run_bridged(make_daemon):
    """--instance NAME asks /run/bridged/NAME/control.sock (the unit's RuntimeDirectory=),
    for `bridged status` and `bridged fault` alike."""
    if os.geteuid() != 0:
        pytest.skip("/run/bridged is root's")
    name = f"test-instance-{os.getpid()}"
    run_dir = Path("/run/bridged") / name
    made_base = not run_dir.parent.exists()
    run_dir.mkdir(parents=True, mode=0o750)
    try:
        daemon = make_daemon(args=("--control", str(run_dir / "control.sock")))
        daemon.host().expect(b"\r\nready\r\n")
        shown = forkserver.run(["status", "--json", "--instance", name], timeout=30)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert json.loads(shown.stdout)["uart"]
        fired = forkserver.run(["fault", "at_busy", "--instance", name], timeout=30)
        assert fired.returncode == 0, fired.stdout + fired.stderr
        host = daemon.host()
        host.write(b"AT\r\n")
        assert host.expect(b"busy p...\r\n").endswith(b"busy p...\r\n")
        host.close()
        assert daemon.stop() == 0
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if made_base:
            with contextlib.suppress(OSError):  # another test's instance may be there now
                run_dir.parent.rmdir()
