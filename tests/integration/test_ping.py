"""AT+PING end to end: real ICMP echoes to loopback and to hosts in test namespaces,
the timeout reply, names, IPv6 behind AT+CIPV6, bad parameters, busy p...
while it runs, and the answer when no ICMP socket is allowed."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from bridged.commands.ping import PING_TIMEOUT_S
from tests.harness import Daemon
from tests.netns import netns_available, veth_pair

PING_OK = re.compile(rb"\+PING:(\d+)\r\n\r\nOK\r\n")
TIMED_OUT = b"+PING:TIMEOUT\r\n\r\nERROR\r\n"

needs_netns = pytest.mark.skipif(netns_available() is not None, reason=str(netns_available()))


def _ms(answer: bytes) -> int:
    m = PING_OK.fullmatch(answer)
    assert m, answer
    return int(m.group(1))


def test_ping_loopback(host, daemon):
    """AT+PING to 127.0.0.1 answers +PING:<whole ms> then OK, and sent a real echo."""
    assert _ms(host.ask(b'AT+PING="127.0.0.1"')) < 1000
    event = daemon.wait_event("ping_answered", address="127.0.0.1")[-1]
    assert event["socket"] in ("datagram", "raw")


def test_ping_ipv6_needs_cipv6(host, daemon):
    """::1 is ERROR while AT+CIPV6=0, and answered once AT+CIPV6=1."""
    assert host.ask(b'AT+PING="::1"') == b"\r\nERROR\r\n"
    host.command(b"AT+CIPV6=1")
    assert _ms(host.ask(b'AT+PING="::1"')) < 1000
    daemon.wait_event("ping_answered", address="::1")


def test_ping_by_name(host, daemon):
    """A name is resolved first (IPv4 preferred, AT+CIPV6=1 or not), then pinged."""
    for cipv6 in (b"0", b"1"):
        host.command(b"AT+CIPV6=" + cipv6)
        assert _ms(host.ask(b'AT+PING="localhost"')) < 1000
    answered = daemon.wait_event("ping_answered", count=2, host="localhost")
    assert {e["address"] for e in answered} == {"127.0.0.1"}


@pytest.mark.parametrize("line", [
    b"AT+PING",  # no execute form
    b"AT+PING?",  # no query form
    b"AT+PING=?",  # no test form
    b"AT+PING=127",  # not a quoted string
    b'AT+PING=""',  # empty host
    b'AT+PING="' + b"a" * 65 + b'"',  # longer than a domain name may be
    b'AT+PING="127.0.0.1",1',  # one parameter only
    b'AT+PING="127.0.0.1',  # unterminated quote
])
def test_bad_parameters(host, line):
    """Malformed AT+PING lines answer a bare ERROR, and the session goes on."""
    assert host.ask(line) == b"\r\nERROR\r\n"
    assert host.ask(b"AT") == b"\r\nOK\r\n"


@pytest.mark.parametrize("name", [b"a..test", b"x" * 64, b"bad\x85byte.test"])
def test_names_no_server_could_answer_are_a_timeout(host, daemon, name):
    """An empty or 64-byte label, or a C1 control byte, is +PING:TIMEOUT and ERROR like any
    name that does not resolve (the host resolver's IDNA codec used to raise, answering a
    bare ERROR with command_crashed in the log); the log says why."""
    assert host.ask(b'AT+PING="%s"' % name) == TIMED_OUT
    assert "cannot resolve" in daemon.wait_event("command_error", command="+PING")[-1]["why"]
    assert not daemon.events("command_crashed")


def test_ping_needs_the_station_connected(daemon):
    """Before AT+CWJAP there is no IP to ping from: ERROR, as for the other network commands."""
    host = daemon.host()
    host.expect(b"\r\nready\r\n")
    host.command(b"ATE0")
    assert host.ask(b'AT+PING="127.0.0.1"') == b"\r\nERROR\r\n"
    host.close()


@needs_netns
def test_timeout_with_syslog_prints_the_code_after_the_timeout_line(tmp_path):
    """AT+SYSLOG=1: +PING:TIMEOUT, then the ERR CODE line, then ERROR."""
    # The name is looked up inside a namespace of our own: no DNS query leaves the machine.
    with veth_pair() as net:
        daemon = Daemon(tmp_path, wrap=net.exec_a(), station="veth0").start()
        try:
            host = daemon.host()
            host.boot()
            host.command(b"AT+SYSLOG=1")
            answer = host.ask(b'AT+PING="no-such-host.invalid"')
            assert answer == b"+PING:TIMEOUT\r\nERR CODE:0x010a0000\r\n\r\nERROR\r\n"
        finally:
            assert daemon.stop() == 0


def _ns(ns_exec: tuple[str, ...], *args: str) -> None:
    subprocess.run([*ns_exec, *args], check=True, capture_output=True, timeout=10)


@needs_netns
def test_ping_hosts_in_namespaces(tmp_path):
    """From test host A: B answers over the veth (v4 and v6); B ignoring echoes, an address
    nobody holds, and a name that does not resolve give +PING:TIMEOUT and ERROR in time;
    input meanwhile gets busy p..."""
    with veth_pair() as net:
        daemon = Daemon(tmp_path, wrap=net.exec_a(), station="veth0").start()
        try:
            host = daemon.host()
            host.boot()
            assert _ms(host.ask(b'AT+PING="%s"' % net.b_ip.encode())) < 1000
            host.command(b"AT+CIPV6=1")
            assert _ms(host.ask(b'AT+PING="%s"' % net.b_ip6.encode())) < 1000

            nobody = net.b_ip.rsplit(".", 1)[0] + ".99"
            _expect_timeout(host, nobody)

            _ns(net.exec_b(), "sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1", "net.ipv6.icmp.echo_ignore_all=1")
            _expect_timeout(host, net.b_ip)
            _expect_timeout(host, net.b_ip6)

            # The command blocks: a line sent meanwhile is refused, the ping still ends normally.
            host.write(b'AT+PING="%s"\r\n' % net.b_ip.encode())
            time.sleep(0.2)  # the host's pace: the next line comes while the ping runs
            host.write(b"AT\r\n")
            assert host.expect(b"ERROR\r\n", timeout=PING_TIMEOUT_S + 3) == b"\r\nbusy p...\r\n" + TIMED_OUT
            assert host.ask(b"AT") == b"\r\nOK\r\n"
            daemon.wait_event("busy_refused")

            assert host.ask(b'AT+PING="no-such-host.invalid"', timeout=10) == TIMED_OUT
        finally:
            assert daemon.stop() == 0


def _expect_timeout(host, address: str) -> None:
    start = time.monotonic()
    assert host.ask(b'AT+PING="%s"' % address.encode(), timeout=PING_TIMEOUT_S + 3) == TIMED_OUT
    elapsed = time.monotonic() - start
    assert PING_TIMEOUT_S - 0.05 <= elapsed < PING_TIMEOUT_S + 1.0, elapsed


@needs_netns
@pytest.mark.parametrize("group_range, expected", [("0 2147483647", "datagram"), ("1 0", None)])
def test_without_cap_net_raw(tmp_path, group_range, expected):
    """Without CAP_NET_RAW the daemon pings through a ping socket when ping_group_range allows it;
    when it does not, the MCU gets ERROR and the log says how to allow ICMP."""
    with veth_pair() as net:
        _ns(net.exec_a(), "sysctl", "-qw", f"net.ipv4.ping_group_range={group_range}")
        no_raw = ("setpriv", "--bounding-set", "-net_raw", "--inh-caps", "-net_raw")
        daemon = Daemon(tmp_path, wrap=net.exec_a() + no_raw, station="veth0").start()
        daemon.expected_errors.add("ping_not_permitted")
        try:
            host = daemon.host()
            host.boot()
            answer = host.ask(b'AT+PING="%s"' % net.b_ip.encode())
            if expected:
                assert _ms(answer) < 1000
                assert daemon.wait_event("ping_answered")[-1]["socket"] == expected
            else:
                assert answer == b"\r\nERROR\r\n"
                why = daemon.wait_event("ping_not_permitted")[-1]["why"]
                assert "net.ipv4.ping_group_range" in why and "CAP_NET_RAW" in why
        finally:
            assert daemon.stop() == 0
