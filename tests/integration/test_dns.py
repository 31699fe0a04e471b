"""AT+CIPDOMAIN and AT+CIPDNS end to end: names resolve through the servers the
MCU set, against a DNS server the test runs on 127.0.0.153 (tests/dnsserver.py).

Only loopback addresses are ever asked or connected to; with AT+CIPDNS=0 the
tests use "localhost", which the host resolves from /etc/hosts.
"""

from __future__ import annotations

import os
import re
import time

import pytest
from cryptography import x509

from tests.dnsserver import serving
from tests.harness import Demux, udp_peer
from tests.integration.test_tls import TlsServer, _import, _issue
from tests.shared import SharedDaemon

SERVER_IP = "127.0.0.153"
SILENT_IP = "127.0.0.154"
LONG_NAME = "a" * 60 + "." + "b" * 60 + ".test"  # longer than AT+CIPSTART's 64 bytes
RECORDS = {
    "dual.test": ["127.0.0.7", "::7"],
    "v6only.test": ["::8"],
    "v4only.test": ["127.0.0.9"],
    "peer.test": ["127.0.0.1"],
    "other.test": ["127.0.0.1"],
    "secure.test": ["127.0.0.1"],
    "wrong.test": ["127.0.0.1"],
    LONG_NAME: ["127.0.0.10"],
}


@pytest.fixture(scope="module")
def dns_server():
    with serving(SERVER_IP, RECORDS) as server:
        yield server


@pytest.fixture(scope="module")
def silent_server():
    with serving(SILENT_IP, silent=True) as server:
        yield server


# The SSL test checks certificate dates against the host clock ([sntp] source = "host").
CONFIG = '[sntp]\nsource = "host"\n'


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    """One daemon for the module's tests (tests/shared.py): each starts on a session
    AT+RESTORE made factory-fresh, and sees only its own part of the log."""
    shared = SharedDaemon(tmp_path_factory.mktemp("shared"), CONFIG)
    yield shared
    shared.stop()


@pytest.fixture
def daemon(shared_session):
    return shared_session


@pytest.fixture
def dns_host(daemon, host, dns_server):
    """A joined MCU whose AT+CIPDNS names the test's server."""
    assert host.ask(b'AT+CIPDNS=1,"%s"' % SERVER_IP.encode()) == b"\r\nOK\r\n"
    return daemon, host


# -- AT+CIPDOMAIN -------------------------------------------------------------------------------


@pytest.mark.parametrize("command, answer", [
    (b'AT+CIPDOMAIN="dual.test"', b'+CIPDOMAIN:"127.0.0.7"\r\n\r\nOK\r\n'),
    (b'AT+CIPDOMAIN="dual.test",1', b'+CIPDOMAIN:"127.0.0.7"\r\n\r\nOK\r\n'),
    (b'AT+CIPDOMAIN="dual.test",2', b'+CIPDOMAIN:"127.0.0.7"\r\n\r\nOK\r\n'),
    (b'AT+CIPDOMAIN="dual.test",3', b'+CIPDOMAIN:"::7"\r\n\r\nOK\r\n'),
    (b'AT+CIPDOMAIN="v6only.test"', b'+CIPDOMAIN:"::8"\r\n\r\nOK\r\n'),
    (b'AT+CIPDOMAIN="v6only.test",2', b"\r\nERROR\r\n"),
    (b'AT+CIPDOMAIN="v4only.test",3', b"\r\nERROR\r\n"),
    (b'AT+CIPDOMAIN="v4only.test",1,5000', b'+CIPDOMAIN:"127.0.0.9"\r\n\r\nOK\r\n'),
    (b'AT+CIPDOMAIN="%s"' % LONG_NAME.encode(), b'+CIPDOMAIN:"127.0.0.10"\r\n\r\nOK\r\n'),
])
def test_cipdomain_answers_per_ip_network(dns_host, command, answer):
    """<ip network> 1 prefers IPv4 (IPv6 when there is none), 2 is IPv4 only, 3 IPv6 only; the address is quoted."""
    daemon, host = dns_host
    daemon.expected_errors.add("command_error")
    assert host.ask(command) == answer


