"""[links] allow / deny end to end: the MCU cannot reach what the gateway fences off.

Loopback plays the gateway: 127.0.0.0/8 is denied (as a gateway's
config/gateway.toml denies it), and one port of 127.0.0.1 is allowed as
the "local broker".  Each refusal must answer as an unreachable host, be
logged (link_refused, with address, port and rule) and be counted.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.harness import Daemon, Demux, EchoServer, udp_peer
from tests.netns import netns_available, veth_pair


def _fence(*allowed_ports: int, extra: str = "") -> str:
    allow = ", ".join(f'"127.0.0.1:{p}"' for p in allowed_ports)
    return f'[links]\ndeny = ["127.0.0.0/8", "0.0.0.0/8"]\nallow = [{allow}]\n{extra}'


@pytest.fixture
def servers():
    broker, other = EchoServer(), EchoServer()
    yield broker, other
    broker.close()
    other.close()


def _boot(daemon):
    host = daemon.host()
    host.boot()
    return host


def _refusals(daemon, count: int, **fields) -> list[dict]:
    return daemon.wait_event("link_refused", count, **fields)


def test_tcp_to_a_denied_destination_is_error_logged_and_counted(make_daemon, servers):
    """AT+CIPSTART to a denied address answers ERROR, logs the rule and counts; the allowed broker connects."""
    broker, other = servers
    daemon = make_daemon(_fence(broker.port))
    host = _boot(daemon)
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % other.port) == b"\r\nERROR\r\n"
    (event,) = _refusals(daemon, 1)
    assert (event["what"], event["address"], event["port"], event["rule"], event["refused"], event["link_id"]) == \
        ("connect", "127.0.0.1", other.port, "deny '127.0.0.0/8'", 1, 0)
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % other.port) == b"\r\nERROR\r\n"
    assert _refusals(daemon, 2)[-1]["refused"] == 2
    time.sleep(0.2)  # a connection would show up within this
    assert other.conns == []  # never reached
    assert host.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % broker.port) == b"CONNECT\r\n\r\nOK\r\n"
    assert Demux(host).send(None, b"ping").endswith(b"SEND OK\r\n")
    assert host.expect(b"ping").endswith(b"ping")


@pytest.mark.parametrize("spelling", [b"127.1", b"0x7f.1", b"0177.0.0.1", b"2130706433"])
def test_ipv4_shorthand_is_caught(make_daemon, servers, spelling):
    """lwIP's IPv4 shorthand for 127.0.0.1 is 127.0.0.1 to the policy."""
    broker, other = servers
    daemon = make_daemon(_fence(broker.port))
    host = _boot(daemon)
    assert host.ask(b'AT+CIPSTART="TCP","%s",%d' % (spelling, other.port)) == b"\r\nERROR\r\n"
    assert _refusals(daemon, 1)[0]["address"] == "127.0.0.1"
    assert host.ask(b'AT+CIPSTART="TCP","%s",%d' % (spelling, broker.port)) == b"CONNECT\r\n\r\nOK\r\n"


def test_ipv4_mapped_ipv6_is_caught(make_daemon, servers):
    """::ffff:127.0.0.1 on a TCPv6 link reaches 127.0.0.1, so it is refused as 127.0.0.1."""
    broker, other = servers
    daemon = make_daemon(_fence(broker.port))
    host = _boot(daemon)
    host.command(b"AT+CIPV6=1")
    assert host.ask(b'AT+CIPSTART="TCPv6","::ffff:127.0.0.1",%d' % other.port) == b"\r\nERROR\r\n"
    event = _refusals(daemon, 1)[0]
    assert (event["address"], event["rule"]) == ("127.0.0.1", "deny '127.0.0.0/8'")
    # The mapped form does reach loopback: the allowed port connects through it.
    assert host.ask(b'AT+CIPSTART="TCPv6","::ffff:127.0.0.1",%d' % broker.port) == b"CONNECT\r\n\r\nOK\r\n"


def test_a_name_is_checked_address_by_address(make_daemon, servers):
    """A name's addresses are checked after resolution: denied ones are skipped (and logged), an allowed one is used."""
    broker, other = servers
    hosts = '[dns]\nhosts = { "denied.test" = ["127.0.0.3", "127.0.0.4"], "mixed.test" = ["127.0.0.5", "127.0.0.1"] }\n'
    daemon = make_daemon(_fence(broker.port, extra=hosts))
    host = _boot(daemon)
    assert host.ask(b'AT+CIPSTART="TCP","denied.test",%d' % broker.port) == b"\r\nERROR\r\n"
    assert [e["address"] for e in _refusals(daemon, 2)] == ["127.0.0.3", "127.0.0.4"]
    assert host.ask(b'AT+CIPSTART="TCP","mixed.test",%d' % broker.port) == b"CONNECT\r\n\r\nOK\r\n"
    assert _refusals(daemon, 3)[-1]["address"] == "127.0.0.5"
    assert host.ask(b"AT+CIPSTATUS").count(b'"127.0.0.1",%d' % broker.port) == 1


