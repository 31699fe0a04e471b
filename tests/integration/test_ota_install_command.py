"""[ota] install_command: what it gets (the image's path, version, partition and sha256,
no fd of ours, the image directory as cwd), what its exit means, and that nothing it
started outlives a failed, timed-out, reset or stopped update.  Its capabilities and
environment are tested in test_ota_policy.py."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from tests.harness import Daemon
from tests.otaserver import (  # noqa: F401 - ota_files, server, shared_daemons and start are fixtures
    FAILED_DOWNLOAD,
    IMAGE,
    LATEST,
    PROGRESS,
    image_dir,
    leftovers,
    ota_files,
    ota_section,
    server,
    start,
    why,
)


# -- install_command -----------------------------------------------------------------------


def _installer(tmp_path: Path, status: int) -> str:
    script = tmp_path / f"install-{status}.sh"
    script.write_text(f'#!/bin/sh\ncp "$1" "{tmp_path}/installed.bin"\n'
                      f'echo "$BRIDGED_OTA_VERSION $BRIDGED_OTA_PARTITION $BRIDGED_OTA_SHA256"'
                      f' > "{tmp_path}/installed.txt"\n'
                      f'echo installing; exit {status}\n')
    return f'install_command = "/bin/sh {script}"\n'


def test_install_command_runs_before_the_restart(start, server, tmp_path):
    """The install command gets the image's path (and version, partition, sha256); then OK and ready."""
    daemon, host = start(server.url, _installer(tmp_path, 0))
    assert host.command(b"AT+CIUPDATE", timeout=20) == PROGRESS + b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    assert (tmp_path / "installed.bin").read_bytes() == IMAGE
    assert (tmp_path / "installed.txt").read_text() == f"{LATEST} ota {hashlib.sha256(IMAGE).hexdigest()}\n"
    assert daemon.wait_event("ota_installed")[-1]["output"] == "installing"


