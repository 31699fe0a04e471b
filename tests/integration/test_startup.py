"""Start-up failures: each one ends the daemon with one line naming the cause
and the remedy, exit status 1 (2 is for usage and config mistakes), no
traceback, no restart loop, and nothing left in /dev/shm."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import resource
import signal
import subprocess
import sys
import time
import tty
from dataclasses import dataclass

import pytest

from tests import forkserver
from tests.harness import Daemon, parse_events

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


@dataclass
class Outcome:
    status: int
    stderr: str
    stdout: str
    pid: int
    started: float  # wall-clock time before the daemon was started

    def events(self, name: str | None = None) -> list[dict]:
        return parse_events(self.stdout, name)


def _start(tmp_path, *args: str, stdout=subprocess.PIPE, preexec_fn=None) -> subprocess.Popen:
    """`bridged run` with JSON logs, a state directory in tmp_path, and ``args``."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[wifi]\nstation_interface = "lo"\n[log]\nformat = "json"\n')
    return subprocess.Popen(
        [sys.executable, "-m", "bridged", "run", "--config", str(cfg), "--state-dir", str(tmp_path / "s"), *args],
        stdout=stdout, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn,
    )


def _run(tmp_path, *args: str, preexec_fn=None) -> Outcome:
    """Run `bridged run` until it exits by itself (it must, within 30 s)."""
    started = time.time()
    proc = _start(tmp_path, *args, preexec_fn=preexec_fn)
    try:
        stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"the daemon did not end by itself:\n{stderr}\n{stdout[-3000:]}")
    return Outcome(proc.returncode, stderr, stdout, proc.pid, started)


def _shm_of(pid: int, since: float) -> list[str]:
    """Entries in /dev/shm named after ``pid`` (the scheme rings once had) made since
    ``since``: a machine that ran older versions may keep theirs, and pids come round."""
    found = []
    for name in os.listdir("/dev/shm"):
        if name.startswith(f"bridged-{pid}-"):
            with contextlib.suppress(FileNotFoundError):
                if os.stat(f"/dev/shm/{name}").st_mtime >= since - 1:
                    found.append(name)
    return found


def _check_one_line_failure(outcome: Outcome, *phrases: str) -> None:
    """Exit 1, one stderr line with every phrase, no traceback or error event, no /dev/shm leftovers."""
    assert outcome.status == 1, (outcome.stderr, outcome.stdout[-3000:])
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("bridged: ") and "; " in lines[0], lines[0]  # cause; remedy
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert "Traceback" not in outcome.stdout + outcome.stderr
    loud = [e for e in outcome.events() if e.get("level") in ("error", "critical") or "exception" in e]
    assert not loud, loud
    assert not _shm_of(outcome.pid, outcome.started)


def _check_no_restart(outcome: Outcome) -> None:
    """The front was started once: a port that cannot be opened is not retried."""
    fronts = [e for e in outcome.events("child_started") if e.get("role") == "front"]
    assert len(fronts) == 1, fronts


@pytest.fixture
def serial_pty():
    """A pty whose slave end stands in for a serial device: (master fd, slave fd, path)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    yield master, slave, os.ttyname(slave)
    os.close(master)
    os.close(slave)


@pytest.mark.parametrize("attempt", range(3))
def test_a_locked_port_ends_the_daemon_with_exit_1(tmp_path, serial_pty, attempt):
    """A port another process holds locked (flock, as pyserial's exclusive mode
    does): one line naming it, exit 1 on every run, the front not restarted."""
    _, slave, device = serial_pty
    fcntl.flock(slave, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what another bridged or minicom holds
    outcome = _run(tmp_path, "--port", device)
    _check_one_line_failure(outcome, device, "in use by another process (locked)", "--port")
    _check_no_restart(outcome)


@pytest.mark.parametrize("attempt", range(3))
def test_a_port_that_is_no_tty_ends_the_daemon_with_exit_1(tmp_path, attempt):
    """--port /dev/null: one line saying it is not a serial port, exit 1 on every run."""
    outcome = _run(tmp_path, "--port", "/dev/null")
    _check_one_line_failure(outcome, "/dev/null is not a serial port (not a tty)")
    _check_no_restart(outcome)


def test_a_missing_device_ends_the_daemon_with_exit_1(tmp_path):
    """A device path that does not exist (an unplugged USB adapter): exit 1, not 2."""
    outcome = _run(tmp_path, "--port", "/dev/ttyUSB-bridged-test-absent")
    _check_one_line_failure(outcome, "/dev/ttyUSB-bridged-test-absent does not exist")


def _without_dac_override() -> None:
    """In the child: give up root's right to ignore file modes (uid 0 stays)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