def test_cipdomain_literal_is_not_looked_up(dns_host, dns_server):
    """An address literal comes back as it is (IPv4 shorthand as the address it spells) and no query reaches the server."""
    daemon, host = dns_host
    before = len(dns_server.queries)
    assert host.ask(b'AT+CIPDOMAIN="10.1.2.3"') == b'+CIPDOMAIN:"10.1.2.3"\r\n\r\nOK\r\n'
    assert host.ask(b'AT+CIPDOMAIN="::1",3') == b'+CIPDOMAIN:"::1"\r\n\r\nOK\r\n'
    assert host.ask(b'AT+CIPDOMAIN="::1",2') == b"\r\nERROR\r\n"
    assert host.ask(b'AT+CIPDOMAIN="0x7f.1"') == b'+CIPDOMAIN:"127.0.0.1"\r\n\r\nOK\r\n'  # lwIP's ipaddr_aton
    assert len(dns_server.queries) == before


@pytest.mark.parametrize("command, why", [
    (b'AT+CIPDOMAIN="nowhere.test"', "NXDOMAIN"),
    (b'AT+CIPDOMAIN="dual.test",0', "out of range"),
    (b'AT+CIPDOMAIN="dual.test",4', "out of range"),
    (b'AT+CIPDOMAIN="dual.test",1,60001', "out of range"),
    (b'AT+CIPDOMAIN="dual.test",1,-1', "out of range"),
    (b'AT+CIPDOMAIN=""', "empty"),
    (b'AT+CIPDOMAIN="a..test"', "label of 0 bytes"),
    (b'AT+CIPDOMAIN="%s.test"' % (b"x" * 64), "label of 64 bytes"),
    (b'AT+CIPDOMAIN="has space.test"', "printable ASCII"),
    (b"AT+CIPDOMAIN=dual.test", "quoted"),
    (b"AT+CIPDOMAIN", ""),
])
def test_cipdomain_errors_say_why(dns_host, command, why):
    """Bad names and values, and an unknown name, answer ERROR and the log says why."""
    daemon, host = dns_host
    assert host.ask(command) == b"\r\nERROR\r\n"
    if why:
        assert why in daemon.wait_event("command_error", command="+CIPDOMAIN")[-1]["why"]


def test_cipdomain_needs_the_station(daemon, dns_server):
    """Before AT+CWJAP there is no network to ask: ERROR, as for AT+CIPSTART."""
    host = daemon.host()
    host.expect(b"\r\nready\r\n")
    host.command(b"ATE0")
    assert host.ask(b'AT+CIPDOMAIN="dual.test"') == b"\r\nERROR\r\n"
    assert "no ip" in daemon.wait_event("command_error", command="+CIPDOMAIN")[-1]["why"]


def test_cipdomain_timeout_is_honoured(dns_host, silent_server):
    """A server that never answers: the command ends with ERROR within <timeout>; input meanwhile is busy."""
    daemon, host = dns_host
    host.command(b'AT+CIPDNS=1,"%s"' % SILENT_IP.encode())
    started = time.monotonic()
    host.write(b'AT+CIPDOMAIN="slow.test",1,1500\r\n')
    time.sleep(0.3)
    host.write(b"AT\r\n")
    answer = host.expect(b"\r\nERROR\r\n", timeout=5)
    elapsed = time.monotonic() - started
    assert answer == b"\r\nbusy p...\r\n\r\nERROR\r\n"
    assert 1.3 < elapsed < 3.0, elapsed
    assert "slow.test" in silent_server.names_asked()
    assert "within 1.5 s" in daemon.wait_event("command_error", command="+CIPDOMAIN")[-1]["why"]
    assert host.command(b"AT") == b"\r\nOK\r\n"


def test_cipdomain_timeout_0_is_the_profile_connect_timeout(make_daemon, silent_server):
    """<timeout> 0 (the default) waits links.connect_timeout_ms, not forever."""
    daemon = make_daemon("[links]\nconnect_timeout_ms = 1200\n")
    host = daemon.host()
    host.boot()
    host.command(b'AT+CIPDNS=1,"%s"' % SILENT_IP.encode())
    started = time.monotonic()
    assert host.ask(b'AT+CIPDOMAIN="slow.test"', timeout=5) == b"\r\nERROR\r\n"
    assert 1.0 < time.monotonic() - started < 2.8


