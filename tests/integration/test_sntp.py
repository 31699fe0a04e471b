"""AT+CIPSNTPCFG / CIPSNTPTIME / CIPSNTPINTV end to end, with SNTP servers of the
test's own on loopback (tests/sntpserver.py, port 123: needs root, else skipped).

Each test has its own 127.0.0.N so tests running at the same time never share
a server.  No test names a public server: the servers are loopback addresses,
and ESP-AT's default names are only ever looked up through AT+CIPDNS pointing
at the test's DNS server (tests/dnsserver.py), which answers them.
"""

from __future__ import annotations

import calendar
import datetime
import ipaddress
import re
import time

import pytest
from cryptography import x509

from tests import dnsserver
from tests.integration.test_tls import TlsServer, _import, _issue
from tests.shared import SharedDaemon
from tests.sntpserver import kiss, reply_at, serving, silent

Y2038 = calendar.timegm((2038, 1, 19, 3, 14, 8))
_TIME = re.compile(rb"\+CIPSNTPTIME:(\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4})\r\nOK\r\n")


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    """One daemon for the module's tests (tests/shared.py), each on a session AT+RESTORE
    made factory-fresh, seeing only its own part of the log.  AT+RESTORE keeps the
    device clock (the RTC): a test that set it (sntp_synced) leaves the next test a new
    daemon, whose clock reads 1970 again."""
    shared = SharedDaemon(tmp_path_factory.mktemp("shared"), retire_after=("sntp_synced",))
    yield shared
    shared.stop()


@pytest.fixture
def daemon(shared_session):
    return shared_session


def since(start: float, at: float) -> callable:
    """A server clock that reads ``at`` when the test starts it and runs on."""
    return lambda: at + (time.monotonic() - start)


def late(seconds: float):
    """A server that answers 2038 after ``seconds`` (the request is then in flight that long)."""

    def answer(request: bytes) -> bytes:
        time.sleep(seconds)
        return reply_at(Y2038)(request)

    return answer


def device_time(host) -> float:
    """AT+CIPSNTPTIME? read back as Unix seconds (the text is in the configured zone)."""
    answer = host.ask(b"AT+CIPSNTPTIME?")
    match = _TIME.fullmatch(answer)  # nothing else (a +TIME_UPDATED) came before it
    assert match, answer
    return calendar.timegm(time.strptime(match.group(1).decode(), "%a %b %d %H:%M:%S %Y"))


def test_cfg_query_before_configuring(host):
    """A fresh boot has no SNTP servers: +CIPSNTPCFG:0,0 with its CRLF, and the clock reads 1970."""
    assert host.ask(b"AT+CIPSNTPCFG?") == b"+CIPSNTPCFG:0,0\r\n\r\nOK\r\n"
    assert device_time(host) < 60


def test_server_time_2038(daemon, host):
    """A server saying 2038-01-19: OK, then +TIME_UPDATED, and AT+CIPSNTPTIME? shows 2038 in the zone set."""
    with serving("127.0.0.123", reply_at(since(time.monotonic(), Y2038))) as server:
        assert host.ask(b'AT+CIPSNTPCFG=1,8,"127.0.0.123"') == b"\r\nOK\r\n"
        host.expect(b"+TIME_UPDATED\r\n", timeout=5)
        assert len(server.requests) == 1
        shown = device_time(host)
        assert abs(shown - (Y2038 + 8 * 3600)) <= 2, time.asctime(time.gmtime(shown))
        assert host.ask(b"AT+CIPSNTPCFG?") == b'+CIPSNTPCFG:1,8,"127.0.0.123"\r\n\r\nOK\r\n'
        assert host.read_quiet(0.5) == b""  # one +TIME_UPDATED only
    assert daemon.events("sntp_synced")[0]["time"].startswith("2038-01-19T03:14")


def test_server_that_never_answers(daemon, host):
    """No answer: no +TIME_UPDATED, and AT+CIPSNTPTIME? keeps the unsynchronised 1970 text."""
    with serving("127.0.0.124", silent) as server:
        assert host.ask(b'AT+CIPSNTPCFG=1,0,"127.0.0.124"') == b"\r\nOK\r\n"
        server.wait_requests(1, timeout=5)
        assert b"TIME_UPDATED" not in host.read_quiet(2.0)
        answer = host.ask(b"AT+CIPSNTPTIME?")
        assert re.fullmatch(rb"\+CIPSNTPTIME:Thu Jan  1 00:0\d:\d\d 1970\r\nOK\r\n", answer), answer