def test_a_device_without_permission_ends_the_daemon_with_exit_1(tmp_path, serial_pty):
    """A device bridged may not open (not in its group): one line saying so and what to do."""
    _, _, device = serial_pty
    os.chmod(device, 0)
    preexec = None
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(23, _CAP_DAC_OVERRIDE, 0, 0, 0) != 1:  # PR_CAPBSET_READ
            pytest.skip("no CAP_DAC_OVERRIDE to give up: root here cannot be denied")
        preexec = _without_dac_override
    outcome = _run(tmp_path, "--port", device, preexec_fn=preexec)
    _check_one_line_failure(outcome, device, "permission denied", "group")
    _check_no_restart(outcome)


def test_a_pty_link_at_a_regular_file_ends_the_daemon_with_exit_1(tmp_path):
    """--pty naming a regular file: the file is left alone, one line, exit 1."""
    target = tmp_path / "precious"
    target.write_text("keep me")
    outcome = _run(tmp_path, "--pty", str(target))
    _check_one_line_failure(outcome, str(target), "exists and is not a symlink")
    assert target.read_text() == "keep me"
    assert not outcome.events("child_started")  # found before anything was forked


def test_a_pty_link_in_a_missing_directory_ends_the_daemon_with_exit_1(tmp_path):
    """--pty in a directory that does not exist: one line naming the directory, exit 1."""
    link = tmp_path / "no" / "such" / "tty"
    outcome = _run(tmp_path, "--pty", str(link))
    _check_one_line_failure(outcome, str(tmp_path / "no" / "such"), "does not exist", "--pty")
    assert not outcome.events("child_started")


def test_a_config_mistake_stays_exit_2(tmp_path, serial_pty):
    """A usage mistake is still exit 2, whatever the port: 1 is for what the admin fixes outside the config."""
    _, slave, device = serial_pty
    fcntl.flock(slave, fcntl.LOCK_EX | fcntl.LOCK_NB)
    outcome = _run(tmp_path, "--port", device, "--baud", "12")
    assert outcome.status == 2 and len(outcome.stderr.splitlines()) == 1 and "uart.baud" in outcome.stderr


def test_a_state_directory_that_cannot_be_made_ends_the_daemon_with_exit_1(tmp_path):
    """A --state-dir below a regular file: one line naming the directory, exit 1, nothing forked."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    outcome = _run(tmp_path, "--pty", str(tmp_path / "tty"), "--state-dir", str(blocker / "state"))
    _check_one_line_failure(outcome, str(blocker / "state"), "--state-dir")
    assert not outcome.events("child_started")


def test_check_says_a_missing_device_as_run_would(tmp_path):
    """`bridged check` prints the configuration, then the line `run` would end with, and exits 1."""
    result = forkserver.run(["check", "--port", "/dev/ttyUSB-bridged-test-absent"], timeout=20)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["bridged: /dev/ttyUSB-bridged-test-absent does not exist; "
                                          "plug the device in or choose another --port"]
    assert 'port = "/dev/ttyUSB-bridged-test-absent"' in result.stdout


def _maps_under_dev_shm(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return [line for line in f if " /dev/shm/" in line]
    except FileNotFoundError:
        return []


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    """Running, not gone or a zombie (a container's init may reap late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigkill_of_the_supervisor_leaves_nothing_in_dev_shm(tmp_path):
    """Rings are never named in /dev/shm: a SIGKILLed supervisor leaves no entry
    once its children have ended (they end with it)."""
    started = time.time()
    daemon = Daemon(tmp_path).start()
    try:
        daemon.host().expect(b"\r\nready\r\n")
        pids = [daemon.proc.pid, *_children(daemon.proc.pid)]
        assert len(pids) == 1 + 1 + 5  # supervisor, front, five link workers
        for pid in pids:
            assert not _maps_under_dev_shm(pid), pid
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids[1:]):
            assert time.monotonic() < deadline, "the children outlived the supervisor"
            time.sleep(0.05)
        assert not _shm_of(daemon.proc.pid, started)
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(5)


def _read_until(fd: int, pattern: bytes, timeout: float = 10.0) -> bytes:
    os.set_blocking(fd, False)
    buf = b""
    deadline = time.monotonic() + timeout
    while pattern not in buf:
        assert time.monotonic() < deadline, f"no {pattern!r} in {buf!r}"
        time.sleep(0.02)
        try:
            buf += os.read(fd, 4096)
        except BlockingIOError:
            pass
    return buf