# -- AT+CIPDNS: the servers the MCU set are the ones asked ---------------------------------------


def test_cipstart_tcp_resolves_through_cipdns(dns_host, dns_server, echo_server):
    """AT+CIPSTART to a name only the test's server knows connects to its address."""
    daemon, host = dns_host
    host.command(b"AT+CIPMUX=1")
    assert host.ask(b'AT+CIPSTART=0,"TCP","peer.test",%d' % echo_server.port) == b"0,CONNECT\r\n\r\nOK\r\n"
    assert ("peer.test", "A") in dns_server.queries
    assert host.ask(b"AT+CIPSTATE?").startswith(b'+CIPSTATE:0,"TCP","127.0.0.1",%d,' % echo_server.port)
    demux = Demux(host)
    assert demux.send(0, b"hello").endswith(b"SEND OK\r\n")
    assert demux.wait_data(0, 5) == b"hello"


def test_cipstart_unknown_name_and_silent_server(dns_host, silent_server, echo_server):
    """An unknown name is ERROR with NXDOMAIN in the log; a silent server ends within <timeout>."""
    daemon, host = dns_host
    daemon.expected_errors.add("connect_failed")
    assert host.ask(b'AT+CIPSTART="TCP","nowhere.test",%d' % echo_server.port) == b"\r\nERROR\r\n"
    assert "NXDOMAIN" in daemon.wait_event("connect_failed", host="nowhere.test")[-1]["reason"]
    host.command(b'AT+CIPDNS=1,"%s"' % SILENT_IP.encode())
    started = time.monotonic()
    answer = host.ask(b'AT+CIPSTART="TCP","slow.test",%d,,,1000' % echo_server.port, timeout=5)
    assert answer == b"\r\nERROR\r\n"
    assert 0.8 < time.monotonic() - started < 2.5
    assert "slow.test" in silent_server.names_asked()


def test_ssl_to_a_name_checks_the_certificate_against_the_name(dns_host, dns_server, tmp_path):
    """SSL to a resolved name sends the name as SNI and checks the certificate against it, not the address."""
    daemon, host = dns_host
    daemon.expected_errors.add("connect_failed")
    ca, ca_id = _issue(tmp_path, "ca", "DNS Test CA", ca=True)
    issued, _ = _issue(tmp_path, "secure", "secure.test", ca_id, sans=(x509.DNSName("secure.test"),))
    server = TlsServer(issued)
    try:
        _import(daemon, "client_ca", 0, ca.cert)
        host.command(b"AT+CIPMUX=1")
        host.command(b"AT+CIPSSLCCONF=5,2,0,0")
        assert host.ask(b'AT+CIPSTART=0,"SSL","secure.test",%d' % server.port) == b"0,CONNECT\r\n\r\nOK\r\n"
        demux = Demux(host)
        assert demux.send(0, b"secret").endswith(b"SEND OK\r\n")
        assert demux.wait_data(0, 6) == b"secret"
        assert server.sni[0] == "secure.test"
        # Same address, another name: the certificate does not name it.
        assert host.ask(b'AT+CIPSTART=1,"SSL","wrong.test",%d' % server.port) == b"\r\nERROR\r\n"
        assert "wrong.test" in daemon.wait_event("connect_failed", host="wrong.test")[-1]["reason"]
        assert ("wrong.test", "A") in dns_server.queries
    finally:
        server.close()


