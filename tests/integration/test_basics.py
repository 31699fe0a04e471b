"""Basic and Wi-Fi commands over a real pty, byte for byte as ESP-AT v4.x."""

from __future__ import annotations

import re

import pytest

from tests.harness import Daemon


@pytest.fixture
def daemon(shared_session):
    """The module's tests share one daemon, each on a session AT+RESTORE made
    factory-fresh (conftest.shared_session); conftest's ``host`` boots on it."""
    return shared_session


@pytest.mark.bridged(profile="esp32")
def test_ready_then_echo_on_by_default(bridged_device):
    """The daemon announces ready; echo is on until ATE0, and ATE0 itself is echoed
    (through bridged.testing's fixture and AT client, as a firmware test would)."""
    at = bridged_device.at
    assert at.expect(b"\r\nready\r\n") == b"\r\nready\r\n"
    assert at.command("AT").text == b"AT\r\n\r\nOK\r\n"
    assert at.command("ATE0").text == b"ATE0\r\n\r\nOK\r\n"
    assert at.command("AT").text == b"\r\nOK\r\n"
    assert at.command("ATE1").text == b"\r\nOK\r\n"
    assert at.command("AT").text == b"AT\r\n\r\nOK\r\n"


def test_gmr_satisfies_lwesp_and_names_bridged(host):
    """AT+GMR has ESP-AT's four lines, '- ESP32 -', an AT version >= 3.2 and bridged's name."""
    answer = host.command(b"AT+GMR")
    lines = answer.split(b"\r\n")
    assert re.match(rb"AT version:(\d+)\.(\d+)\.(\d+)\.(\d+)\(bridged-[\d.]+ - ESP32 - \w{3} [ \d]\d \d{4} \d\d:\d\d:\d\d\)$", lines[0])
    version = tuple(int(x) for x in re.match(rb"AT version:([\d.]+)", lines[0]).group(1).split(b"."))
    assert version >= (3, 2, 0, 0)
    assert lines[1].startswith(b"SDK version:")
    assert lines[2].startswith(b"compile time(")
    assert lines[3].startswith(b"Bin version:")
    assert answer.endswith(b"\r\n\r\nOK\r\n")


@pytest.mark.parametrize(
    "command, answer",
    [
        (b"AT+SYSSTORE?", b"+SYSSTORE:1\r\n\r\nOK\r\n"),
        (b"AT+SYSMSG?", b"+SYSMSG:0\r\nOK\r\n"),
        (b"AT+SYSLOG?", b"+SYSLOG:0\r\n\r\nOK\r\n"),
        (b"AT+CWMODE?", b"+CWMODE:1\r\n\r\nOK\r\n"),
        (b"AT+CWAUTOCONN?", b"+CWAUTOCONN:1\r\nOK\r\n"),
        (b"AT+CWDHCP?", b"+CWDHCP:3\r\nOK\r\n"),
        (b"AT+CWHOSTNAME?", b"+CWHOSTNAME:espressif\r\n\r\nOK\r\n"),
        (b"AT+CIPMUX?", b"+CIPMUX:0\r\n\r\nOK\r\n"),
        (b"AT+CIPMODE?", b"+CIPMODE:0\r\n\r\nOK\r\n"),
        (b"AT+CIPDINFO?", b"+CIPDINFO:false\r\nOK\r\n"),
        (b"AT+CIPV6?", b"+CIPV6:0\r\n\r\nOK\r\n"),
        (b"AT+UART_CUR?", b"+UART_CUR:115200,8,1,0,1\r\n\r\nOK\r\n"),
        (b"AT+UART_DEF?", b"+UART_DEF:115200,8,1,0,1\r\n\r\nOK\r\n"),
        (b"AT+SYSRAM?", b"+SYSRAM:148408,84044\r\nOK\r\n"),
    ],
)
def test_factory_defaults(host, command, answer):
    """A fresh ESP32's query answers, including the ones without a blank line."""
    assert host.ask(command) == answer


