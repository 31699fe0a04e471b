"""[dns] hosts and hosts_file end to end: firmware-style lookups of hard-coded
cloud names (example.com, test.mosquitto.org, mqtt.mydevices.com) answered by
the overrides for every command that takes a name, over the pty.

Before any lookup the MCU points AT+CIPDNS at the test's DNS server on
127.0.0.157 (tests/dnsserver.py), which knows other addresses for those names:
an override that failed would show as a query there (and a wrong address),
never as a query to a public server.  Only loopback is ever addressed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from cryptography import x509

from tests.dnsserver import serving
from tests.harness import Demux, EchoServer, udp_peer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.otaserver import UpdateServer
from tests.integration.test_tls import TlsServer, _import, _issue

SERVER_IP = "127.0.0.157"
RECORDS = {  # what DNS would say
    "example.com": ["127.0.0.99", "::99"],
    "test.mosquitto.org": ["127.0.0.99"],
    "mqtt.mydevices.com": ["127.0.0.99"],
    "plain.test": ["127.0.0.97"],
}
TABLE = '{ "test.mosquitto.org" = "127.0.0.1", "example.com" = ["127.0.0.2", "::1"], "v6.example.com" = "::1" }'
HOSTS_FILE = (
    "# the bench's broker\n"
    "127.0.0.1   mqtt.mydevices.com  broker.example.net\n"
    "127.0.0.5   example.com    # [dns] hosts names it too, and wins\n"
)
OVERRIDDEN = {"example.com", "test.mosquitto.org", "v6.example.com", "mqtt.mydevices.com", "broker.example.net"}
PING_OK = re.compile(rb"\+PING:\d+\r\n\r\nOK\r\n")


@pytest.fixture(scope="module")
def dns_server():
    with serving(SERVER_IP, RECORDS) as server:
        yield server


@pytest.fixture
def bench(make_daemon, tmp_path, dns_server):
    """A daemon with the overrides, and a joined MCU whose AT+CIPDNS (stored) names the test's server."""
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS_FILE)
    # source = "host": the SSL test verifies certificate dates, which need a device time.
    daemon = make_daemon(f'[dns]\nhosts = {TABLE}\nhosts_file = "{hosts}"\n[sntp]\nsource = "host"\n')
    daemon.hosts_path = hosts
    host = daemon.host()
    host.boot()
    host.command(b'AT+CIPDNS=1,"%s"' % SERVER_IP.encode())
    yield daemon, host
    host.close()
    asked = set(dns_server.names_asked()) & OVERRIDDEN
    assert not asked, f"overridden names reached DNS: {asked}"


@pytest.mark.parametrize("command, answer", [
    (b'AT+CIPDOMAIN="example.com"', b'+CIPDOMAIN:"127.0.0.2"\r\n\r\nOK\r\n'),  # the table, not the file's .5
    (b'AT+CIPDOMAIN="EXAMPLE.com."', b'+CIPDOMAIN:"127.0.0.2"\r\n\r\nOK\r\n'),
    (b'AT+CIPDOMAIN="example.com",2', b'+CIPDOMAIN:"127.0.0.2"\r\n\r\nOK\r\n'),
    (b'AT+CIPDOMAIN="example.com",3', b'+CIPDOMAIN:"::1"\r\n\r\nOK\r\n'),
    (b'AT+CIPDOMAIN="test.mosquitto.org",1,5000', b'+CIPDOMAIN:"127.0.0.1"\r\n\r\nOK\r\n'),
    (b'AT+CIPDOMAIN="test.mosquitto.org",3', b"\r\nERROR\r\n"),  # IPv4 only: not found, not asked
    (b'AT+CIPDOMAIN="v6.example.com"', b'+CIPDOMAIN:"::1"\r\n\r\nOK\r\n'),  # network 1: IPv6 when no IPv4
    (b'AT+CIPDOMAIN="v6.example.com",2', b"\r\nERROR\r\n"),
    (b'AT+CIPDOMAIN="mqtt.mydevices.com"', b'+CIPDOMAIN:"127.0.0.1"\r\n\r\nOK\r\n'),  # from the file
    (b'AT+CIPDOMAIN="broker.example.net",2', b'+CIPDOMAIN:"127.0.0.1"\r\n\r\nOK\r\n'),  # a second name on a line
])
def test_cipdomain_answers_hard_coded_names_from_the_overrides(bench, command, answer):
    """AT+CIPDOMAIN of an overridden name answers the override's address of the <ip network>
    asked, or ERROR when it has none, without a DNS query; the use is logged."""
    daemon, host = bench
    daemon.expected_errors.add("command_error")
    assert host.ask(command) == answer
    name = command.split(b'"')[1].decode()
    used = daemon.wait_event("host_override", host=name, proc="front")[-1]
    if b"OK" in answer:  # the first of them (network 1 gets both families, IPv4 first)
        assert used["addresses"][0] == answer.split(b'"')[1].decode()
    else:
        assert used["addresses"] == []
    if answer == b"\r\nERROR\r\n":
        assert "overridden" in daemon.wait_event("command_error", command="+CIPDOMAIN")[-1]["why"]