def test_udp_link_and_cipsend_to_names(dns_host, dns_server):
    """A UDP link to a name, and AT+CIPSEND's per-datagram remote given by name, both resolve through AT+CIPDNS."""
    daemon, host = dns_host
    home, other = udp_peer(), udp_peer()
    try:
        host.command(b"AT+CIPMUX=1")
        assert host.ask(b'AT+CIPSTART=2,"UDP","peer.test",%d' % home.getsockname()[1]) == b"2,CONNECT\r\n\r\nOK\r\n"
        host.send_data(b"AT+CIPSEND=2,4", b"home")
        assert home.recvfrom(100)[0] == b"home"
        host.send_data(b'AT+CIPSEND=2,5,"other.test",%d' % other.getsockname()[1], b"there")
        assert other.recvfrom(100)[0] == b"there"
        assert ("other.test", "A") in dns_server.queries
        assert host.ask(b'AT+CIPSEND=2,4,"nowhere.test",%d' % other.getsockname()[1]) == b"\r\nERROR\r\n"
        assert "NXDOMAIN" in daemon.wait_event("command_error", command="+CIPSEND")[-1]["why"]
    finally:
        home.close()
        other.close()


def test_cipsend_to_a_name_no_server_could_answer(daemon, host):
    """AT+CIPSEND's UDP remote with an empty label or a C1 control byte is ERROR saying why,
    through the host resolver too (its IDNA codec used to raise: command_crashed)."""
    home = udp_peer()
    try:
        host.command(b"AT+CIPMUX=1")
        assert host.ask(b'AT+CIPSTART=2,"UDP","127.0.0.1",%d' % home.getsockname()[1]) == b"2,CONNECT\r\n\r\nOK\r\n"
        for name in (b"a..test", b"bad\x85byte.test"):
            assert host.ask(b'AT+CIPSEND=2,4,"%s",%d' % (name, home.getsockname()[1])) == b"\r\nERROR\r\n"
        assert "printable ASCII" in daemon.wait_event("command_error", command="+CIPSEND")[-1]["why"]
        assert not daemon.events("command_crashed")
    finally:
        home.close()


def test_cipdns_0_goes_back_to_the_host_resolver(dns_host, dns_server):
    """With manual servers "localhost" is the test server's NXDOMAIN; AT+CIPDNS=0 asks the host again."""
    daemon, host = dns_host
    assert host.ask(b'AT+CIPDOMAIN="localhost",2') == b"\r\nERROR\r\n"
    assert ("localhost", "A") in dns_server.queries
    host.command(b"AT+CIPDNS=0")
    before = len(dns_server.queries)
    assert host.ask(b'AT+CIPDOMAIN="localhost",2') == b'+CIPDOMAIN:"127.0.0.1"\r\n\r\nOK\r\n'
    assert len(dns_server.queries) == before


def test_cipdns_same_server_in_two_spellings_is_error(host, daemon):
    """The three servers must differ: "::1" and "0::1" are one server (ERROR, and the log says why)."""
    assert host.ask(b'AT+CIPDNS=1,"127.0.0.153","127.0.0.153"') == b"\r\nERROR\r\n"
    assert host.ask(b'AT+CIPDNS=1,"::1","0::1"') == b"\r\nERROR\r\n"
    assert "must differ" in daemon.wait_event("command_error", command="+CIPDNS")[-1]["why"]
    assert host.ask(b"AT+CIPDNS?").startswith(b"+CIPDNS:0,")  # nothing was set


def test_cipdns_sysstore_and_restore(daemon, dns_server):
    """A stored AT+CIPDNS is what the ESP runs with after AT+RST, also once AT+SYSSTORE=0
    (which only stops later sets from being saved, as WiFiEspAT sends at start-up);
    a set with AT+SYSSTORE=0 lasts until AT+RST; AT+RESTORE forgets the stored one."""
    host = daemon.host()
    host.boot()

    def ask(line: bytes) -> bytes:  # without the auto-connect lines a reboot prints in between
        return host.ask(line).replace(b"WIFI CONNECTED\r\n", b"").replace(b"WIFI GOT IP\r\n", b"")

    stored = b'+CIPDNS:1,"%s"\r\n\r\nOK\r\n' % SERVER_IP.encode()
    host.command(b'AT+CIPDNS=1,"%s"' % SERVER_IP.encode())
    host.write(b"AT+RST\r\n")
    host.boot()
    host.command(b"AT+SYSSTORE=0")
    assert ask(b"AT+CIPDNS?") == stored
    before = len(dns_server.queries)
    assert ask(b'AT+CIPDOMAIN="v4only.test"') == b'+CIPDOMAIN:"127.0.0.9"\r\n\r\nOK\r\n'
    assert len(dns_server.queries) > before
    host.command(b'AT+CIPDNS=1,"127.0.0.1"')  # not saved
    assert ask(b"AT+CIPDNS?") == b'+CIPDNS:1,"127.0.0.1"\r\n\r\nOK\r\n'
    host.write(b"AT+RST\r\n")
    host.boot()
    assert ask(b"AT+CIPDNS?") == stored
    host.write(b"AT+RESTORE\r\n")
    host.boot()
    assert ask(b"AT+CIPDNS?").startswith(b"+CIPDNS:0,")