def test_install_command_failure_fails_the_update(start, server, tmp_path):
    """A non-zero exit: no +CIPUPDATE:4, ERROR, no restart, the image removed."""
    daemon, host = start(server.url, _installer(tmp_path, 3))
    assert host.ask(b"AT+CIUPDATE", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert "install_command exited with status 3: installing" in why(daemon)
    assert host.read_quiet(0.3) == b""
    assert leftovers(daemon) == []
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:-1\r\n\r\nOK\r\n"


# -- install_command: what it gets, and that nothing of it outlives the update --------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _wait_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.02)
    return path.read_text()


def _hanging_installer(tmp_path: Path) -> str:
    """Starts a child and hangs; both pids go to pids.txt."""
    script = tmp_path / "hang.sh"
    script.write_text(f'#!/bin/sh\nsleep 300 &\necho "$$ $!" > "{tmp_path}/pids.txt"\nsleep 300\n')
    return f'install_command = "/bin/sh {script}"\n'


def test_install_command_gets_no_fd_of_ours_and_the_image_dir_as_cwd(start, server, tmp_path):
    """Only stdin, stdout and stderr reach the command (not the serial port, rings or the
    supervisor socket: uvloop ignores close_fds); its cwd is the image directory."""
    script = tmp_path / "fds.py"
    script.write_text(
        "import os, json\n"
        "fds = {}\n"
        "for n in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        fds[n] = os.readlink(f'/proc/self/fd/{n}')\n"
        "    except OSError:\n"
        "        pass  # the listing's own, closed by now\n"
        f"open({str(tmp_path / 'fds.json')!r}, 'w').write(json.dumps({{'fds': fds, 'cwd': os.getcwd()}}))\n")
    daemon, host = start(server.url, f'install_command = "{sys.executable} {script}"\n')
    assert host.ask(b'AT+CIUPDATE=1,,"client_ca"', timeout=20) == PROGRESS + b"\r\nOK\r\n"
    seen = json.loads((tmp_path / "fds.json").read_text())
    extra = {fd: target for fd, target in seen["fds"].items()
             if int(fd) > 2}
    assert extra == {}
    assert seen["cwd"] == str(image_dir(daemon))


def test_install_command_hanging_past_the_timer_is_killed_with_its_children(start, server, tmp_path):
    """The overall timer kills the command and what it started; ERROR, no image left."""
    daemon, host = start(server.url, "timeout_ms = 3000\n" + _hanging_installer(tmp_path))
    assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9"', timeout=20) == FAILED_DOWNLOAD
    assert "longer than 3 s" in why(daemon)
    pids = [int(p) for p in _wait_file(tmp_path / "pids.txt").split()]
    assert _wait_gone(pids) == []
    assert leftovers(daemon) == []


def test_restart_kills_a_running_install_command(start, server, tmp_path):
    """AT+RST during a nonblocking update's install: the command and its child die, no image kept."""
    daemon, host = start(server.url, _hanging_installer(tmp_path))
    assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9",,1') == b"\r\nOK\r\n"
    host.expect(b"+CIPUPDATE:1\r\n")
    pids = [int(p) for p in _wait_file(tmp_path / "pids.txt").split()]
    assert host.ask(b"AT+RST") == b"\r\nOK\r\n"
    host.expect(b"\r\nready\r\n")
    assert _wait_gone(pids) == []
    assert leftovers(daemon) == []
    host.expect(b"WIFI GOT IP\r\n")
    host.command(b"ATE0")  # a fresh session echoes again
    # and a new update can start at once
    (tmp_path / "pids.txt").unlink()
    assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9",,1') == b"\r\nOK\r\n"
    host.expect(b"+CIPUPDATE:1\r\n")
    pids = [int(p) for p in _wait_file(tmp_path / "pids.txt").split()]
    assert host.ask(b"AT+CIPFWVER?") == b'+CIPFWVER:"v4.1.1.0"\r\n+CIPFWVER:"v4.1.2.0"\r\n\r\nOK\r\n'
    assert host.ask(b"AT+CIUPDATE?") == b"+CIUPDATE:1\r\n\r\nOK\r\n"
    assert host.ask(b"AT+RST") == b"\r\nOK\r\n"
    assert _wait_gone(pids) == []


def test_stop_during_an_install_leaves_no_process_and_no_file(tmp_path, server, ota_files):
    """SIGTERM to bridged while install_command runs: the command and its child die, the
    image is removed, bridged exits 0."""
    daemon = Daemon(tmp_path, ota_section(ota_files, server.url) + _hanging_installer(tmp_path))
    daemon.start()
    host = daemon.host()
    try:
        host.boot()
        assert host.ask(b'AT+CIUPDATE=0,"v9.9.9.9",,1') == b"\r\nOK\r\n"
        host.expect(b"+CIPUPDATE:1\r\n")
        pids = [int(p) for p in _wait_file(tmp_path / "pids.txt").split()]
    finally:
        host.close()
        assert daemon.stop() == 0
    assert _wait_gone(pids) == []
    assert leftovers(daemon) == []


def test_stop_during_a_download_leaves_no_temporary_file(tmp_path, server, ota_files):
    """SIGTERM to bridged mid-download: no .part file left."""
    server.mode = "stall"
    daemon = Daemon(tmp_path, ota_section(ota_files, server.url))
    daemon.start()
    host = daemon.host()
    try:
        host.boot()
        assert host.ask(b"AT+CIUPDATE=0,,,1") == b"\r\nOK\r\n"
        assert server.stalled.wait(10)
        host.expect(b"+CIPUPDATE:3\r\n", timeout=10)
        deadline = time.monotonic() + 10
        while len(leftovers(daemon)) != 1:  # the temporary file
            assert time.monotonic() < deadline, leftovers(daemon)
            time.sleep(0.02)
    finally:
        host.close()
        assert daemon.stop() == 0
    assert leftovers(daemon) == []


def test_install_failure_keeps_the_previous_image(start, server, tmp_path):
    """A failed install of a partition restores the image its last update left."""
    daemon, host = start(server.url, _installer(tmp_path, 3))
    image_dir(daemon).mkdir()
    (image_dir(daemon) / "ota.bin").write_bytes(b"good")
    assert host.ask(b"AT+CIUPDATE", timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert (tmp_path / "installed.bin").read_bytes() == IMAGE  # it ran on the new image, then failed
    assert (image_dir(daemon) / "ota.bin").read_bytes() == b"good"
    assert leftovers(daemon) == ["ota.bin"]


def test_install_command_leaving_a_job_behind_does_not_hang_the_update(start, server, tmp_path):
    """A command that schedules something in the background (holding its stdout) and exits 0:
    the update succeeds at once, the job is left alone."""
    script = tmp_path / "later.sh"
    script.write_text(f'#!/bin/sh\nsleep 30 &\necho "$!" > "{tmp_path}/job.txt"\necho scheduled\n')
    daemon, host = start(server.url, f'timeout_ms = 10000\ninstall_command = "/bin/sh {script}"\n')
    began = time.monotonic()
    assert host.ask(b'AT+CIUPDATE=1,,"client_ca"', timeout=20) == PROGRESS + b"\r\nOK\r\n"
    assert time.monotonic() - began < 5
    job = int(_wait_file(tmp_path / "job.txt"))
    try:
        assert _alive(job)
        assert daemon.wait_event("ota_installed")[-1]["output"] == "scheduled"
    finally:
        os.kill(job, 9)


def test_missing_install_program_fails_cleanly(start, server):
    daemon, host = start(server.url, 'install_command = "/nonexistent/installer --now"\n')
    assert host.ask(b'AT+CIUPDATE=1,,"client_ca"', timeout=20) == (
        b"+CIPUPDATE:1\r\n+CIPUPDATE:2\r\n+CIPUPDATE:3\r\n\r\nERROR\r\n")
    assert "install_command '/nonexistent/installer'" in why(daemon)
    assert leftovers(daemon) == []
