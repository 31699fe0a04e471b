"""The start-up sequences of real host drivers (esp-at-behavior.md 1.20) complete.

Each sequence is sent as the driver sends it; every command must end with OK
(a driver gives up on ERROR), and what the driver parses must be there.
"""

from __future__ import annotations

import re

import pytest

from tests.harness import Daemon


def _run(host, commands: list[bytes]) -> dict[bytes, bytes]:
    answers = {}
    for command in commands:
        answer = host.ask(command)
        assert answer.endswith(b"\r\nOK\r\n"), (command, answer)
        answers[command] = answer
    return answers


def _reset(daemon: Daemon):
    host = daemon.host()
    host.expect(b"\r\nready\r\n")
    host.write(b"AT+RST\r\n")
    host.expect(b"\r\nready\r\n")
    return host


def _on_profile(make_daemon, profile: str) -> Daemon:
    return make_daemon("", ("--profile", profile))


# Each driver also runs on the oldest firmware profile it is built for (README
# "Firmware personalities"): Zephyr's CONFIG_WIFI_ESP_AT_VERSION_2_1 on 2.2,
# lwESP's minimum 3.2.0.0, WiFiEspAT's "AT 2" mode on 2.4.
@pytest.mark.parametrize("profile", ["esp32", "esp-at-2.2"])
def test_zephyr_esp_at(make_daemon, profile, echo_server):
    """Zephyr's esp_at: init, join, then a TCP link with keep-alive 7200 in passive mode."""
    host = _reset(_on_profile(make_daemon, profile))
    answers = _run(host, [
        b"AT", b"ATE0", b"AT+UART_CUR=115200,8,1,0,0", b"AT", b"AT+GMR", b"AT+CWDHCP=1,1", b"AT+CIPMUX=1",
        b"AT+CWLAPOPT=0,23", b"AT+CWMODE=1,0", b"AT+CWAUTOCONN=0", b"AT+CWMODE=0,0", b"AT+CIPRECVMODE=1",
        b"AT+CIPDINFO=1", b"AT+CIPSTAMAC?", b"AT+CWMODE=1,0",
        b'AT+CWJAP="bridged","zephyr-pass"', b"AT+CIPSTA?", b"AT+CIPDNS?", b"AT+CWJAP?",
        b'AT+CWHOSTNAME="zephyr"',
        b'AT+CIPSTART=0,"TCP","127.0.0.1",%d,7200' % echo_server.port,
    ])
    assert re.search(rb'\+CIPSTAMAC:"[0-9a-f:]{17}"', answers[b"AT+CIPSTAMAC?"])
    assert b"WIFI CONNECTED\r\nWIFI GOT IP\r\n" in answers[b'AT+CWJAP="bridged","zephyr-pass"']
    host.write(b"AT+CIPSEND=0,4\r\n")
    host.expect(b">")
    host.write(b"ping")
    host.expect(b"SEND OK\r\n")
    assert host.expect(b"\r\n+IPD,0,4\r\n") == b"\r\n+IPD,0,4\r\n"
    assert host.ask(b"AT+CIPRECVDATA=0,1460") == b'+CIPRECVDATA:4,"127.0.0.1",%d,ping\r\nOK\r\n' % echo_server.port
    assert host.ask(b"AT+CIPCLOSE=0") == b"0,CLOSED\r\n\r\nOK\r\n"


@pytest.mark.parametrize("profile", ["esp32", "esp-at-3.2"])
def test_lwesp(make_daemon, profile, echo_server):
    """lwESP: RESTORE, version check, SYSMSG=7 and a link that counts as open on +LINK_CONN."""
    host = _reset(_on_profile(make_daemon, profile))
    host.write(b"AT+RESTORE\r\n")
    host.expect(b"\r\nready\r\n")
    answers = _run(host, [
        b"ATE0", b"AT+GMR", b"AT+CMD?", b"AT+SYSMSG=7", b"AT+SYSLOG=1", b"AT+RFPOWER=40", b"AT+CWMODE=3,1",
        b"AT+CWDHCP?", b"AT+CIPMUX=1", b"AT+CIPRECVMODE=1", b"AT+CIPV6=1", b"AT+CWLAPOPT=1,0x7FF",
        b"AT+CIPSTATUS", b"AT+CIPSTATE?", b"AT+CIPAP?", b"AT+CIPAPMAC?", b"AT+CIPDINFO=1",
        b'AT+CWJAP="bridged","lwesp"',
    ])
    version_line = answers[b"AT+GMR"].split(b"\r\n")[0]
    assert b"- ESP32 -" in version_line
    major = tuple(int(x) for x in re.search(rb"AT version:(\d+)\.(\d+)\.(\d+)\.(\d+)", version_line).groups())
    assert major >= (3, 2, 0, 0)
    assert b'+CMD:' in answers[b"AT+CMD?"] and b'"AT+CIPSTART"' in answers[b"AT+CMD?"]
    opened = host.ask(b'AT+CIPSTARTEX="TCP","127.0.0.1",%d' % echo_server.port)
    assert re.match(rb'\+LINK_CONN:0,0,"TCP",0,"127\.0\.0\.1",%d,\d+\r\n\r\nOK\r\n$' % echo_server.port, opened)
    assert host.ask(b"AT+CIPRECVLEN?") == b"+CIPRECVLEN:0,0,0,0,0\r\n\r\nOK\r\n"  # 0 for unused links from 3.0