def test_names_not_overridden_still_ask_dns(bench, dns_server):
    """Another name goes to the AT+CIPDNS server as before: the server is reachable,
    so its silence about the overridden names means something."""
    daemon, host = bench
    assert host.ask(b'AT+CIPDOMAIN="plain.test"') == b'+CIPDOMAIN:"127.0.0.97"\r\n\r\nOK\r\n'
    assert ("plain.test", "A") in dns_server.queries
    assert not daemon.events("host_override")


def test_cipstart_and_cipstartex_to_an_overridden_name(bench, echo_server):
    """AT+CIPSTART and AT+CIPSTARTEX to overridden names reach the loopback echo
    server; the link worker logs the override."""
    daemon, host = bench
    host.command(b"AT+CIPMUX=1")
    port = echo_server.port
    assert host.ask(b'AT+CIPSTART=0,"TCP","test.mosquitto.org",%d' % port) == b"0,CONNECT\r\n\r\nOK\r\n"
    assert host.ask(b"AT+CIPSTATE?").startswith(b'+CIPSTATE:0,"TCP","127.0.0.1",%d,' % port)
    demux = Demux(host)
    assert demux.send(0, b"hello broker").endswith(b"SEND OK\r\n")
    assert demux.wait_data(0, 12) == b"hello broker"
    used = daemon.wait_event("host_override", host="test.mosquitto.org", proc="link")[-1]
    assert used["addresses"] == ["127.0.0.1"] and used["link_id"] == 0
    answer = host.ask(b'AT+CIPSTARTEX="TCP","mqtt.mydevices.com",%d' % port)
    assert re.fullmatch(rb"[1-4],CONNECT\r\n\r\nOK\r\n", answer), answer
    daemon.wait_event("host_override", host="mqtt.mydevices.com", proc="link")


def test_cipstart_tcpv6_takes_the_ipv6_address(bench):
    """A TCPv6 link (AT+CIPV6=1) to example.com takes its IPv6 override; a TCP link its IPv4 one."""
    daemon, host = bench
    daemon.expected_errors.add("connect_failed")
    server = EchoServer(socket.AF_INET6, "::1")
    try:
        host.command(b"AT+CIPV6=1")
        assert host.ask(b'AT+CIPSTART="TCPv6","example.com",%d' % server.port) == b"CONNECT\r\n\r\nOK\r\n"
        assert host.ask(b"AT+CIPSTATE?").startswith(b'+CIPSTATE:0,"TCPv6","::1",%d,' % server.port)
        host.command(b"AT+CIPCLOSE")
        # Nothing listens on 127.0.0.2 at that port: refused, after no DNS query.
        assert host.ask(b'AT+CIPSTART="TCP","example.com",%d' % server.port) == b"\r\nERROR\r\n"
        daemon.wait_event("connect_failed", host="example.com")
        used = daemon.wait_event("host_override", host="example.com", proc="link", count=2)
        assert [e["addresses"] for e in used[-2:]] == [["::1"], ["127.0.0.2"]]
    finally:
        server.close()