@pytest.mark.parametrize("address, answer, reason", [
    ("127.0.0.125", lambda request: b"\x1c" * 20, "short"),
    ("127.0.0.126", kiss(b"DENY"), "kiss_o_death"),
    ("127.0.0.127", reply_at(Y2038, version=1), "version"),
])
def test_bad_answers_are_ignored_and_logged(daemon, host, address, answer, reason):
    """Garbage, a kiss-o'-death, a wrong version: logged with the reason, no +TIME_UPDATED, clock untouched."""
    with serving(address, answer) as server:
        assert host.ask(b'AT+CIPSNTPCFG=1,0,"%s"' % address.encode()) == b"\r\nOK\r\n"
        server.wait_requests(1, timeout=5)
        ignored = daemon.wait_event("sntp_reply_ignored", timeout=5)
        assert ignored[0]["reason"] == reason and ignored[0]["address"] == address
        assert b"TIME_UPDATED" not in host.read_quiet(1.0)
        assert device_time(host) < 60


def test_answer_from_another_port_is_ignored(daemon, host):
    """A good answer sent from another source port is not taken for the server's."""
    with serving("127.0.0.128", reply_at(Y2038), reply_from_other_port=True) as server:
        assert host.ask(b'AT+CIPSNTPCFG=1,0,"127.0.0.128"') == b"\r\nOK\r\n"
        server.wait_requests(1, timeout=5)
        assert daemon.wait_event("sntp_reply_ignored", timeout=5)[0]["reason"] == "source"
        assert b"TIME_UPDATED" not in host.read_quiet(1.0)
        assert device_time(host) < 60


def test_interval_brings_a_second_query(daemon, host):
    """AT+CIPSNTPINTV=15 (its minimum): a second request 15 s after the first; it moves the clock, silently."""
    answers = iter([Y2038, Y2038 + 86400])
    start = time.monotonic()
    with serving("127.0.0.129", reply_at(lambda: next(answers) + time.monotonic() - start)) as server:
        assert host.ask(b"AT+CIPSNTPINTV=14") == b"\r\nERROR\r\n"
        assert host.ask(b"AT+CIPSNTPINTV=15") == b"\r\nOK\r\n"
        assert host.ask(b"AT+CIPSNTPINTV?") == b"+CIPSNTPINTV:15\r\n\r\nOK\r\n"
        assert host.ask(b'AT+CIPSNTPCFG=1,0,"127.0.0.129"') == b"\r\nOK\r\n"
        host.expect(b"+TIME_UPDATED\r\n", timeout=5)
        (first, _), (second, _) = server.wait_requests(2, timeout=20)
        assert 14.5 <= second - first <= 17
        assert b"TIME_UPDATED" not in host.read_quiet(0.5)
        assert abs(device_time(host) - (Y2038 + 86400 + time.monotonic() - start)) <= 2


def test_default_servers_resolve_through_cipdns(daemon, host):
    """No server given: ESP-AT's three defaults, looked up with the AT+CIPDNS server (the test's)."""
    names = {"cn.ntp.org.cn": ["127.0.0.131"], "ntp.sjtu.edu.cn": ["127.0.0.131"],
             "us.pool.ntp.org": ["127.0.0.131"]}
    with dnsserver.serving("127.0.0.130", names) as dns, serving("127.0.0.131", reply_at(Y2038)):
        assert host.ask(b'AT+CIPDNS=1,"127.0.0.130"') == b"\r\nOK\r\n"
        assert host.ask(b"AT+CIPSNTPCFG=1,0") == b"\r\nOK\r\n"
        host.expect(b"+TIME_UPDATED\r\n", timeout=5)
        assert dns.names_asked()[0] == "cn.ntp.org.cn"
        assert host.ask(b"AT+CIPSNTPCFG?") == (
            b'+CIPSNTPCFG:1,0,"cn.ntp.org.cn","ntp.sjtu.edu.cn","us.pool.ntp.org"\r\n\r\nOK\r\n')
        assert abs(device_time(host) - Y2038) <= 2


def test_cfg_0_stops_a_query_in_flight(daemon, host):
    """AT+CIPSNTPCFG=0 before the server's (late) answer: no +TIME_UPDATED, the servers are forgotten."""

    with serving("127.0.0.132", late(1.0)) as server:
        assert host.ask(b'AT+CIPSNTPCFG=1,0,"127.0.0.132"') == b"\r\nOK\r\n"
        server.wait_requests(1, timeout=5)
        assert host.ask(b"AT+CIPSNTPCFG=0,5") == b"\r\nOK\r\n"
        assert b"TIME_UPDATED" not in host.read_quiet(2.0)
        assert host.ask(b"AT+CIPSNTPCFG?") == b"+CIPSNTPCFG:0,5\r\n\r\nOK\r\n"
        assert device_time(host) < 60 + 5 * 3600