def test_ssl_to_a_denied_destination(make_daemon, servers):
    """An SSL link is refused before its TCP connect."""
    broker, other = servers
    daemon = make_daemon(_fence(broker.port))
    host = _boot(daemon)
    assert host.ask(b'AT+CIPSTART="SSL","127.0.0.1",%d' % other.port) == b"\r\nERROR\r\n"
    assert _refusals(daemon, 1)[0]["what"] == "connect"
    time.sleep(0.2)  # a connection would show up within this
    assert other.conns == []


def test_savetranslink_to_a_denied_destination_never_connects(make_daemon, servers):
    """AT+SAVETRANSLINK cannot bring a denied link back at boot: every attempt is refused and counted."""
    broker, other = servers
    daemon = make_daemon(_fence(broker.port))
    host = _boot(daemon)
    assert host.ask(b'AT+SAVETRANSLINK=1,"127.0.0.1",%d,"TCP"' % other.port) == b"\r\nOK\r\n"
    host.write(b"AT+RST\r\n")
    host.expect(b"\r\nready\r\n")
    host.expect(b"\r\n>")
    events = _refusals(daemon, 3)  # the first attempt and reconnects every 100 ms
    assert [e["refused"] for e in events[:3]] == [1, 2, 3]
    assert other.conns == []
    time.sleep(0.3)  # leave passthrough: +++ alone, with quiet either side
    host.write(b"+++")
    time.sleep(1.1)  # the guard time after +++
    host.read_quiet(0.2)
    host.command(b"AT+SAVETRANSLINK=0")


def test_udp_listener_passthrough_to_the_unspecified_address_is_dropped(make_daemon):
    """A UDP link with remote 0.0.0.0 opens (a listener), but its datagrams to 0.0.0.0 (this host) are dropped and counted."""
    peer = udp_peer()
    port = peer.getsockname()[1]
    daemon = make_daemon(_fence())
    host = _boot(daemon)
    assert host.ask(b'AT+CIPSTART="UDP","0.0.0.0",%d' % port) == b"CONNECT\r\n\r\nOK\r\n"
    assert host.ask(b"AT+CIPSEND=4") == b"\r\nERROR\r\n"  # to 0.0.0.0: refused before the prompt
    assert _refusals(daemon, 1)[0]["what"] == "send"
    host.command(b"AT+CIPMODE=1")
    host.command(b"AT+CIPSEND", b">")
    host.write(b"through")
    event = _refusals(daemon, 2)[-1]
    assert (event["what"], event["address"], event["port"]) == ("send", "0.0.0.0", port)
    peer.settimeout(0.5)
    with pytest.raises(TimeoutError):
        peer.recvfrom(100)  # Linux would have delivered it to 127.0.0.1
    peer.close()


def test_cipsend_to_a_denied_udp_remote_is_error(make_daemon):
    """AT+CIPSEND's per-datagram remote is checked: a denied one is ERROR without a prompt, and nothing is sent."""
    home, denied = udp_peer(), udp_peer("127.0.0.2")
    config = '[links]\ndeny = ["127.0.0.2"]\n[dns]\nhosts = { "denied.test" = "127.0.0.2" }\n'
    daemon = make_daemon(config)
    host = _boot(daemon)
    host.command(b"AT+CIPMUX=1")
    assert host.ask(b'AT+CIPSTART=0,"UDP","127.0.0.1",%d' % home.getsockname()[1]) == b"0,CONNECT\r\n\r\nOK\r\n"
    port = denied.getsockname()[1]
    for remote in (b"127.0.0.2", b"127.2", b"denied.test"):
        assert host.ask(b'AT+CIPSEND=0,5,"%s",%d' % (remote, port)) == b"\r\nERROR\r\n"
    events = _refusals(daemon, 3)
    assert [(e["what"], e["address"], e["port"], e["refused"]) for e in events] == \
        [("send", "127.0.0.2", port, n) for n in (1, 2, 3)]
    assert host.ask(b'AT+CIPSTART=1,"UDP","127.0.0.2",%d' % port) == b"\r\nERROR\r\n"  # nor as a link's remote
    assert host.send_data(b"AT+CIPSEND=0,5", b"hello").endswith(b"SEND OK\r\n")
    assert home.recvfrom(100)[0] == b"hello"
    denied.settimeout(0.3)
    with pytest.raises(TimeoutError):
        denied.recvfrom(100)
    home.close()
    denied.close()