def test_udp_link_and_cipsend_remote_by_overridden_name(bench):
    """A UDP link to test.mosquitto.org, and AT+CIPSEND's per-datagram remote given as a
    file-overridden name, reach loopback sockets; an IPv6-only name on an IPv4 link is ERROR."""
    daemon, host = bench
    daemon.expected_errors.add("command_error")
    home, other = udp_peer(), udp_peer()
    try:
        host.command(b"AT+CIPMUX=1")
        assert host.ask(b'AT+CIPSTART=2,"UDP","test.mosquitto.org",%d' % home.getsockname()[1]) \
            == b"2,CONNECT\r\n\r\nOK\r\n"
        host.send_data(b"AT+CIPSEND=2,4", b"home")
        assert home.recvfrom(100)[0] == b"home"
        host.send_data(b'AT+CIPSEND=2,5,"broker.example.net",%d' % other.getsockname()[1], b"there")
        assert other.recvfrom(100)[0] == b"there"
        assert daemon.wait_event("host_override", host="broker.example.net", proc="front")[-1]["addresses"] \
            == ["127.0.0.1"]
        assert host.ask(b'AT+CIPSEND=2,4,"v6.example.com",%d' % other.getsockname()[1]) == b"\r\nERROR\r\n"
        assert "overridden" in daemon.wait_event("command_error", command="+CIPSEND")[-1]["why"]
    finally:
        home.close()
        other.close()


def test_ping_by_overridden_name(bench):
    """AT+PING example.com pings the override's IPv4 address (with AT+CIPV6=1 too: IPv4 first);
    an IPv6-only name is +PING:TIMEOUT while AT+CIPV6=0 and pinged once it is 1."""
    daemon, host = bench
    assert PING_OK.fullmatch(host.ask(b'AT+PING="example.com"', timeout=5))
    assert daemon.wait_event("ping_answered", host="example.com")[-1]["address"] == "127.0.0.2"
    assert host.ask(b'AT+PING="v6.example.com"', timeout=5) == b"+PING:TIMEOUT\r\n\r\nERROR\r\n"
    host.command(b"AT+CIPV6=1")
    assert PING_OK.fullmatch(host.ask(b'AT+PING="example.com"', timeout=5))
    assert PING_OK.fullmatch(host.ask(b'AT+PING="v6.example.com"', timeout=5))
    answered = daemon.wait_event("ping_answered", count=2, host="example.com")
    assert [e["address"] for e in answered] == ["127.0.0.2", "127.0.0.2"]
    assert daemon.wait_event("ping_answered", host="v6.example.com")[-1]["address"] == "::1"


def test_savetranslink_to_an_overridden_name(bench, echo_server):
    """The boot-time passthrough link of AT+SAVETRANSLINK to test.mosquitto.org connects to the override's address."""
    daemon, host = bench
    assert host.ask(b'AT+SAVETRANSLINK=1,"test.mosquitto.org",%d,"TCP"' % echo_server.port) == b"\r\nOK\r\n"
    host.reset_into_passthrough(echo_server)
    daemon.wait_event("host_override", host="test.mosquitto.org", proc="link")
    time.sleep(0.05)  # +++ wants silence around it
    host.write(b"+++")
    daemon.wait_event("passthrough_left")  # out of passthrough before the command (not a fixed 50 ms)
    host.command(b"AT+SAVETRANSLINK=0")


def test_passthrough_reconnects_through_the_override(bench):
    """A dropped passthrough link to an overridden name reconnects to the override's address, resolving it again."""
    daemon, host = bench
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    try:
        assert host.ask(b'AT+CIPSTART="TCP","mqtt.mydevices.com",%d' % server.getsockname()[1]) \
            == b"CONNECT\r\n\r\nOK\r\n"
        first, _ = server.accept()
        host.command(b"AT+CIPRECONNINTV=2")
        host.command(b"AT+CIPMODE=1")
        host.command(b"AT+CIPSEND", b">")
        first.close()
        second, _ = server.accept()
        second.settimeout(5)
        daemon.wait_event("passthrough_reconnected")  # the front sends again from here on
        host.write(b"after")
        assert second.recv(100) == b"after"
        daemon.wait_event("host_override", host="mqtt.mydevices.com", proc="link", count=2)
        second.close()
        time.sleep(0.05)  # +++ wants silence around it
        host.write(b"+++")
        time.sleep(0.05)  # +++ wants silence around it
    finally:
        server.close()


