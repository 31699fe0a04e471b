"""[links] deny = ["self"] on a gateway in a LAN (two network namespaces).

Namespace A is the gateway running bridged, with a UDP service of its own
on the wildcard address (as most are); namespace B is another host.  What
the MCU sends to a group or a broadcast address reaches the gateway's own
stack too, so these are the ways past "self" a loopback test cannot show.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import time

import pytest

from tests.harness import Daemon
from tests.netns import netns_available, veth_pair

pytestmark = pytest.mark.skipif(netns_available() is not None, reason=str(netns_available()))

PORT = 7000

_LISTEN = textwrap.dedent(
    """
    import select, socket, sys
    port = int(sys.argv[1])
    socks = []
    for family, anywhere in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((anywhere, port))
        socks.append(s)
    print("ready", flush=True)
    while True:
        for s in select.select(socks, [], [], 60)[0]:
            print(s.recvfrom(2000)[0].decode(), flush=True)
    """
)


class Listener:
    """A UDP service on both families' wildcard address inside a namespace, reporting what it hears."""

    def __init__(self, exec_: tuple[str, ...], port: int = PORT) -> None:
        self.proc = subprocess.Popen([*exec_, sys.executable, "-c", _LISTEN, str(port)],
                                     stdout=subprocess.PIPE, bufsize=0)
        self.buffer = b""
        assert self.heard(10, until=1) == ["ready"]

    def heard(self, wait: float, until: int = 0) -> list[str]:
        """The lines printed within ``wait`` seconds (sooner once ``until`` lines came)."""
        deadline = time.monotonic() + wait
        fd = self.proc.stdout.fileno()
        while (not until or self.buffer.count(b"\n") < until) and time.monotonic() < deadline:
            if select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode() for line in lines]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def lan(tmp_path):
    """(pair, daemon, host, gateway's own service, other host's service) with "self" denied
    (broadcasts to port PORT + 1 allowed)."""
    with veth_pair() as net:
        config = f'[links]\ndeny = ["self"]\nallow = ["255.255.255.255:{PORT + 1}"]\n'
        daemon = Daemon(tmp_path, config, wrap=net.exec_a(), station="veth0").start()
        own, other = Listener(net.exec_a()), Listener(net.exec_b())
        try:
            host = daemon.host()
            host.boot()
            host.command(b"AT+CIPV6=1")
            yield net, daemon, host, own, other
        finally:
            own.close()
            other.close()
            assert daemon.stop() == 0


@pytest.mark.parametrize("link_type, group", [(b"UDP", b"224.0.0.1"), (b"UDPv6", b"ff02::1")])
def test_multicast_reaches_the_lan_but_not_the_gateways_services(lan, link_type, group):
    """A datagram to the all-hosts group leaves for the LAN, but is not looped back to the gateway's own
    service (every host, the gateway too, is in that group)."""
    net, daemon, host, own, other = lan
    assert host.ask(b'AT+CIPSTART="%s","%s",%d' % (link_type, group, PORT)) == b"CONNECT\r\n\r\nOK\r\n"
    host.command(b"AT+CIPSEND=5", b">")
    host.write(b"group")
    host.expect(b"SEND OK\r\n")
    assert other.heard(5, until=1) == ["group"]
    assert own.heard(0.5) == []


def test_broadcasts_are_self(lan):
    """Linux hands every broadcast it sends to its own sockets too, so 255.255.255.255 and the LAN's
    broadcast address are "self": refused as a remote and as AT+CIPSEND's, heard by nobody."""
    net, daemon, host, own, other = lan
    subnet_broadcast = net.a_ip.rsplit(".", 1)[0].encode() + b".255"
    assert host.ask(b'AT+CIPSTART="UDP","255.255.255.255",%d' % PORT) == b"\r\nERROR\r\n"
    assert host.ask(b'AT+CIPSTART="UDP","%s",%d' % (subnet_broadcast, PORT)) == b"\r\nERROR\r\n"
    assert host.ask(b'AT+CIPSTART="UDP","255.255.255.255",%d' % (PORT + 1)) == b"CONNECT\r\n\r\nOK\r\n"
    for remote in (subnet_broadcast, b"255.255.255.255"):
        assert host.ask(b'AT+CIPSEND=5,"%s",%d' % (remote, PORT)) == b"\r\nERROR\r\n"
    assert [e["rule"] for e in daemon.wait_event("link_refused", 4)] == ["deny 'self'"] * 4
    assert own.heard(0.5) == [] and other.heard(0) == []


def test_a_remote_the_gateway_takes_over_is_refused_from_then_on(lan):
    """A passthrough link's remote becomes "self" when the gateway takes its address (a DHCP lease moving):
    datagrams to it stop within the fence's second or two, instead of reaching the gateway's service."""
    net, daemon, host, own, other = lan
    moving = net.a_ip.rsplit(".", 1)[0] + ".50"
    subprocess.run(["ip", "-n", net.b, "addr", "add", f"{moving}/24", "dev", net.b_if], check=True)
    assert host.ask(b'AT+CIPSTART="UDP","%s",%d' % (moving.encode(), PORT)) == b"CONNECT\r\n\r\nOK\r\n"
    host.command(b"AT+CIPMODE=1")
    host.command(b"AT+CIPSEND", b">")
    host.write(b"before")
    assert other.heard(5, until=1) == ["before"]
    subprocess.run(["ip", "-n", net.b, "addr", "del", f"{moving}/24", "dev", net.b_if], check=True)
    subprocess.run(["ip", "-n", net.a, "addr", "add", f"{moving}/24", "dev", net.a_if], check=True)
    time.sleep(2.5)  # the front's and the worker's readings of "self" are at most a second old, each
    host.write(b"after")
    event = daemon.wait_event("link_refused", 1)[0]
    assert (event["what"], event["address"], event["rule"]) == ("send", moving, "deny 'self'")
    assert own.heard(0.5) == [] and other.heard(0) == []


@pytest.mark.parametrize("remote", ["224.0.0.1", "b"])
def test_a_link_sending_from_loopback_reaches_only_the_gateway(lan, remote):
    """With local IP 127.0.0.1 a link's multicast goes out on lo, to the gateway's own sockets whatever
    the loopback option: each datagram must pass as sent to 127.0.0.1 too, so "self" refuses it."""
    net, daemon, host, own, other = lan
    remote = net.b_ip if remote == "b" else remote
    start = b'AT+CIPSTART="UDP","%s",%d,%d,0,"127.0.0.1"' % (remote.encode(), PORT, PORT + 100)
    assert host.ask(start) == b"CONNECT\r\n\r\nOK\r\n"
    assert host.send_data(b'AT+CIPSEND=2,"224.0.0.1",%d' % PORT, b"lo").endswith(b"SEND OK\r\n")
    event = daemon.wait_event("link_refused", 1)[0]
    assert (event["what"], event["address"], event["port"], event["rule"]) == ("send", "127.0.0.1", PORT, "deny 'self'")
    assert own.heard(0.5) == [] and other.heard(0) == []