def test_udp_datagrams_from_a_denied_source_are_dropped(make_daemon):
    """A mode-2 UDP link neither delivers nor follows a datagram from a denied sender; others still move it."""
    home, denied, other = udp_peer(), udp_peer("127.0.0.2"), udp_peer()
    with udp_peer() as probe:
        local = probe.getsockname()[1]
    daemon = make_daemon('[links]\ndeny = ["127.0.0.2"]\n')
    host = _boot(daemon)
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPDINFO=1")
    answer = host.ask(b'AT+CIPSTART=0,"UDP","127.0.0.1",%d,%d,2' % (home.getsockname()[1], local))
    assert answer == b"0,CONNECT\r\n\r\nOK\r\n"
    for _ in range(3):
        denied.sendto(b"evil", ("127.0.0.1", local))
    event = _refusals(daemon, 1)[0]
    assert (event["what"], event["address"], event["port"]) == ("receive", "127.0.0.2", denied.getsockname()[1])
    assert b'"127.0.0.1",%d,' % home.getsockname()[1] in host.ask(b"AT+CIPSTATE?")  # the remote stayed
    other.sendto(b"good", ("127.0.0.1", local))
    assert host.expect(b"good").endswith(b'+IPD,0,4,"127.0.0.1",%d:good' % other.getsockname()[1])
    assert host.read_quiet(0.2).find(b"evil") == -1
    assert len(_refusals(daemon, 1)) == 1  # one log line for the three, not three
    for s in (home, denied, other):
        s.close()


def _server_denying_127_0_0_2(make_daemon):
    """A daemon denying 127.0.0.2 with an AT+CIPSERVER listening: (daemon, host, port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = make_daemon('[links]\ndeny = ["127.0.0.2"]\n')
    host = _boot(daemon)
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPSERVER=1,%d" % port)
    return daemon, host, port


def test_server_client_from_a_denied_address_is_reset(make_daemon):
    """AT+CIPSERVER resets a client from a denied address at once; the MCU never hears of it."""
    daemon, host, port = _server_denying_127_0_0_2(make_daemon)
    with pytest.raises(ConnectionResetError):  # at the first read, or already in connect under load
        with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)) as evil:
            evil.recv(10)
    event = _refusals(daemon, 1)[0]
    assert (event["what"], event["address"], event["refused"]) == ("accept", "127.0.0.2", 1)
    good = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert host.expect(b"CONNECT\r\n") == b"0,CONNECT\r\n"  # the first client the MCU hears of takes link 0
    good.close()
    host.expect(b"0,CLOSED\r\n")


def test_a_flood_of_denied_server_clients_is_one_log_line(make_daemon):
    """Fifty clients from a denied address within ten seconds are each reset, but logged once."""
    daemon, host, port = _server_denying_127_0_0_2(make_daemon)
    for _ in range(50):
        with pytest.raises(ConnectionResetError):
            with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)) as evil:
                evil.recv(10)
    good = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert host.expect(b"CONNECT\r\n") == b"0,CONNECT\r\n"  # the MCU heard of none of the fifty
    good.close()
    assert [(e["what"], e["refused"]) for e in _refusals(daemon, 1)] == [("accept", 1)]


def test_udp_link_cannot_take_a_port_a_service_shares(make_daemon):
    """A service bound with SO_REUSEADDR (as mDNS responders bind) keeps its port: the link's bind fails."""
    for service_ip in ("127.0.0.1", "0.0.0.0"):
        service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        service.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        service.bind((service_ip, 0))
        service.settimeout(5)
        port = service.getsockname()[1]
        peer = udp_peer()
        daemon = make_daemon()
        host = _boot(daemon)
        answer = host.ask(b'AT+CIPSTART="UDP","127.0.0.1",%d,%d,0' % (peer.getsockname()[1], port))
        assert answer == b"\r\nERROR\r\n", service_ip
        assert daemon.wait_event("connect_failed")[-1]["reason"] == "Address already in use"
        for n in range(3):
            peer.sendto(b"for the service %d" % n, ("127.0.0.1", port))
            assert service.recvfrom(100)[0] == b"for the service %d" % n
        service.close()
        peer.close()