def test_ssl_link_keeps_the_name_for_sni_and_the_certificate(bench, tmp_path):
    """An SSL link to an overridden name connects to the override's address but sends the
    name as SNI and verifies the server's certificate against the name (auth mode 2)."""
    daemon, host = bench
    ca, ca_id = _issue(tmp_path, "ca", "Bench CA", ca=True)
    issued, _ = _issue(tmp_path, "broker", "test.mosquitto.org", ca_id,
                       sans=(x509.DNSName("test.mosquitto.org"),))
    server = TlsServer(issued)
    try:
        _import(daemon, "client_ca", 0, ca.cert)
        host.command(b"AT+CIPMUX=1")
        host.command(b"AT+CIPSSLCCONF=0,2,0,0")
        assert host.ask(b'AT+CIPSTART=0,"SSL","test.mosquitto.org",%d' % server.port) == b"0,CONNECT\r\n\r\nOK\r\n"
        assert server.sni == ["test.mosquitto.org"]
        demux = Demux(host)
        assert demux.send(0, b"over tls").endswith(b"SEND OK\r\n")
        assert demux.wait_data(0, 8) == b"over tls"
        daemon.wait_event("host_override", host="test.mosquitto.org", proc="link")
    finally:
        server.close()


def test_update_server_by_overridden_name(make_daemon, dns_server):
    """AT+CIPFWVER? reaches an [ota] server named by a host name only [dns] hosts knows;
    the request still names the host (Host header), not the address."""
    server = UpdateServer(Ed25519PrivateKey.generate())  # plain http: CIPFWVER asks for no image
    try:
        daemon = make_daemon(f'[ota]\nserver = "http://updates.bench.test:{server.port}"\ntoken = "t"\ninsecure_http = true\n'
                             '[dns]\nhosts = { "updates.bench.test" = "127.0.0.1" }\n')
        host = daemon.host()
        host.boot()
        host.command(b'AT+CIPDNS=1,"%s"' % SERVER_IP.encode())
        assert host.ask(b"AT+CIPFWVER?").endswith(b'+CIPFWVER:"v4.1.2.0"\r\n\r\nOK\r\n')
        assert server.requests[0][1]["Host"] == f"updates.bench.test:{server.port}"
        daemon.wait_event("host_override", host="updates.bench.test", proc="front")
        host.close()
    finally:
        server.close()
    assert "updates.bench.test" not in dns_server.names_asked()


def test_a_restarted_worker_has_the_table(bench, echo_server):
    """A link worker killed and forked again by the supervisor resolves overridden names as before."""
    daemon, host = bench
    daemon.expected_errors.update({"child_died", "worker_died"})
    pid = daemon.worker_pid(0)
    os.kill(pid, signal.SIGKILL)
    started = daemon.wait_event("child_started", role="link", link_id=0, count=2)[-1]["pid"]
    assert started != pid
    daemon.wait_event("worker_ready", link_id=0, pid=started)  # the new one, not a request the old one lost
    assert host.ask(b'AT+CIPSTART="TCP","test.mosquitto.org",%d' % echo_server.port) == b"CONNECT\r\n\r\nOK\r\n"
    used = daemon.wait_event("host_override", host="test.mosquitto.org", proc="link")[-1]
    assert used["link_id"] == 0 and used["addresses"] == ["127.0.0.1"]


def test_reload_reaches_the_link_workers(bench):
    """After SIGHUP with an edited hosts file, a link worker connects to the name's new address."""
    daemon, host = bench
    server = EchoServer(host="127.0.0.6")
    try:
        daemon.hosts_path.write_text("127.0.0.6 mqtt.mydevices.com\n")
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_event("reloading")
        host.expect(b"\r\nready\r\n", timeout=10)
        host.command(b"ATE0")
        host.command(b'AT+CWJAP="bridged","password"')
        assert host.ask(b'AT+CIPSTART="TCP","mqtt.mydevices.com",%d' % server.port) == b"CONNECT\r\n\r\nOK\r\n"
        assert daemon.wait_event("host_override", host="mqtt.mydevices.com", proc="link")[-1]["addresses"] \
            == ["127.0.0.6"]
    finally:
        server.close()