def test_reset_keeps_the_clock_and_forgets_the_servers(daemon, host):
    """AT+RST: the time stays (it lives in the RTC), AT+CIPSNTPCFG's servers and zone do not."""
    with serving("127.0.0.133", reply_at(Y2038)):
        assert host.ask(b'AT+CIPSNTPCFG=1,2,"127.0.0.133"') == b"\r\nOK\r\n"
        host.expect(b"+TIME_UPDATED\r\n", timeout=5)
    host.write(b"AT+RST\r\n")
    host.expect(b"\r\nready\r\n")
    host.read_quiet(0.3)
    host.command(b"ATE0")
    assert host.ask(b"AT+CIPSNTPCFG?") == b"+CIPSNTPCFG:0,0\r\n\r\nOK\r\n"
    assert abs(device_time(host) - Y2038) <= 3


@pytest.mark.parametrize("command", [
    b'AT+CIPSNTPCFG=1,0,""',  # an empty name
    b'AT+CIPSNTPCFG=1,0,"%s"' % (b"a" * 33),  # longer than 32 bytes
    b'AT+CIPSNTPCFG=1,0,,"127.0.0.1"',  # an omitted server before a given one
    b'AT+CIPSNTPCFG=1,,"127.0.0.1"',  # an omitted time zone before a server
    b"AT+CIPSNTPCFG=2,0",
    b"AT+CIPSNTPCFG=1,1460",
])
def test_cfg_refuses_what_esp_at_refuses(daemon, host, command):
    """Empty or over-long names, omitted parameters before given ones, enable 2, a bad zone: ERROR."""
    assert host.ask(command) == b"\r\nERROR\r\n"
    assert host.ask(b"AT+CIPSNTPCFG?") == b"+CIPSNTPCFG:0,0\r\n\r\nOK\r\n"


def test_host_source_answers_from_the_host_clock(make_daemon):
    """[sntp] source = "host": no request goes out, +TIME_UPDATED at once, AT+CIPSNTPTIME? is the host's time."""
    daemon = make_daemon('[sntp]\nsource = "host"\n')
    host = daemon.host()
    host.boot()
    with serving("127.0.0.134", reply_at(Y2038)) as server:
        assert host.command(b'AT+CIPSNTPCFG=1,0,"127.0.0.134"', b"+TIME_UPDATED\r\n") == (
            b"\r\nOK\r\n+TIME_UPDATED\r\n")
        assert abs(device_time(host) - time.time()) <= 2
        time.sleep(0.5)
        assert server.requests == []
    host.close()


def test_verifying_ssl_checks_dates_at_the_device_time(daemon, host, tmp_path):
    """auth_mode 2 with a certificate valid only in 2038: refused at the unsynchronised 1970, taken once SNTP says 2038."""
    daemon.expected_errors.add("connect_failed")
    utc = datetime.timezone.utc
    ca, ca_id = _issue(tmp_path, "ca", "Future CA", ca=True,
                       valid=(datetime.datetime(2030, 1, 1, tzinfo=utc), datetime.datetime(2040, 1, 1, tzinfo=utc)))
    leaf, _ = _issue(tmp_path, "leaf", "localhost", ca_id, sans=(x509.IPAddress(ipaddress.ip_address("127.0.0.1")),),
                     valid=(datetime.datetime(2038, 1, 1, tzinfo=utc), datetime.datetime(2038, 12, 31, tzinfo=utc)))
    server = TlsServer(leaf)
    try:
        _import(daemon, "client_ca", 0, ca.cert)
        host.command(b"AT+CIPMUX=1")
        host.command(b"AT+CIPSSLCCONF=5,2,0,0")
        assert host.ask(b'AT+CIPSTART=0,"SSL","127.0.0.1",%d' % server.port) == b"\r\nERROR\r\n"
        assert "device's time 1970-01-01" in daemon.events("connect_failed")[-1]["reason"]
        with serving("127.0.0.135", reply_at(Y2038)):
            assert host.ask(b'AT+CIPSNTPCFG=1,0,"127.0.0.135"') == b"\r\nOK\r\n"
            host.expect(b"+TIME_UPDATED\r\n", timeout=5)
        assert host.ask(b'AT+CIPSTART=0,"SSL","127.0.0.1",%d' % server.port) == b"0,CONNECT\r\n\r\nOK\r\n"
    finally:
        server.close()


