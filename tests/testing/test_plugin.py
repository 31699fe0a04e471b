"""bridged.testing's fixtures used as a firmware test uses them: the real daemon
on a pty, its control socket and its transcript."""

from __future__ import annotations

import os
import re
import time

import pytest

from bridged.testing import ControlRefused, DeviceError, DeviceTimeout, UnknownCommand


def test_a_device_is_ready_with_ready_still_on_its_pty(bridged_device, tmp_path):
    """The fixture returns once the device is ready, in tmp_path, with `ready`
    left on the pty for the MCU and the fast profile (3 Mbaud) by default."""
    assert bridged_device.port == tmp_path / "bridged0" / "tty" and bridged_device.port.exists()
    assert bridged_device.at.expect(b"\r\nready\r\n", 2) == b"\r\nready\r\n"
    assert bridged_device.at.command("AT").text == b"AT\r\n\r\nOK\r\n"
    assert bridged_device.status()["uart"]["baud"] == 3_000_000
    assert bridged_device.state_dir.is_dir() and bridged_device.control_path.is_socket()
    os.kill(bridged_device.pid, 0)  # its own process, alive


@pytest.mark.bridged(profile="esp32", config={"wifi": {"rssi": -70}, "firmware.boot_ms": 0})
def test_the_marker_sets_the_profile_and_config_overrides(bridged_device):
    """@pytest.mark.bridged picks the profile (esp32: 115200 baud) and overrides keys, nested or dotted."""
    at = bridged_device.at
    at.expect(b"\r\nready\r\n")
    at.command("ATE0")
    assert at.command("AT+UART_CUR?").text == b"+UART_CUR:115200,8,1,0,1\r\n\r\nOK\r\n"
    assert at.command('AT+CWJAP="bridged","password"').ok
    assert b",-70," in at.command("AT+CWJAP?").text


@pytest.mark.bridged(config={"firmware": {"boot_ms": 0}})
def test_the_factory_starts_devices_of_their_own(bridged_factory):
    """Each factory device has its own pty, state and control socket: a setting
    stored on one is not on the other; a call's config merges over the marker's."""
    one = bridged_factory()
    two = bridged_factory("second", config={"wifi.rssi": -80})
    assert len({one.port, two.port}) == 2 and len({one.control_path, two.control_path}) == 2
    for device in (one, two):
        device.at.expect(b"\r\nready\r\n")
    assert one.at.command('AT+CWHOSTNAME="first"').ok
    assert b"first" in one.at.command("AT+CWHOSTNAME?").text
    assert b"espressif" in two.at.command("AT+CWHOSTNAME?").text
    assert two.options.config == {"firmware": {"boot_ms": 0}, "wifi": {"rssi": -80}}
    assert two.at.command('AT+CWJAP="bridged","password"').ok
    assert b",-80," in two.at.command("AT+CWJAP?").text
    assert one.status()["uart"]["device"] != two.status()["uart"]["device"]


def test_transcript_waits_find_marks_and_bytes_in_order(bridged_device):
    """wait_for_transcript finds command marks and RX/TX bytes, each match consumed;
    one that never comes times out naming the pattern and the last marks."""
    at = bridged_device.at
    at.expect(b"\r\nready\r\n")
    at.command("AT")
    at.command("AT+GMR")
    at.command("AT")
    first = bridged_device.wait_for_transcript(r"^command name=AT kind=execute$", 5)
    gmr = bridged_device.wait_for_transcript(r"command name=AT\+GMR")
    second = bridged_device.wait_for_transcript(r"^command name=AT kind=execute$", 5)
    assert first.rx < gmr.rx < second.rx and first.fields == {"name": "AT", "kind": "execute"}
    assert bridged_device.wait_for_transcript(b"AT+GMR\r\n", direction="RX") == b"AT+GMR\r\n"
    version = bridged_device.wait_for_transcript(re.compile(rb"AT version:[\d.]+"), direction="TX")
    assert version.startswith(b"AT version:")
    began = time.monotonic()
    with pytest.raises(DeviceTimeout, match=r"(?s)no mark matching 'command name=AT ' .*within 0.5 s.*"
                                            r"command name=AT kind=execute"):
        bridged_device.wait_for_transcript("command name=AT ", 0.5)  # both consumed
    assert time.monotonic() - began < 3


def test_an_unknown_control_command_is_a_clear_error(bridged_device):
    """A command the daemon does not know raises UnknownCommand quoting its answer; a
    refused request raises ControlRefused with the daemon's reason."""
    with pytest.raises(UnknownCommand, match=r"does not know the control command 'no-such'.*known: .*status"):
        bridged_device.request({"cmd": "no-such"})
    with pytest.raises(ControlRefused, match="true or false") as refused:
        bridged_device.request({"cmd": "transcript", "on": "yes"})
    assert not isinstance(refused.value, UnknownCommand)
    assert bridged_device.status()["uart"]["kind"] == "pty"  # it serves on


def test_a_fault_fires_now_and_is_marked_in_the_transcript(bridged_device):
    """device.fault() fires a Wi-Fi drop through the control socket: the MCU sees
    WIFI DISCONNECT and the transcript has the fault's mark."""
    at = bridged_device.at
    at.expect(b"\r\nready\r\n")
    assert at.command('AT+CWJAP="bridged","password"').ok
    reply = bridged_device.fault("wifi_drop", duration_ms=300)
    assert reply["fault"] == "wifi_drop"
    at.expect(b"WIFI DISCONNECT\r\n", 5)
    assert bridged_device.wait_for_transcript(r"^fault .*wifi_drop", 5).kind == "fault"


def test_a_config_error_fails_the_start_with_the_reason(bridged_factory):
    """A bad override stops the device at start: DeviceError with bridged's
    config error and status; the test's teardown does not fail a second time."""
    with pytest.raises(DeviceError, match=r"(?s)exited with status 2 before it was ready.*wifi\.rssi"):
        bridged_factory(config={"wifi": {"rssi": 5}})


def test_a_start_past_its_timeout_says_why_and_leaves_nothing_running(bridged_factory):
    """A device not ready within start_timeout (here a 5 s boot) raises DeviceTimeout
    naming the wait, and is stopped: no process, no pty left."""
    with pytest.raises(DeviceTimeout, match=r"not ready \(no READY=1\) within 0.5 s.*boot_ms"):
        bridged_factory(start_timeout=0.5, config={"firmware.boot_ms": 5000})
    device = bridged_factory.devices[0]
    assert device.exit_code is not None and not device.port.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(device.pid, 0)


def test_a_device_started_from_a_thread_outlives_the_thread(bridged_factory):
    """Devices started in parallel from worker threads keep running once those threads end
    (PR_SET_PDEATHSIG follows the spawning thread: they got SIGTERM and exited 0 mid-test)."""
    import threading

    devices = []
    threads = [threading.Thread(target=lambda i=i: devices.append(bridged_factory(f"t{i}"))) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(devices) == 2
    time.sleep(1.0)  # a SIGTERM'd device takes a moment to stop
    for device in devices:
        assert device.proc.poll() is None, device.log_tail()
        assert device.at.command("AT").ok