def test_state_before_and_after_joining(daemon: Daemon):
    """Not connected at boot; CWJAP prints its messages in ESP-AT's order; CWQAP disconnects."""
    h = daemon.host()
    h.expect(b"\r\nready\r\n")
    h.command(b"ATE0")
    assert h.ask(b"AT+CWSTATE?") == b'+CWSTATE:0,""\r\n\r\nOK\r\n'
    assert h.ask(b"AT+CWJAP?") == b"\r\nOK\r\n"
    assert h.ask(b'AT+CIPSTART="TCP","127.0.0.1",9') == b"\r\nERROR\r\n"
    assert h.ask(b'AT+CWJAP="bridged","secret"') == b"WIFI CONNECTED\r\nWIFI GOT IP\r\n\r\nOK\r\n"
    assert h.ask(b"AT+CWSTATE?") == b'+CWSTATE:2,"bridged"\r\n\r\nOK\r\n'
    assert re.match(rb'\+CWJAP:"bridged","[0-9a-f:]{17}",6,-45,0,1,3,0,1\r\n\r\nOK\r\n$', h.ask(b"AT+CWJAP?"))
    assert h.ask(b"AT+CIPSTA?") == (
        b'+CIPSTA:ip:"127.0.0.1"\r\n+CIPSTA:gateway:"0.0.0.0"\r\n+CIPSTA:netmask:"255.0.0.0"\r\n\r\nOK\r\n'
    )
    assert re.match(rb'\+CIFSR:STAIP,"127.0.0.1"\r\n\+CIFSR:STAMAC,"[0-9a-f:]{17}"\r\n\r\nOK\r\n$', h.ask(b"AT+CIFSR"))
    assert re.match(rb'\+CIPSTAMAC:"[0-9a-f:]{17}"\r\n\r\nOK\r\n$', h.ask(b"AT+CIPSTAMAC?"))
    assert h.command(b"AT+CWQAP") == b"\r\nOK\r\n"
    assert h.expect(b"WIFI DISCONNECT\r\n") == b"WIFI DISCONNECT\r\n"
    assert h.ask(b"AT+CWSTATE?") == b'+CWSTATE:4,""\r\n\r\nOK\r\n'


def test_wrong_network_fails_the_esp_at_way(make_daemon):
    """With check_credentials, a wrong password gives +CWJAP:2 and a wrong SSID +CWJAP:3."""
    d = make_daemon('check_credentials = true\npassword = "right"\n')
    h = d.host()
    h.expect(b"\r\nready\r\n")
    h.command(b"ATE0")
    assert h.ask(b'AT+CWJAP="bridged","wrong"') == b"+CWJAP:2\r\n\r\nERROR\r\n"
    assert h.ask(b'AT+CWJAP="other","right"') == b"+CWJAP:3\r\n\r\nERROR\r\n"
    assert h.ask(b'AT+CWJAP="bridged","right"') == b"WIFI CONNECTED\r\nWIFI GOT IP\r\n\r\nOK\r\n"


def test_cwlap_and_its_print_mask(host):
    """The configured network is the one visible AP; AT+CWLAPOPT's mask drops fields."""
    assert re.match(rb'\+CWLAP:\(3,"bridged",-45,"[0-9a-f:]{17}",6,0,0,4,4,7,0\)\r\n\r\nOK\r\n$', host.ask(b"AT+CWLAP"))
    host.command(b"AT+CWLAPOPT=1,31")
    assert re.match(rb'\+CWLAP:\(3,"bridged",-45,"[0-9a-f:]{17}",6\)\r\n\r\nOK\r\n$', host.ask(b"AT+CWLAP"))
    host.command(b"AT+CWLAPOPT=0,6")
    assert host.ask(b"AT+CWLAP") == b'+CWLAP:("bridged",-45)\r\n\r\nOK\r\n'


def test_syslog_prints_error_codes(host):
    """With AT+SYSLOG=1 every ERROR is preceded by its ERR CODE line."""
    host.command(b"AT+SYSLOG=1")
    assert host.ask(b"AT+FAKE") == b"ERR CODE:0x01090000\r\n\r\nERROR\r\n"
    assert host.ask(b"AT+CIPMUX=7") == b"ERR CODE:0x01070001\r\n\r\nERROR\r\n"
    assert host.ask(b"AT+GMR?") == b"ERR CODE:0x010c0000\r\n\r\nERROR\r\n"
    assert host.ask(b"at") == b"ERR CODE:0x01030000\r\n\r\nERROR\r\n"