@pytest.mark.parametrize("profile", ["esp32", "esp-at-2.4"])
def test_wifiespat(make_daemon, profile, echo_server):
    """WiFiEspAT: the stored network comes back after AT+RST; links are taken from 4 down."""
    daemon = _on_profile(make_daemon, profile)
    host = daemon.host()
    host.boot()  # a sketch joined earlier; the credentials are stored
    host.write(b"AT+RST\r\n")
    host.expect(b"\r\nready\r\n")
    host.expect(b"WIFI GOT IP\r\n")
    _run(host, [b"ATE0", b"AT+CIPMUX=1", b"AT+CIPRECVMODE=1", b"AT+SYSSTORE=0", b"AT+CWMODE?"])
    assert host.ask(b"?") == b"\r\nERROR\r\n"  # its probe when a reply is late
    assert host.ask(b'AT+CIPSTART=4,"TCP","127.0.0.1",%d' % echo_server.port) == b"4,CONNECT\r\n\r\nOK\r\n"
    host.write(b"AT+CIPSEND=4,64\r\n")
    host.expect(b">")
    host.write(b"w" * 64)
    assert host.expect(b"SEND OK\r\n") == b"\r\nRecv 64 bytes\r\n\r\nSEND OK\r\n"
    host.expect(b"\r\n+IPD,4,64\r\n")
    assert host.ask(b"AT+CIPRECVDATA=4,64") == b"+CIPRECVDATA:64," + b"w" * 64 + b"\r\nOK\r\n"


def test_adafruit_espatcontrol(make_daemon):
    """Adafruit's ESP_ATcontrol: single connection, status queries and SNTP time (the host's clock)."""
    # source = "host": the sketch names a public server, which a test must never ask.
    host = make_daemon('[sntp]\nsource = "host"\n').host()
    host.boot()
    answers = _run(host, [
        b"AT+CIPMUX=0", b"AT+CWSTATE?", b"AT+CIPSTATE?", b"AT+CIPSTATUS", b"AT+CIFSR",
        b'AT+CIPSNTPCFG=1,-5,"0.pool.ntp.org"', b"AT+CIPSNTPTIME?", b"AT+GMR", b"AT+CWLAP",
    ])
    # +TIME_UPDATED follows the CIPSNTPCFG OK asynchronously, so it may come before any
    # later answer (the driver finds its lines by prefix and skips others); it must come
    # once, whole, and never inside an answer.
    updated = b"+TIME_UPDATED\r\n"
    seen = host.read_quiet(0.2).count(updated)
    for command in (b"AT+CIPSNTPTIME?", b"AT+GMR", b"AT+CWLAP"):
        if answers[command].startswith(updated):
            answers[command] = answers[command][len(updated):]
            seen += 1
    assert seen == 1, answers
    assert not any(updated in answer for answer in answers.values()), answers
    assert re.match(rb"\+CIPSNTPTIME:\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\r\nOK\r\n$",
                    answers[b"AT+CIPSNTPTIME?"])
    assert answers[b"AT+GMR"].startswith(b"AT version:4.")
    assert answers[b"AT+CWLAP"].startswith(b'+CWLAP:(') and answers[b"AT+CWLAP"].count(b"\r\n") == 3
    assert b'+CIFSR:STAIP,"127.0.0.1"' in answers[b"AT+CIFSR"]
    assert answers[b"AT+CWSTATE?"] == b'+CWSTATE:2,"bridged"\r\n\r\nOK\r\n'