def test_ipv6_server_needs_cipv6(daemon, host):
    """AT+CIPV6=0 (the default): an IPv6 literal server is accepted by AT+CIPSNTPCFG but never asked, the log says why."""
    assert host.ask(b'AT+CIPSNTPCFG=1,0,"::1"') == b"\r\nOK\r\n"
    failed = daemon.wait_event("sntp_resolve_failed", timeout=5)
    assert failed[0]["server"] == "::1" and "not an IPv4 address" in failed[0]["why"]
    assert not daemon.events("sntp_no_answer")
    assert b"TIME_UPDATED" not in host.read_quiet(0.5)


def test_time_updated_never_splits_an_answer(daemon, host):
    """+TIME_UPDATED arriving while the MCU fires queries back to back lands between answers, never inside one."""
    delay = 0.3
    answer = b'+CIPSNTPCFG:1,0,"127.0.0.136"\r\n\r\nOK\r\n'
    with serving("127.0.0.136", late(delay)):
        assert host.ask(b'AT+CIPSNTPCFG=1,0,"127.0.0.136"') == b"\r\nOK\r\n"
        stream = b""
        deadline = time.monotonic() + delay + 3
        while b"+TIME_UPDATED\r\n" not in stream and time.monotonic() < deadline:
            stream += host.ask(b"AT+CIPSNTPCFG?")  # the next command the instant OK arrives
        stream += host.read_quiet(0.3)
    before, found, after = stream.partition(b"+TIME_UPDATED\r\n")
    assert found, stream[-200:]
    assert before.replace(answer, b"") == b"" and after.replace(answer, b"") == b"", stream[-300:]


def test_reset_mid_query_sends_no_late_update(daemon, host):
    """AT+RST while a request waits for its (late) answer: after ready, no +TIME_UPDATED and the clock is untouched."""

    with serving("127.0.0.137", late(1.0)) as server:
        assert host.ask(b'AT+CIPSNTPCFG=1,0,"127.0.0.137"') == b"\r\nOK\r\n"
        server.wait_requests(1, timeout=5)
        host.write(b"AT+RST\r\n")
        host.expect(b"\r\nready\r\n")
        assert b"TIME_UPDATED" not in host.read_quiet(2.0)
        host.command(b"ATE0")
        assert device_time(host) < 60
        assert len(server.requests) == 1


def test_slow_resolver_does_not_hold_the_front(daemon, host):
    """A name whose AT+CIPDNS server never answers: AT commands are answered at once while the lookup waits."""
    with dnsserver.serving("127.0.0.138", silent=True) as dns:
        assert host.ask(b'AT+CIPDNS=1,"127.0.0.138"') == b"\r\nOK\r\n"
        assert host.ask(b'AT+CIPSNTPCFG=1,0,"time.example"') == b"\r\nOK\r\n"
        deadline = time.monotonic() + 5
        while not dns.queries and time.monotonic() < deadline:
            time.sleep(0.02)
        assert dns.queries, "the SNTP client never asked the DNS server"
        started = time.monotonic()
        for _ in range(5):
            assert host.ask(b"AT") == b"\r\nOK\r\n"
        assert time.monotonic() - started < 1.0
        assert not daemon.events("sntp_resolve_failed")  # the lookup was still waiting meanwhile


def test_hard_coded_server_names_meet_the_host_overrides(make_daemon):
    """ESP-AT's default server names, as firmware hard-codes them, resolve through [dns] hosts
    first: the override's address is asked, the AT+CIPDNS server never hears the name."""
    names = {"cn.ntp.org.cn": ["127.0.0.137"]}  # what DNS would say: a server that is not there
    with dnsserver.serving("127.0.0.136", names) as dns, serving("127.0.0.138", reply_at(Y2038)) as server:
        daemon = make_daemon('[dns]\nhosts = { "cn.ntp.org.cn" = "127.0.0.138" }\n')
        host = daemon.host()
        host.boot()
        assert host.ask(b'AT+CIPDNS=1,"127.0.0.136"') == b"\r\nOK\r\n"
        assert host.ask(b"AT+CIPSNTPCFG=1,0") == b"\r\nOK\r\n"
        host.expect(b"+TIME_UPDATED\r\n", timeout=5)
        assert len(server.requests) >= 1
        assert abs(device_time(host) - Y2038) <= 2
        daemon.wait_event("host_override", host="cn.ntp.org.cn", proc="front")
        assert "cn.ntp.org.cn" not in dns.names_asked()
        host.close()