def test_udp_link_binds_the_station_address(host):
    """With the station on lo a UDP link binds 127.0.0.1, not the wildcard: 127.0.0.2 is another host's address."""
    peer = udp_peer()
    with udp_peer() as probe:
        local = probe.getsockname()[1]
    host.command(b"AT+CIPDINFO=1")
    assert host.ask(b'AT+CIPSTART="UDP","127.0.0.1",%d,%d,0' % (peer.getsockname()[1], local)) == \
        b"CONNECT\r\n\r\nOK\r\n"
    peer.sendto(b"elsewhere", ("127.0.0.2", local))
    peer.sendto(b"station", ("127.0.0.1", local))
    assert host.expect(b"station").startswith(b'\r\n+IPD,7,"127.0.0.1"')
    assert b"elsewhere" not in host.read_quiet(0.2)
    peer.close()


def test_local_ports(make_daemon):
    """UDP local ports outside [links] local_ports (by default below 1024) are ERROR with a log line."""
    peer = udp_peer()
    with udp_peer() as a, udp_peer() as b:
        allowed, other = a.getsockname()[1], b.getsockname()[1]
    default = make_daemon()
    host = _boot(default)
    assert host.ask(b'AT+CIPSTART="UDP","127.0.0.1",%d,1023,0' % peer.getsockname()[1]) == b"\r\nERROR\r\n"
    event = default.wait_event("local_port_refused")[0]
    assert event["port"] == 1023
    host.close()
    narrow = make_daemon(f'[links]\nlocal_ports = "{allowed}"\n')
    host = _boot(narrow)
    assert host.ask(b'AT+CIPSTART="UDP","127.0.0.1",%d,%d,0' % (peer.getsockname()[1], other)) == b"\r\nERROR\r\n"
    assert narrow.wait_event("local_port_refused")[0]["port"] == other
    assert host.ask(b'AT+CIPSTART="UDP","127.0.0.1",%d,%d,0' % (peer.getsockname()[1], allowed)) == \
        b"CONNECT\r\n\r\nOK\r\n"
    peer.close()


def test_ipv6_server_binds_the_station_address(host):
    """AT+CIPSERVER "TCPv6" listens on the station's address (::1 on lo), not on every interface."""
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    host.command(b"AT+CIPV6=1")
    host.command(b"AT+CIPMUX=1")
    host.command(b'AT+CIPSERVER=1,%d,"TCPv6"' % port)
    listening = [line.split()[1] for line in open("/proc/net/tcp6").read().splitlines()[1:]
                 if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
    assert listening == ["00000000000000000000000001000000:%04X" % port]  # ::1, in the kernel's byte order


_SERVICE = textwrap.dedent(
    """
    import socket, sys
    group, port = sys.argv[1], int(sys.argv[2])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + bytes(4))
    s.settimeout(10)
    print("ready", flush=True)
    for _ in range(2):
        print(s.recvfrom(100)[0].decode(), flush=True)
    """
)


@pytest.mark.skipif(netns_available() is not None, reason=str(netns_available()))
def test_multicast_link_shares_the_group_port_but_not_unicast(tmp_path):
    """A link joining a group on its port shares it with a local responder (SO_REUSEADDR) and receives
    the group, while unicast to the host's port still goes to the responder alone."""
    with veth_pair() as net:
        daemon = Daemon(tmp_path, wrap=net.exec_a(), station="veth0").start()
        service = subprocess.Popen([*net.exec_a(), sys.executable, "-c", _SERVICE, "239.7.7.9", "5353"],
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert service.stdout.readline().strip() == "ready"
            host = daemon.host()
            host.boot()
            assert host.ask(b'AT+CIPSTART="UDP","239.7.7.9",5353,5353,0') == b"CONNECT\r\n\r\nOK\r\n"
            send = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                    "[s.sendto(d.encode(), (a, 5353)) for a, d in zip(sys.argv[1::2], sys.argv[2::2])]")
            subprocess.run([*net.exec_b(), sys.executable, "-c", send, "239.7.7.9", "group", net.a_ip, "unicast"],
                           check=True, timeout=10)
            assert [service.stdout.readline().strip() for _ in range(2)] == ["group", "unicast"]
            host.expect(b"group")
            assert b"unicast" not in host.read_quiet(0.3)
        finally:
            service.kill()
            service.wait(5)
            assert daemon.stop() == 0