def test_savetranslink_resolves_through_stored_cipdns(daemon, dns_server, echo_server):
    """The boot-time passthrough link of AT+SAVETRANSLINK resolves its name through the stored AT+CIPDNS."""
    host = daemon.host()
    host.boot()
    host.command(b'AT+CIPDNS=1,"%s"' % SERVER_IP.encode())  # AT+SYSSTORE=1: kept across AT+RST
    assert host.ask(b'AT+SAVETRANSLINK=1,"peer.test",%d,"TCP"' % echo_server.port) == b"\r\nOK\r\n"
    host.reset_into_passthrough(echo_server)
    assert ("peer.test", "A") in dns_server.queries
    time.sleep(0.05)
    host.write(b"+++")
    # Out of passthrough before the next command: a front a loaded machine left
    # unscheduled for the guard time read both at once, and the command was data.
    daemon.wait_event("passthrough_left")
    host.command(b"AT+SAVETRANSLINK=0")


def test_ping_resolves_through_cipdns(dns_host, dns_server):
    """AT+PING to a name only the test's server knows pings its address; an
    unknown name is +PING:TIMEOUT and ERROR, as ESP-AT answers it."""
    daemon, host = dns_host
    answer = host.ask(b'AT+PING="peer.test"', timeout=5)
    assert answer.startswith(b"+PING:") and answer.endswith(b"\r\n\r\nOK\r\n"), answer
    assert int(answer[len(b"+PING:"):answer.index(b"\r\n")]) >= 0
    assert ("peer.test", "A") in dns_server.queries
    assert host.ask(b'AT+PING="nowhere.test"', timeout=5) == b"+PING:TIMEOUT\r\n\r\nERROR\r\n"
    assert ("nowhere.test", "A") in dns_server.queries


def _open_fds(pid: int) -> list[str]:
    """What the process holds open, sockets without their inode numbers."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed while we looked
            continue
        found.append(re.sub(r"\[\d+\]$", "", target))
    return sorted(found)


def _settled_fds(pid: int, expected: list[str], timeout: float = 3.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (fds := _open_fds(pid)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return fds


@pytest.mark.parametrize("command", [b'AT+CIPDOMAIN="slow.test",1,60000', b'AT+PING="slow.test"'])
def test_rst_during_a_lookup_leaves_no_socket(make_daemon, silent_server, command):
    """AT+RST while a lookup waits on a silent server: ready comes at once and the front
    holds no more descriptors than before (the query's socket is closed)."""
    daemon = make_daemon(CONFIG)  # its own: the front's pid is read from child_started
    host = daemon.host()
    host.boot()
    front = daemon.wait_event("child_started", role="front")[-1]["pid"]
    host.command(b'AT+CIPDNS=1,"%s"' % SILENT_IP.encode())
    assert host.ask(b'AT+CIPDOMAIN="warm.test",1,200') == b"\r\nERROR\r\n"  # imports dnspython once
    before = _settled_fds(front, _open_fds(front), 0)
    asked = len(silent_server.queries)
    host.write(command + b"\r\n")
    deadline = time.monotonic() + 3
    while len(silent_server.queries) == asked and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(silent_server.queries) > asked
    host.write(b"AT+RST\r\n")
    host.expect(b"\r\nready\r\n", timeout=2)
    assert _settled_fds(front, before) == before
    host.command(b"ATE0")
    assert host.ask(b"AT") == b"\r\nOK\r\n"
