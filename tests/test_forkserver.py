"""The fork server (tests/forkserver.py) starts a daemon as an exec of ``python -m bridged`` would."""

from __future__ import annotations

import os
import re
import signal

import pytest

from tests import forkserver
from tests.harness import Daemon, Timeout


def _fds(daemon: Daemon) -> list[str]:
    """What the supervisor holds open, without the numbers that differ between two daemons."""
    found = []
    for fd in sorted(os.listdir(f"/proc/{daemon.proc.pid}/fd"), key=int):
        target = os.readlink(f"/proc/{daemon.proc.pid}/fd/{fd}").replace(str(daemon.tmp), "TMP")
        found.append(fd + " " + re.sub(r"(\[\d+\]|/dev/pts/\d+)$", "", target))
    return found


def _started(tmp_path, name: str) -> Daemon:
    directory = tmp_path / name
    directory.mkdir()
    daemon = Daemon(directory).start()
    host = daemon.host()
    host.boot()
    host.close()
    return daemon


def test_a_forked_daemon_holds_what_an_execd_one_holds(tmp_path, monkeypatch):
    """Same descriptors in the supervisor (stdin /dev/null, the log, the pty, rings ...),
    the test's environment, and exit 0 on SIGTERM, forked or exec'd."""
    forked = _started(tmp_path, "forked")
    assert isinstance(forked.proc, forkserver.ForkedProcess)
    monkeypatch.setenv("BRIDGED_TEST_FORKSERVER", "0")
    execd = _started(tmp_path, "execd")
    assert not isinstance(execd.proc, forkserver.ForkedProcess)
    try:
        assert _fds(forked) == _fds(execd)
        assert _fds(forked)[0] == "0 /dev/null"
        environ = open(f"/proc/{forked.proc.pid}/environ", "rb").read().split(b"\0")
        assert b"BRIDGED_TEST_FORKSERVER=0" not in environ  # the env of its own start, not the server's
        assert b"PYTHONUNBUFFERED=1" in environ
    finally:
        assert forked.stop() == 0
        assert execd.stop() == 0
    assert forked.proc.poll() == 0 and forked.proc.returncode == 0


def test_exit_status_and_signals_as_popen_gives_them(tmp_path):
    """A config error's exit 2, a SIGKILL's -9, and wait()'s timeout, as subprocess.Popen reports them."""
    (tmp_path / "broken").mkdir()
    broken = Daemon(tmp_path / "broken", "[uart]\nparity = 3\n")
    with pytest.raises(Timeout):
        broken.start()
    assert broken.proc.wait(5) == 2
    assert "uart.parity" in broken.log_text()

    daemon = _started(tmp_path, "killed")
    with pytest.raises(forkserver.subprocess.TimeoutExpired):
        daemon.proc.wait(0.1)
    daemon.proc.send_signal(signal.SIGKILL)
    assert daemon.proc.wait(5) == -signal.SIGKILL
    daemon.proc.send_signal(signal.SIGTERM)  # gone: nothing to signal, no error


def test_a_forked_command_line_answers_as_an_execd_one(tmp_path, monkeypatch):
    """forkserver.run gives what subprocess.run gives for the same `python -m bridged ...`:
    exit status, stdout and stderr apart, the caller's environment and working directory."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[uart]\nbaud = 1\n")
    monkeypatch.setenv("BRIDGED_CONFIG_DIR", str(tmp_path / "etc"))
    cases = (["check", "--config", "bad.toml"], ["check", "--transcript", "t.log"], ["--version"],
             ["status", "--no-such-option"])
    # PYTHONPATH: an exec'd `-m bridged` in tmp_path imports this checkout's bridged, as the server does.
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    forked = [forkserver.run(args, timeout=30, cwd=str(tmp_path)) for args in cases]
    monkeypatch.setenv("BRIDGED_TEST_FORKSERVER", "0")
    execd = [forkserver.run(args, timeout=30, cwd=str(tmp_path)) for args in cases]
    assert [(r.returncode, r.stdout, r.stderr) for r in forked] == [(r.returncode, r.stdout, r.stderr) for r in execd]
    assert [r.returncode for r in forked] == [2, 0, 0, 2]
    assert str(tmp_path / "t.log") in forked[1].stdout and forked[0].stdout == ""
