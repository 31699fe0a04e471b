"""`bridged status --watch`: redrawn every second until Ctrl-C, riding out a daemon that goes away."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

from tests.harness import Timeout


def _line(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """The watcher's next line of output, within ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise Timeout("bridged status --watch printed nothing")
    return proc.stdout.readline()


def test_watch_redraws_every_second_rides_out_a_stop_and_ends_on_ctrl_c(make_daemon):
    """--watch --json prints the status about once a second, says it retries while the
    daemon is gone, and exits 0 on SIGINT."""
    daemon = make_daemon()
    daemon.host().expect(b"\r\nready\r\n")
    proc = subprocess.Popen([sys.executable, "-m", "bridged", "status", "--watch", "--json",
                             "--state-dir", str(daemon.state_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
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
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
