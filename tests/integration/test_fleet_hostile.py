"""bridged fleet against what it does not control: devices that exit while the fleet
looks away (their pid may be another program's once reaped), control sockets that answer
garbage or belong to someone else, a fleet directory other users may write."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridged import launch
from bridged.fleet import DeviceState, Fleet, FleetSpec
from bridged.fleet_devices import bind_notify
from tests import forkserver
from tests.integration.fleetrun import FleetRun
from tests.notify import notify, proc_environ, skip_unless_nobody_runs_python


class KillpgSpy:
    """Records every os.killpg whose group id was no longer held by a process of ours
    (reaped already: the number may be another program's group by then)."""

    def __init__(self, monkeypatch) -> None:
        self.stale: list[int] = []
        real = os.killpg

        def spy(pgid: int, sig: int) -> None:
            if not os.path.exists(f"/proc/{pgid}"):
                self.stale.append(pgid)
            real(pgid, sig)

        monkeypatch.setattr(os, "killpg", spy)


def _fleet(tmp_path: Path, count: int) -> Fleet:
    """A Fleet whose devices are `sleep 60` sessions (the fleet's own processes, not bridged)."""
    fleet = Fleet(FleetSpec(count, tmp_path, concurrency=count))
    fleet._wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.close(wakeup_w)
    (tmp_path / "logs").mkdir()
    (tmp_path / "run").mkdir()
    fleet._notify = bind_notify(fleet.notify_name)
    for device in fleet.devices:
        device.proc = launch.spawn(["sleep", "60"], device.paths.log)
        device.state = DeviceState.READY
    return fleet


def test_a_dead_device_group_is_killed_before_it_is_reaped(tmp_path, monkeypatch):
    """A device that died and one stopped by the fleet: their process groups are signalled
    while the dead supervisor still holds its pid (a zombie), never after it was reaped."""
    fleet = _fleet(tmp_path, 2)
    spy = KillpgSpy(monkeypatch)
    try:
        dead = fleet.devices[0].proc
        os.kill(dead.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while launch.exit_status(dead) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        fleet._reap()
        assert fleet.devices[0].state is DeviceState.BACKOFF and dead.returncode == -signal.SIGKILL
        fleet.devices[0].state = DeviceState.STOPPED  # not restarted by this test
        assert fleet.stop() == 0
        assert fleet.devices[1].proc.returncode == -signal.SIGTERM
        assert spy.stale == [], "killpg of a reaped device's group"
    finally:
        for device in fleet.devices:
            if device.proc is not None and device.proc.returncode is None:
                device.proc.kill()
                device.proc.wait(5)
        fleet._notify.close()
        os.close(fleet._wakeup_r)


# A control socket that answers every request with argv[2] (raw bytes after the length), or
# never (argv[2] == "silent"); argv[3] is there for fleet status to take it for device 0's
# `bridged run --pty D/ttyESP0` (bridged.fleet_cli._alive); with argv[4] it listens as that
# uid (SO_PEERCRED takes the credentials of listen()).
FAKE_DEVICE = r"""
import os, socket, struct, sys, time
path, reply = sys.argv[1], sys.argv[2].encode()
server = socket.socket(socket.AF_UNIX)
server.bind(path)
if len(sys.argv) > 4:
    os.setresgid(int(sys.argv[4]), int(sys.argv[4]), int(sys.argv[4]))
    os.setresuid(int(sys.argv[4]), int(sys.argv[4]), int(sys.argv[4]))
server.listen(8)
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    try:
        conn.settimeout(5)
        size = struct.unpack(">I", conn.recv(4))[0]
        while size > 0:
            size -= len(conn.recv(size)) or size
        if reply == b"silent":
            time.sleep(30)
        conn.sendall(struct.pack(">I", len(reply)) + reply)
    except (OSError, struct.error):
        pass  # a client that went away (one that would not ask us)
    conn.close()
"""


class FakeFleet:
    """A fleet directory whose manifest names one device, served by FAKE_DEVICE (pid ``pid``
    in the manifest: the fake's own unless given)."""

    def __init__(self, directory: Path, reply: str, uid: int | None = None) -> None:
        self.dir = directory
        directory.mkdir(mode=0o700, exist_ok=True)
        run = directory / "run" / "0"
        run.mkdir(parents=True, mode=0o700)
        as_uid = () if uid is None else (str(uid),)
        self.proc = subprocess.Popen([sys.executable, "-c", FAKE_DEVICE, str(run / "control.sock"), reply,
                                      str(directory / "ttyESP0"), *as_uid], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "listening\n"
        self.write_manifest(self.proc.pid)

    def write_manifest(self, pid: int) -> None:
        devices = [{"index": 0, "pid": pid, "state": "ready", "pty": str(self.dir / "ttyESP0")}]
        (self.dir / "fleet.json").write_text(json.dumps({"pid": 0, "running": False, "devices": devices}))

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return forkserver.run(["fleet", *args[:1], "--dir", str(self.dir), *args[1:]], timeout=30)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def fake_fleet(tmp_path):
    fakes: list[FakeFleet] = []

    def make(reply: str, name: str = "fleet", uid: int | None = None) -> FakeFleet:
        fakes.append(FakeFleet(tmp_path / name, reply, uid))
        return fakes[-1]

    yield make
    for fake in fakes:
        fake.close()


GOOD = {"uart": {"bytes_in": 3, "bytes_out": 4}, "links": [], "uptime_s": 12.5}


@pytest.mark.parametrize("status, why", [
    ([1], "status is not an object"),
    ({**GOOD, "links": ["x"]}, "a link is not an object"),
    ({**GOOD, "uptime_s": "soon"}, "uptime_s is 'soon'"),
    ({**GOOD, "uart": {"bytes_in": 1e400, "bytes_out": 0}}, "uart.bytes_in is inf"),
    ({**GOOD, "faults": {"counts": {"at_busy": -1}}}, "a fault count is -1"),
    ({**GOOD, "faults": "many"}, "faults is not an object"),
    ({**GOOD, "x": json.loads("[" * 900 + "]" * 900)}, "nested more than 32 deep"),
])
def test_a_device_answering_garbage_is_a_bad_reply_not_a_traceback(fake_fleet, status, why):
    """A control socket whose status reply is not a status (wrong types, a negative or
    infinite count, deep nesting): the device is shown as not answering, with why, in the
    table and in --json; exit 1, no traceback."""
    fake = fake_fleet(json.dumps({"ok": True, "status": status}))
    for extra in ((), ("--json",)):
        done = fake.run("status", *extra)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert why in done.stdout and "bad status reply" in done.stdout, done.stdout


def test_fleet_status_of_a_good_fake_is_healthy(fake_fleet):
    """The fake answers a well-formed status: healthy, exit 0 (what the garbage cases differ from)."""
    fake = fake_fleet(json.dumps({"ok": True, "status": GOOD}))
    done = fake.run("status", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    (device,) = json.loads(done.stdout)["devices"]
    assert (device["answering"], device["uart_up"], device["uptime_s"]) == (True, 3, 12.5)


@pytest.mark.parametrize("reply", [{"ok": True, "fault": "at_busy", "for_s": "long"},
                                   {"ok": True, "fault": "at_busy", "links": 5},
                                   {"ok": True, "fault": "\x1b[2J", "armed": [1]}])
def test_a_fault_reply_of_another_shape_is_shown_not_a_traceback(fake_fleet, reply):
    """fleet fault: a reply of an unexpected shape is printed as it came (escaped), exit 0, no traceback."""
    fake = fake_fleet(json.dumps(reply))
    done = fake.run("fault", "at_busy", "--device", "0")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith("device 0: ") and "the reply: " in done.stdout and "\x1b" not in done.stdout


def test_a_socket_not_served_by_the_device_is_not_asked(fake_fleet, tmp_path):
    """The manifest's device 0 is a process of ours named like a device, the socket at its
    path another process's: neither status nor fault asks it (the device shows as not answering)."""
    fake = fake_fleet(json.dumps({"ok": True, "status": GOOD, "fault": "at_busy", "armed": 1}))
    impostor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(fake.dir / "ttyESP0")])
    try:
        fake.write_manifest(impostor.pid)
        done = fake.run("status")
        assert done.returncode == 1 and f"served by pid {fake.proc.pid}" in done.stdout, done.stdout
        done = fake.run("fault", "at_busy", "--device", "0")
        assert done.returncode == 1 and f"served by pid {fake.proc.pid}" in done.stdout, done.stdout
    finally:
        impostor.kill()
        impostor.wait(5)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to listen as another uid")
def test_another_users_socket_is_not_asked(fake_fleet):
    """Device 0's socket is served by another uid (its pid the manifest's): not asked."""
    fake = fake_fleet(json.dumps({"ok": True, "status": GOOD}), uid=65534)
    done = fake.run("status")
    assert done.returncode == 1 and "(uid 65534)" in done.stdout, done.stdout


@pytest.mark.parametrize("mode", [0o777, 0o1777])
def test_a_fleet_directory_others_may_write_is_refused(fake_fleet, mode):
    """status and fault on a directory other users may write: exit 2, one line, no device asked
    (its manifest and sockets could be theirs)."""
    fake = fake_fleet(json.dumps({"ok": True, "status": GOOD, "fault": "at_busy", "armed": 1}))
    fake.dir.chmod(mode)
    for args in (("status",), ("fault", "at_busy", "--all")):
        done = fake.run(*args)
        assert done.returncode == 2 and done.stdout == "", done
        assert done.stderr.startswith(f"bridged fleet: --dir: {fake.dir} is writable by others"), done.stderr
        assert len(done.stderr.splitlines()) == 1


def test_a_silent_device_costs_its_timeout_only(fake_fleet):
    """A device whose socket accepts and never answers: not answering after --timeout, exit 1."""
    fake = fake_fleet("silent")
    started = time.monotonic()
    done = fake.run("status", "--timeout", "0.5")
    assert done.returncode == 1 and "NOT ANSWERING: no answer within 0.5 s" in done.stdout, done.stdout
    assert time.monotonic() - started < 10


def test_bridged_fault_escapes_what_the_daemon_says(tmp_path):
    """`bridged fault` on one daemon: a reply whose words hold an escape sequence is printed escaped."""
    path = tmp_path / "control.sock"
    reply = json.dumps({"ok": True, "fault": "\x1b]0;pwned\x07", "armed": 1})
    fake = subprocess.Popen([sys.executable, "-c", FAKE_DEVICE, str(path), reply, "-"], stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout.readline() == "listening\n"
        done = forkserver.run(["fault", "at_busy", "--control", str(path)], timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "\\x1b]0;pwned\\x07: armed for the next 1 occasion(s)\n", done.stdout
    finally:
        fake.kill()
        fake.wait(5)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_another_user_cannot_reach_the_fleets_notify_socket(tmp_path):
    """The socket the devices send READY=1 to is out of another local user's reach (who could
    flood it and hold every device's READY=1 back): a datagram sent as nobody is refused."""
    skip_unless_nobody_runs_python()
    fleet = FleetRun(tmp_path, 1)
    try:
        fleet.wait_for("bridged fleet: 1 of 1 devices ready")
        env = proc_environ(fleet.manifest()["devices"][0]["pid"])
        probe = notify(env["NOTIFY_SOCKET"], "STATUS=flood", as_nobody=True)
        assert probe.returncode != 0 and "PermissionError" in probe.stderr, (env["NOTIFY_SOCKET"], probe)
        probe = notify(env["NOTIFY_SOCKET"], "STATUS=flood", as_nobody=False)
        assert probe.returncode == 0, probe.stderr  # (the probe reaches it as the fleet's user)
    finally:
        assert fleet.stop() == 0, fleet.out()[-3000:]
    assert not (fleet.dir / "run" / "notify.sock").exists()