def _wait_log(path, event: str, count: int = 1, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = parse_events(path.read_text(errors="replace"), event)
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"no {count}x {event}:\n{path.read_text()[-3000:]}"
        time.sleep(0.02)


def test_a_port_that_served_is_retried_then_given_up(tmp_path, serial_pty):
    """A port that served and then cannot be reopened (a USB adapter re-plugging
    while the front restarts) is retried with the backoff: back in time, the
    daemon serves again; away for good, it ends with one line and exit 1."""
    master, _, device = serial_pty
    port = tmp_path / "port"  # a udev-style symlink we can point away
    port.symlink_to(device)
    log_path = tmp_path / "out.log"
    with open(log_path, "w") as out:
        proc = _start(tmp_path, "--port", str(port), stdout=out)
    try:
        _read_until(master, b"\r\nready\r\n")
        for attempt in (1, 2):
            front = [e for e in _wait_log(log_path, "child_started") if e["role"] == "front"][-1]["pid"]
            os.replace(_symlink(tmp_path, "/dev/bridged-test-unplugged"), port)
            os.kill(front, signal.SIGKILL)
            _wait_log(log_path, "port_lost", attempt)
            if attempt == 1:
                os.replace(_symlink(tmp_path, device), port)  # plugged in again
                _read_until(master, b"\r\nready\r\n")
                assert proc.poll() is None
        assert proc.wait(15) == 1
        lines = proc.stderr.read().splitlines()
        assert lines == [f"bridged: {port} does not exist; plug the device in or choose another --port"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()


def _symlink(directory, target: str):
    """A new symlink to ``target`` in ``directory`` (to os.replace a link atomically)."""
    link = directory / "port.new"
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    return link


def test_in_the_journal_the_line_is_an_error(tmp_path):
    """With stderr connected to the journal ($JOURNAL_STREAM names it) the line
    carries the <3> priority prefix, so `journalctl -p err` shows it."""
    r, w = os.pipe()
    st = os.fstat(w)
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    proc = subprocess.Popen([sys.executable, "-m", "bridged", "run", "--port", "/dev/ttyUSB-bridged-test-absent",
                             "--state-dir", str(tmp_path / "s")],
                            stdout=subprocess.DEVNULL, stderr=w, env=env)
    os.close(w)
    try:
        assert proc.wait(30) == 1
        with os.fdopen(r, "rb") as stderr:
            assert stderr.read().decode().splitlines() == [
                "<3>bridged: /dev/ttyUSB-bridged-test-absent does not exist; plug the device in or choose another --port"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_too_few_descriptors_end_the_daemon_with_exit_1(tmp_path):
    """A descriptor limit too low for the rings (LimitNOFILE=): one line naming
    the limit and what to raise, exit 1, no traceback."""
    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))

    outcome = _run(tmp_path, "--pty", str(tmp_path / "tty"), preexec_fn=few_descriptors)
    _check_one_line_failure(outcome, "cannot run 5 links: too many open files", "LimitNOFILE=")


def test_a_front_that_keeps_dying_before_ready_ends_the_daemon_with_a_line(tmp_path):
    """A front that dies five times in a row before it is ready (here SIGKILLed
    each time) ends the daemon with exit 1 and one line saying so, not silently."""
    log_path = tmp_path / "out.log"
    with open(log_path, "w") as out:
        proc = _start(tmp_path, "--pty", str(tmp_path / "tty"), stdout=out)
    try:
        killed: set[int] = set()
        deadline = time.monotonic() + 30
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the daemon went on restarting its front"
            fronts = parse_events(log_path.read_text(errors="replace"), "child_started")
            for pid in {e["pid"] for e in fronts if e["role"] == "front"} - killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.005)
        assert proc.returncode == 1
        assert proc.stderr.read().splitlines() == [
            "bridged: the front failed 5 times in a row before it was ready; its log events say why"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()


def test_a_port_that_hangs_up_is_reopened(tmp_path, serial_pty):
    """A serial port that hangs up while serving (a USB adapter unplugged: its
    tty reads EOF) is waited for and reopened by the same front; plugged in
    again (udev points the by-id link at the new node) the session goes on
    there, without a ready, and it does not spin on EOF meanwhile."""
    master, _, device = serial_pty
    port = tmp_path / "port"
    port.symlink_to(device)
    log_path = tmp_path / "out.log"
    with open(log_path, "w") as out:
        proc = _start(tmp_path, "--port", str(port), stdout=out)
    replug_master, replug_slave = os.openpty()
    try:
        _read_until(master, b"\r\nready\r\n")
        os.replace(_symlink(tmp_path, os.ttyname(replug_slave)), port)
        os.dup2(replug_master, master)  # the first master closes, its tty hangs up; the fixture closes the new one
        lost = _wait_log(log_path, "port_lost")[-1]
        assert lost["device"] == str(port) and lost["error"] == "hung up (unplugged?)"
        _wait_log(log_path, "port_back")
        os.write(master, b"AT\r\n")
        assert _read_until(master, b"\r\nOK\r\n") == b"AT\r\n\r\nOK\r\n"  # no ready: the same session
        assert proc.poll() is None
        assert len([e for e in _wait_log(log_path, "child_started") if e["role"] == "front"]) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "Traceback" not in log_path.read_text() + proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()
        os.close(replug_master)
        os.close(replug_slave)
