"""How a stopped daemon's process ends (bridged.__main__._end): its atexit
callbacks run and its output is flushed, its status is the supervisor's, and
its interpreter is not torn down module by module (the larger part of a stop's
CPU: every object freed, every page written)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.harness import Host, with_test_timing

pytestmark = pytest.mark.timeout(60)

# `python -m bridged run` with a canary: an atexit callback and an object freed only
# by the module teardown, each printing without a flush of its own.
_CANARY = textwrap.dedent("""
    import atexit, sys

    class Canary:
        def __del__(self):
            print("torn down")

    sys.modules["canary"] = type(sys)("canary")
    sys.modules["canary"].canary = Canary()
    atexit.register(lambda: print("atexit ran"))
    from bridged.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_stop_runs_atexit_and_flushes_but_tears_nothing_down(tmp_path):
    """SIGTERM after ready: exit 0, the atexit callback's unflushed line in the output,
    nothing printed by a module's teardown."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(with_test_timing('[wifi]\nstation_interface = "lo"\n[log]\nformat = "json"\n'))
    link = tmp_path / "tty"
    with open(tmp_path / "out", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _CANARY, "run", "--config", str(cfg), "--pty", str(link),
                                 "--state-dir", str(tmp_path / "s")], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not link.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out").read_text()
            time.sleep(0.02)
        host = Host(str(link))
        try:
            host.expect(b"\r\nready\r\n")
        finally:
            host.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "out").read_text()
    assert text.rstrip().endswith("atexit ran"), text[-2000:]
    assert "torn down" not in text
    assert "Traceback" not in text