def test_reload_picks_up_an_edited_hosts_file(bench):
    """SIGHUP after an edit of the hosts file restarts the session with the new
    addresses; an edit that breaks a line is refused (file and line named) and the old table stays."""
    daemon, host = bench
    daemon.expected_errors.add("reload_refused")
    assert host.ask(b'AT+CIPDOMAIN="mqtt.mydevices.com"') == b'+CIPDOMAIN:"127.0.0.1"\r\n\r\nOK\r\n'
    daemon.hosts_path.write_text("127.0.0.6 mqtt.mydevices.com\n")
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.wait_event("reloading")[-1]["changed"] == ["dns.hosts_file"]
    host.expect(b"\r\nready\r\n", timeout=10)
    host.command(b"ATE0")
    host.command(b'AT+CWJAP="bridged","password"')
    assert host.ask(b'AT+CIPDOMAIN="mqtt.mydevices.com"') == b'+CIPDOMAIN:"127.0.0.6"\r\n\r\nOK\r\n'
    assert host.ask(b'AT+CIPDOMAIN="example.com"') == b'+CIPDOMAIN:"127.0.0.2"\r\n\r\nOK\r\n'  # the table stays
    daemon.hosts_path.write_text("127.0.0.7 mqtt.mydevices.com\n127.0.0.7 bad..name\n")
    daemon.proc.send_signal(signal.SIGHUP)
    refused = daemon.wait_event("reload_refused")[-1]["error"]
    assert f"dns.hosts_file: {daemon.hosts_path}, line 2: 'bad..name' is not a host name" in refused
    assert host.ask(b'AT+CIPDOMAIN="mqtt.mydevices.com"') == b'+CIPDOMAIN:"127.0.0.6"\r\n\r\nOK\r\n'


def test_a_broken_hosts_file_stops_the_start(tmp_path):
    """bridged run with a malformed hosts file exits 2 with one line naming the
    config, the key, the file and the line."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 ok.test\n127.0.0.1\n")
    cfg = tmp_path / "bridged.toml"
    cfg.write_text(f'[dns]\nhosts_file = "{hosts}"\n')
    command = [sys.executable, "-m", "bridged", "run", "--config", str(cfg),
               "--pty", str(tmp_path / "tty"), "--state-dir", str(tmp_path / "state")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"bridged: {cfg}: dns.hosts_file: {hosts}, line 2: address '127.0.0.1' without a host name; allowed: "
        "lines of an address and one or more host names, separated by blanks; '#' starts a comment (hosts(5))"]
    assert not (tmp_path / "tty").exists()


def _private_dirty_mb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) // 1024
    raise AssertionError(f"no Private_Dirty for {pid}")


def test_children_share_the_supervisors_table(make_daemon, tmp_path, echo_server):
    """With 100 000 names in the hosts file, the front and each link worker answer from the
    supervisor's table without a private copy: a copy cost each child 30 MB (100 MB for a
    16 MB file, six children past the unit's MemoryMax=512M); a child idles at about 5 MB."""
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"0.0.0.0 ad{n}.tracker.example.com\n" for n in range(100_000))
                     + "127.0.0.1 last.test\n")
    daemon = make_daemon(f'[dns]\nhosts_file = "{hosts}"\n')
    host = daemon.host()
    try:
        host.boot()
        assert host.ask(b'AT+CIPDOMAIN="ad99999.tracker.example.com"') == b'+CIPDOMAIN:"0.0.0.0"\r\n\r\nOK\r\n'
        assert host.ask(b'AT+CIPSTART="TCP","last.test",%d' % echo_server.port) == b"CONNECT\r\n\r\nOK\r\n"
        daemon.wait_event("host_override", host="last.test", proc="link")
        children = {(e["role"], e.get("link_id")): e["pid"] for e in daemon.events("child_started")}
        assert len(children) == 6
        private = {child: _private_dirty_mb(pid) for child, pid in children.items()}
        assert max(private.values()) < 15, private
    finally:
        host.close()
