"""bridged fleet: N devices on N ptys, the aggregated status and faults, stop, restart, bad options."""

from __future__ import annotations

import json
import select
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bridged.__main__ import main
from tests import forkserver
from tests.harness import EchoServer, Host
from tests.integration.fleetrun import START_TIMEOUT, FleetRun


def _gone(procs: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """The processes still alive after ``timeout``."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def test_three_devices_answer_status_and_stop(fleet_of):
    """A fleet of 3 announces its ptys, each device boots with ready and answers AT,
    status reports all three, and SIGTERM stops every process and removes the ptys."""
    fleet = fleet_of(3)
    fleet.wait_for("bridged fleet: 3 of 3 devices ready")
    manifest = fleet.manifest()
    assert manifest["running"] and manifest["pid"] == fleet.proc.pid
    devices = manifest["devices"]
    assert [d["pty"] for d in devices] == [str(fleet.dir / f"ttyESP{i}") for i in range(3)]
    assert {d["state"] for d in devices} == {"ready"}
    assert len({d["pid"] for d in devices}) == 3
    for d in devices:
        assert Path(d["state_dir"]) == fleet.dir / "state" / str(d["index"])
        assert Path(d["run_dir"]).is_dir() and Path(d["log"]).is_file()
        host = Host(d["pty"])  # the fleet wrote nothing on the line: ready is still there
        host.expect(b"\r\nready\r\n")
        assert host.command(b"AT").endswith(b"\r\nOK\r\n")
        host.close()
        assert psutil.Process(d["pid"]).environ()["RUNTIME_DIRECTORY"] == d["run_dir"]
    status = fleet.status("--timeout", "5")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "total: 3 of 3 running, 3 answering, 3 healthy" in status.stdout
    probed = fleet.status("--timeout", "5", "--probe", "--json")
    assert probed.returncode == 0, probed.stdout + probed.stderr
    rows = json.loads(probed.stdout)["devices"]
    assert [(r["index"], r["alive"], r["answering"], r["pid"]) for r in rows] == \
        [(d["index"], True, True, d["pid"]) for d in devices]
    assert all(r["at_ms"] is not None and r["at_ms"] <= 10 for r in rows), rows

    procs = fleet.tree()
    assert len(procs) >= 1 + 3 * 7  # the fleet; per device a supervisor, a front, 5 workers
    assert fleet.stop() == 0, fleet.out()[-3000:]
    assert not _gone(procs), "processes left behind"
    assert "bridged fleet: 3 devices stopped" in fleet.out()
    assert not any((fleet.dir / f"ttyESP{i}").is_symlink() for i in range(3))
    assert not any(name.startswith(f"bridged-{d['pid']}-") for d in devices for name in os.listdir("/dev/shm"))
    assert not fleet.manifest()["running"]
    after = fleet.status()
    assert after.returncode == 1 and "not running" in after.stdout
    assert "total: 0 of 3 running, 0 answering, 0 healthy" in after.stdout


def test_killed_device_is_restarted_and_counted(fleet_of):
    """A device killed with SIGKILL is reported, cleaned up after (rings, pty link, its
    children) and restarted on the same pty path; SIGINT still stops the fleet cleanly.
    With --profile fleet a device is a supervisor, a front and one link worker."""
    fleet = fleet_of(2, "--profile", "fleet")
    fleet.wait_for("bridged fleet: 2 of 2 devices ready")
    victim = fleet.manifest()["devices"][0]
    children = psutil.Process(victim["pid"]).children(recursive=True)
    forked = [p for p in children if "run" in p.cmdline()]  # not 3.11's resource tracker
    assert len(forked) == 2, [p.cmdline() for p in children]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + START_TIMEOUT
    while fleet.manifest()["devices"][0]["state"] != "ready" or fleet.manifest()["devices"][0]["pid"] == victim["pid"]:
        assert time.monotonic() < deadline, fleet.out()[-3000:]
        time.sleep(0.1)
    died = fleet.events("device_died")
    assert [(e["index"], e["pid"], e["exit_code"], e["restarts"]) for e in died] == [(0, victim["pid"], -9, 1)]
    assert not _gone(children), "the killed device's front and workers stayed"
    assert not any(f"bridged-{victim['pid']}-" in n for n in os.listdir("/dev/shm"))
    entry = fleet.manifest()["devices"][0]
    assert entry["restarts"] == 1 and entry["pty"] == victim["pty"]
    host = Host(entry["pty"])
    host.expect(b"\r\nready\r\n")
    assert host.command(b"AT").endswith(b"\r\nOK\r\n")
    host.close()
    assert fleet.status().returncode == 0
    # A second fleet in the same directory is refused while this one runs.
    second = subprocess.run([sys.executable, "-m", "bridged", "fleet", "--count", "1", "--dir",
                             str(fleet.dir)], capture_output=True, text=True, timeout=30)
    assert second.returncode == 2 and f"a fleet (pid {fleet.proc.pid}) already runs" in second.stderr
    procs = fleet.tree()
    assert fleet.stop(signal.SIGINT) == 0, fleet.out()[-3000:]
    assert not _gone(procs)


def test_sighup_reloads_every_device(fleet_of):
    """SIGHUP to the fleet reaches every device: each restarts its session with the changed
    config file (ready again, AT+GMR names the new version) and no device is restarted."""
    fleet = fleet_of(2, "--profile", "fleet")
    fleet.wait_for("bridged fleet: 2 of 2 devices ready")
    hosts = [Host(d["pty"]) for d in fleet.manifest()["devices"]]
    for host in hosts:
        host.expect(b"\r\nready\r\n")
    fleet.config.write_text('[wifi]\nstation_interface = "lo"\n[firmware]\nat_version = "4.0.0.0"\n')
    fleet.proc.send_signal(signal.SIGHUP)
    for host in hosts:
        host.expect(b"\r\nready\r\n")
        assert b"AT version:4.0.0.0(" in host.command(b"AT+GMR")
        host.close()
    assert [e["devices"] for e in fleet.events("fleet_reload")] == [2]
    assert not fleet.events("device_died") and fleet.proc.poll() is None


def test_stop_keeps_reading_notifications(fleet_of):
    """While stopping, the fleet keeps reading its notify socket: every stopping supervisor
    sends STOPPING=1 there, and with ten datagrams unread the eleventh sender blocked (a
    fleet of 50 then stopped only by killing devices 11 and up)."""
    fleet = fleet_of(1, "--profile", "fleet")
    fleet.wait_for("bridged fleet: 1 of 1 devices ready")
    device = fleet.manifest()["devices"][0]
    name = psutil.Process(device["pid"]).environ()["NOTIFY_SOCKET"]
    os.kill(device["pid"], signal.SIGSTOP)  # holds the stop, with the fleet inside it
    fleet.proc.send_signal(signal.SIGTERM)
    sent, deadline = 0, time.monotonic() + 5
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        while sent < 30 and time.monotonic() < deadline:
            try:
                sock.sendto(b"STOPPING=1", name)  # as 30 stopping devices would (a path: D/run/notify.sock)
                sent += 1
            except BlockingIOError:
                time.sleep(0.01)
    os.kill(device["pid"], signal.SIGCONT)
    assert sent == 30
    assert fleet.proc.wait(20) == 0, fleet.out()[-3000:]


def test_second_signal_kills_a_device_that_does_not_stop(fleet_of):
    """A device that does not stop (here: stopped with SIGSTOP) holds the fleet's stop until a
    second SIGTERM, which kills it and its processes at once; the fleet then exits 1."""
    fleet = fleet_of(1, "--profile", "fleet")
    fleet.wait_for("bridged fleet: 1 of 1 devices ready")
    device = fleet.manifest()["devices"][0]
    procs = fleet.tree()
    os.kill(device["pid"], signal.SIGSTOP)
    fleet.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # the fleet must still wait for the stopped device
    assert fleet.proc.poll() is None  # still waiting for the device
    fleet.proc.send_signal(signal.SIGTERM)
    assert fleet.proc.wait(5) == 1
    assert [(e["index"], e["hint"]) for e in fleet.events("device_killed")] == [(0, "stop asked again")]
    assert not _gone(procs)
    assert not (fleet.dir / "ttyESP0").is_symlink()
    assert not any(name.startswith(f"bridged-{device['pid']}-") for name in os.listdir("/dev/shm"))


@pytest.mark.timeout(120)
def test_device_that_keeps_dying_is_given_up(fleet_of, tmp_path):
    """A device that cannot start (its pty path is a regular file) is restarted with
    backoff, given up after 5 deaths, and a fleet whose every device failed exits 1."""
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "ttyESP0").write_text("not a symlink")
    fleet = fleet_of(1)
    assert fleet.proc.wait(100) == 1, fleet.out()[-3000:]
    died = fleet.events("device_died")
    assert [e["restart_in"] for e in died] == [0.0, 1.0, 2.0, 4.0]
    assert [e["failures"] for e in fleet.events("device_failed")] == [5]
    assert fleet.events("fleet_failed")
    assert fleet.manifest()["devices"][0]["state"] == "failed"
    assert "exists and is not a symlink" in (fleet.dir / "logs" / "0.log").read_text()


@pytest.mark.parametrize("args, message", [
    (("--count", "0"), "--count: 0 is not allowed; allowed: an integer from 1 to 1000"),
    (("--count", "1001"), "--count: 1001 is not allowed; allowed: an integer from 1 to 1000"),
    (("--count", "x"), "argument --count: invalid int value: 'x'"),
    ((), "the following arguments are required: --count"),
    (("--count", "2", "--concurrency", "0"), "--concurrency: 0 is not allowed"),
    (("--count", "2", "--port", "/dev/ttyS0"), "unrecognized arguments: --port"),
])
def test_bad_options_exit_2_naming_the_option(tmp_path, capsys, args, message):
    """A bad --count (or other option) is a usage error: exit 2, one line naming it, no device."""
    assert main(["fleet", "--dir", str(tmp_path / "f"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bridged fleet: ") and message in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "f" / "fleet.json").exists()


def test_bad_config_exits_2_before_any_device(tmp_path):
    """A config error is found once, by the fleet, naming file and key; no device starts."""
    config = tmp_path / "bad.toml"
    config.write_text("[links]\ncount = 9\n")
    result = subprocess.run([sys.executable, "-m", "bridged", "fleet", "--count", "3", "--dir",
                             str(tmp_path / "f"), "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"{config}: links.count" in result.stderr and "from 1 to 5" in result.stderr
    assert not (tmp_path / "f" / "logs").exists()


def test_status_without_a_fleet_is_a_usage_error(tmp_path):
    """fleet status on a directory with no manifest says so and exits 2."""
    result = forkserver.run(["fleet", "status", "--dir", str(tmp_path)], timeout=30)
    assert result.returncode == 2 and "no fleet in" in result.stderr


def test_status_never_opens_the_pty_of_a_device_that_is_not_running(tmp_path, capsys):
    """A fleet that died left its manifest and a link to a pty number since reused (a
    user's terminal, here ours): status neither opens it nor writes AT to it, nor puts
    it in raw mode; nor does it follow a pty path the manifest names outside the fleet."""
    import termios

    directory = tmp_path / "f"
    directory.mkdir()
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ECHO  # a terminal in cooked mode, as a shell's
        (directory / "ttyESP0").symlink_to(os.ttyname(slave))
        dead = subprocess.Popen(["true"])
        dead.wait()
        devices = [{"index": 0, "pid": dead.pid, "state": "ready", "pty": str(directory / "ttyESP0")},
                   {"index": 1, "pid": os.getpid(), "state": "ready", "pty": os.ttyname(slave)}]
        (directory / "fleet.json").write_text(json.dumps({"pid": 0, "running": True, "devices": devices}))
        os.write(master, b"typed by the user\r")  # their pending input must stay theirs
        select.select([master], [], [], 5)
        assert os.read(master, 100) == b"typed by the user\r\n"  # the terminal's echo
        assert main(["fleet", "status", "--dir", str(directory), "--json", "--probe"]) == 1
        rows = json.loads(capsys.readouterr().out)["devices"]
        assert [(r["alive"], r["answering"], r["at_ms"], r["problem"]) for r in rows] == \
            [(False, False, None, "not running"), (False, False, None, "not running")]
        readable, _, _ = select.select([master], [], [], 0.3)
        assert readable == [], os.read(master, 1024)
        assert termios.tcgetattr(slave) == before
        assert select.select([slave], [], [], 5)[0] == [slave]
        assert os.read(slave, 100) == b"typed by the user\n"  # a cooked line (ICRNL)
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.timeout(120)
def test_a_device_that_cannot_be_spawned_is_a_failed_start_not_a_crash(fleet_of, tmp_path):
    """Device 1's log cannot be opened (a directory is in its place): it counts as a failed
    start (backoff, then given up), not a traceback that leaves device 0 to the kernel's
    death signal; the fleet goes on with device 0 and stops it in order."""
    (tmp_path / "fleet" / "logs" / "1.log").mkdir(parents=True)
    fleet = fleet_of(2)
    fleet.wait_for("bridged fleet: 1 of 2 devices ready", timeout=START_TIMEOUT + 20)
    assert "failed: [1]" in fleet.out()
    assert [e["index"] for e in fleet.events("device_spawn_failed")] == [1] * 5
    assert [e["failures"] for e in fleet.events("device_failed")] == [5]
    manifest = fleet.manifest()
    assert [d["state"] for d in manifest["devices"]] == ["ready", "failed"]
    assert manifest["devices"][1]["pid"] == 0
    procs = fleet.tree()
    assert fleet.stop() == 0, fleet.out()[-3000:]
    assert "Traceback" not in fleet.out()
    assert not _gone(procs), "processes left behind"


@pytest.mark.parametrize("mode, owner", [(0o777, None), (0o1777, None), (0o700, 65534)])
def test_a_directory_others_may_write_is_refused(tmp_path, capsys, mode, owner):
    """--dir writable by other users (or theirs) is refused before anything is made in
    it: they could plant D/logs/0.log as a link to a file of ours the fleet appends to."""
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(mode)
    if owner is not None:
        if os.geteuid() != 0:
            pytest.skip("chown needs root")
        os.chown(directory, owner, owner)
    assert main(["fleet", "--count", "1", "--dir", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bridged fleet: --dir: {directory} ") and "other users" in err, err
    assert os.listdir(directory) == []


def test_a_directory_the_fleet_cannot_use_is_a_usage_error(tmp_path, capsys):
    """D/logs is a file (or D/state a dangling link): one line naming it, exit 2, no traceback, no device."""
    directory = tmp_path / "f"
    directory.mkdir(mode=0o700)
    (directory / "logs").write_text("not a directory")
    assert main(["fleet", "--count", "1", "--dir", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bridged fleet: --dir: {directory / 'logs'}: ") and len(err.splitlines()) == 1, err
    (directory / "logs").unlink()
    (directory / "state").rmdir()
    (directory / "state").symlink_to(tmp_path / "nowhere")
    assert main(["fleet", "--count", "1", "--dir", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bridged fleet: --dir: {directory / 'state'}: ") and len(err.splitlines()) == 1, err
    assert not (directory / "fleet.json").exists()


def test_a_long_directory_is_served(tmp_path):
    """A --dir whose D/run/<i>/control.sock passes the 107 bytes of a socket address: every
    device still starts (its control socket is bound through its folder's descriptor)."""
    directory = tmp_path / ("d" * max(1, 100 - len(str(tmp_path))))
    assert len(os.fsencode(directory / "run" / "0" / "control.sock")) > 107
    fleet = FleetRun(tmp_path, 1, directory=directory)
    try:
        fleet.wait_for("bridged fleet: 1 of 1 devices ready")
        assert not fleet.events("device_died")
        assert (directory / "run" / "0" / "control.sock").exists()
    finally:
        assert fleet.stop() == 0, fleet.out()[-3000:]


def test_status_aggregates_links_bytes_and_a_fleet_fault(fleet_of):
    """A link opened on device 0 over its pty shows in its row and in the fleet's totals
    (links open, UART and network bytes); a fault fired by `fleet fault --device 1`
    acts on device 1 only and its count shows in device 1's row and the totals."""
    fleet = fleet_of(2, "--profile", "fleet")
    fleet.wait_for("bridged fleet: 2 of 2 devices ready")
    server = EchoServer()
    host = Host(str(fleet.dir / "ttyESP0"))
    try:
        host.boot()
        host.command(f'AT+CIPSTART="TCP","127.0.0.1",{server.port}'.encode(), timeout=20)
        host.send_data(b"AT+CIPSEND=5", b"hello")
        assert host.read_ipd() == (None, b"hello")
        code, doc = fleet.status_json("--timeout", "5")
        assert code == 0, doc
        assert set(doc) == {"dir", "manager_pid", "manager_running", "totals", "devices"}
        assert doc["manager_pid"] == fleet.proc.pid and doc["manager_running"]
        d0, d1 = doc["devices"]
        assert (d0["index"], d0["answering"], d0["links_open"], d0["net_up"], d0["net_down"]) == (0, True, 1, 5, 5)
        assert d0["uart_up"] >= len(b"AT+CIPSEND=5\r\nhello") and d0["status"]["links"][0]["state"] == "open"
        assert (d1["links_open"], d1["net_up"], d1["uart_up"]) == (0, 0, 0)
        t = doc["totals"]
        assert (t["devices"], t["running"], t["answering"], t["healthy"], t["links_open"]) == (2, 2, 2, 2, 1)
        assert (t["net_up"], t["net_down"], t["uart_up"]) == (5, 5, d0["uart_up"])
        assert t["uart_down"] == d0["uart_down"] + d1["uart_down"] and t["faults"] == {}
        human = fleet.status("--timeout", "5").stdout
        assert "total: 2 of 2 running, 2 answering, 2 healthy; 1 links open;" in human, human

        fired = fleet.fault("at_busy", "--device", "1")
        assert fired.returncode == 0 and fired.stdout == "device 1: at_busy: armed for the next 1 occasion(s)\n", fired
        other = Host(str(fleet.dir / "ttyESP1"))
        try:
            other.read_quiet(0.1)  # ready
            other.write(b"AT\r\n")
            assert other.expect(b"busy p...\r\n").endswith(b"\r\nbusy p...\r\n")
            assert other.command(b"AT").endswith(b"OK\r\n")
        finally:
            other.close()
        assert host.command(b"AT").endswith(b"OK\r\n")  # device 0 untouched
        _code, doc = fleet.status_json("--timeout", "5")
        assert [d["faults"] for d in doc["devices"]] == [{}, {"at_busy": 1}]
        assert doc["totals"]["faults"] == {"at_busy": 1}
        assert "faults injected: at_busy 1" in fleet.status("--timeout", "5").stdout
    finally:
        host.close()
        server.close()


def test_status_does_not_hang_on_a_silent_device(fleet_of):
    """A device that is stopped (SIGSTOP: its control socket accepts, nobody answers)
    is shown as not answering after the 1 s timeout, the others as usual, exit 1; fleet
    fault says the same and still fires on the others."""
    fleet = fleet_of(2, "--profile", "fleet")
    fleet.wait_for("bridged fleet: 2 of 2 devices ready")
    supervisor = psutil.Process(fleet.manifest()["devices"][1]["pid"])
    device = [supervisor, *supervisor.children(recursive=True)]  # the supervisor first: it would kill a silent front
    for p in device:
        p.suspend()
    try:
        started = time.monotonic()
        code, doc = fleet.status_json()
        took = time.monotonic() - started
        human = fleet.status()
        fired = fleet.fault("at_busy", "--all", "--timeout", "1")
    finally:
        for p in reversed(device):
            p.resume()
    assert code == 1 and took < 10, (code, took)
    d0, d1 = doc["devices"]
    assert d0["answering"] and (d1["alive"], d1["answering"], d1["problem"]) == (True, False, "no answer within 1 s")
    assert (doc["totals"]["answering"], doc["totals"]["healthy"]) == (1, 1)
    assert human.returncode == 1 and "NOT ANSWERING: no answer within 1 s" in human.stdout
    assert fired.returncode == 1 and "device 1: no answer within 1 s" in fired.stdout, fired
    assert "fired on 1 of 2 devices; not on [1]" in fired.stdout


def test_status_of_many_devices_lists_the_unhealthy_and_escapes_what_devices_say():
    """Past 50 devices the table lists only the unhealthy ones (--all lists every one), the
    totals sum faults per name, and a fault name or reason from a device cannot put an
    escape sequence or a line of its own on the terminal."""
    from bridged.fleet_status import DeviceRow, render, totals

    rows = [DeviceRow(i, 100 + i, "ready", 0, True, True, None, uptime_s=5, links_open=1, uart_up=10,
                      faults={"at_busy": 1}) for i in range(60)]
    rows[7] = DeviceRow(7, 107, "ready", 2, True, False, "refused: \x1b]0;pwned\x07\nforged")
    rows[8] = DeviceRow(8, 108, "ready", 0, True, True, None, faults={"\x1b[2Jx": 3})
    tot = totals(rows, None)
    assert (tot.devices, tot.answering, tot.healthy, tot.links_open, tot.restarts) == (60, 59, 59, 58, 2)
    assert tot.faults == {"\x1b[2Jx": 3, "at_busy": 58}
    text = render("fleet", rows, tot, None, False)
    assert "\x1b" not in text and "\x07" not in text
    listed = [line.split()[0] for line in text.splitlines()[2:] if line[:4].strip().isdigit()]
    assert listed == ["7"], text
    assert "NOT ANSWERING: refused: \\x1b]0;pwned\\x07\\nforged" in text
    assert "(59 healthy devices not shown; --all shows them)" in text
    every = render("fleet", rows, tot, None, True)
    assert len([line for line in every.splitlines() if line[:4].strip().isdigit()]) == 60
    assert "\\x1b[2Jx 3" in every and "\x1b" not in every


def test_fleet_fault_usage_errors(tmp_path, capsys):
    """A bad fault, key or device, or neither --device nor --all (or a bad status --timeout),
    is exit 2 with one line, before any device is asked."""
    directory = tmp_path / "f"
    directory.mkdir()
    devices = [{"index": 0, "pid": 0, "state": "ready", "pty": str(directory / "ttyESP0")}]
    (directory / "fleet.json").write_text(json.dumps({"pid": 0, "running": False, "devices": devices}))
    for args, message in [(("bogus", "--all"), "unknown fault 'bogus'"),
                          (("at_busy", "x=1", "--all"), "at_busy: x: unknown key"),
                          (("at_busy", "noeq", "--all"), "'noeq' is not key=value"),
                          (("at_busy",), "one of the arguments --device --all is required"),
                          (("at_busy", "--device", "3"), "--device: 3 is not allowed; allowed: 0 to 0")]:
        assert main(["fleet", "fault", "--dir", str(directory), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bridged fleet: ") and message in err and len(err.splitlines()) == 1, err
    assert main(["fleet", "fault", "--dir", str(directory), "at_busy", "--all"]) == 1
    assert capsys.readouterr().out == "device 0: not running\n"
    assert main(["fleet", "status", "--dir", str(directory), "--timeout", "0"]) == 2
    assert "--timeout: 0 is not allowed; allowed: seconds from 0.05 to 60" in capsys.readouterr().err