def test_sysstore_persists_across_restart(daemon: Daemon):
    """Settings made with SYSSTORE=1 survive AT+RST; with SYSSTORE=0 they do not."""
    h = daemon.host()
    h.boot()
    h.command(b"AT+CWMODE=3")
    h.command(b"AT+SYSSTORE=0")
    h.command(b"AT+SYSMSG=3")
    assert h.command(b"AT+RST") == b"\r\nOK\r\n"
    h.expect(b"\r\nready\r\n")
    # Stored credentials + auto-connect: the ESP rejoins by itself after ready.
    h.expect(b"WIFI CONNECTED\r\nWIFI GOT IP\r\n")
    assert h.command(b"AT") == b"AT\r\n\r\nOK\r\n"  # echo is on again after a reset
    h.command(b"ATE0")
    assert h.ask(b"AT+CWMODE?") == b"+CWMODE:3\r\n\r\nOK\r\n"
    assert h.ask(b"AT+SYSMSG?") == b"+SYSMSG:0\r\nOK\r\n"
    assert h.ask(b"AT+SYSSTORE?") == b"+SYSSTORE:1\r\n\r\nOK\r\n"


def test_restore_erases_settings(daemon: Daemon):
    """AT+RESTORE answers OK, erases what was stored and boots again (ready, no auto-join)."""
    h = daemon.host()
    h.boot()
    h.command(b"AT+CWMODE=2")
    assert h.expect(b"WIFI DISCONNECT\r\n") == b"WIFI DISCONNECT\r\n"  # the station is off now
    assert h.command(b"AT+RESTORE") == b"\r\nOK\r\n"
    h.expect(b"\r\nready\r\n")
    h.command(b"ATE0")
    assert h.ask(b"AT+CWMODE?") == b"+CWMODE:1\r\n\r\nOK\r\n"
    assert h.ask(b"AT+CWSTATE?") == b'+CWSTATE:0,""\r\n\r\nOK\r\n'


def test_autoconnect_off_stays_disconnected(daemon: Daemon):
    """AT+CWAUTOCONN=0 (always stored) keeps the ESP off the network after a reset."""
    h = daemon.host()
    h.boot()
    h.command(b"AT+CWAUTOCONN=0")
    h.command(b"AT+RST")
    h.expect(b"\r\nready\r\n")
    h.command(b"ATE0")
    assert h.ask(b"AT+CWAUTOCONN?") == b"+CWAUTOCONN:0\r\nOK\r\n"
    assert h.ask(b"AT+CWSTATE?") == b'+CWSTATE:0,""\r\n\r\nOK\r\n'


def test_uart_cur_answers_at_the_old_speed_then_changes(host):
    """AT+UART_CUR answers OK, then the new settings show in the query; _DEF is stored."""
    assert host.command(b"AT+UART_CUR=921600,8,1,0,3") == b"\r\nOK\r\n"
    assert host.ask(b"AT+UART_CUR?") == b"+UART_CUR:921600,8,1,0,3\r\n\r\nOK\r\n"
    assert host.ask(b"AT+UART_DEF?") == b"+UART_DEF:115200,8,1,0,1\r\n\r\nOK\r\n"
    host.command(b"AT+UART_DEF=230400,8,1,0,0")
    assert host.ask(b"AT+UART_DEF?") == b"+UART_DEF:230400,8,1,0,0\r\n\r\nOK\r\n"
    assert host.ask(b"AT+UART_CUR=9600,8,1,0") == b"\r\nERROR\r\n"  # exactly five parameters


def test_sysmsg_rfpower_hostname_dhcp(host):
    """Settings that drivers send at start-up are accepted and read back."""
    host.command(b"AT+SYSMSG=7")
    assert host.ask(b"AT+SYSMSG?") == b"+SYSMSG:7\r\nOK\r\n"
    host.command(b"AT+RFPOWER=40")
    assert host.ask(b"AT+RFPOWER?") == b"+RFPOWER:40,5,5,5\r\n\r\nOK\r\n"
    host.command(b'AT+CWHOSTNAME="gw-7"')
    assert host.ask(b"AT+CWHOSTNAME?") == b"+CWHOSTNAME:gw-7\r\n\r\nOK\r\n"
    host.command(b"AT+CWDHCP=0,1")
    assert host.ask(b"AT+CWDHCP?") == b"+CWDHCP:2\r\nOK\r\n"
    assert host.ask(b"AT+RFPOWER=20") == b"\r\nERROR\r\n"
