"""bridged.links.udp on real loopback sockets: where a link binds, what it sends and hears,
the options it sets (broadcast, no multicast loopback, no SO_REUSEADDR), and the policy."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bridged.ipc.messages import Connect
from bridged.links.udp import loopback_source, open_udp
from bridged.net.policy import DestinationRefused, Refusal

pytestmark = pytest.mark.timeout(60)


def _peer(host: str = "127.0.0.1", family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(5)
    return sock


def _open(host: str, port: int, check=None, **kw) -> tuple[socket.socket, tuple]:
    """A UDP link as the worker opens it, the station being 127.0.0.1."""
    request = Connect(conn_id=1, link_type="UDP", host=host, port=port, **kw)
    if check is None:
        return asyncio.run(open_udp(request, 5000, station_ip="127.0.0.1"))
    return asyncio.run(open_udp(request, 5000, check, station_ip="127.0.0.1"))


def test_a_link_binds_the_station_address_and_talks_with_its_remote():
    """Bound to the station's address, not the wildcard; a datagram goes to the remote and back."""
    with _peer() as peer:
        sock, remote = _open("127.0.0.1", peer.getsockname()[1])
        with sock:
            assert remote == peer.getsockname()
            assert sock.getsockname()[0] == "127.0.0.1" and not sock.getblocking()
            sock.sendto(b"hello", remote)
            data, sender = peer.recvfrom(100)
            assert (data, sender) == (b"hello", sock.getsockname())
            peer.sendto(b"back", sender)
            sock.settimeout(5)
            assert sock.recv(100) == b"back"


def test_ipv6_links_bind_the_ipv6_station_address():
    """UDPv6 to ::1 binds ::1 and reaches the peer."""
    with _peer("::1", socket.AF_INET6) as peer:
        request = Connect(conn_id=1, link_type="UDPv6", host="::1", port=peer.getsockname()[1])
        sock, remote = asyncio.run(open_udp(request, 5000, station_ip="::1"))
        with sock:
            assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::1"
            sock.sendto(b"six", remote)
            assert peer.recv(100) == b"six"


def test_the_local_port_and_ip_of_the_command_are_bound():
    """AT+CIPSTART's local port and local IP decide the bound address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock, _ = _open("127.0.0.1", 9, local_port=port, local_ip="127.0.0.1")
    with sock:
        assert sock.getsockname() == ("127.0.0.1", port)


@pytest.mark.parametrize("remote", ["255.255.255.255", "0.0.0.0"])
def test_broadcast_and_listener_remotes_bind_the_wildcard(remote):
    """A broadcast or "listener" remote binds 0.0.0.0 (only a wildcard socket gets broadcasts);
    only the broadcast one may send broadcasts."""
    sock, _ = _open(remote, 9)
    with sock:
        assert sock.getsockname()[0] == "0.0.0.0"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST) == (remote == "255.255.255.255")


def test_no_multicast_loopback_and_no_reuseaddr_on_a_unicast_link():
    """The link would otherwise hear its own group sends or share a port a gateway service holds."""
    sock, _ = _open("127.0.0.1", 9)
    with sock:
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP) == 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0


def test_a_refused_remote_opens_nothing():
    """The policy's refusal is the error; the unspecified remote (a listener) is not checked."""
    seen: list[tuple[str, int]] = []

    def check(address: str, port: int) -> Refusal:
        seen.append((address, port))
        return Refusal(address, port, "deny 'self'")

    with pytest.raises(DestinationRefused, match="deny 'self'"):
        _open("127.0.0.1", 5000, check=check)
    assert seen == [("127.0.0.1", 5000)]
    sock, _ = _open("0.0.0.0", 5000, check=check)
    sock.close()
    assert seen == [("127.0.0.1", 5000)]  # each send is checked instead


def test_loopback_source_tells_a_loopback_bound_link():
    """Bound to 127.0.0.1: its sends stay on this host; bound to the wildcard: not known so."""
    looped, _ = _open("127.0.0.1", 9)
    wide, _ = _open("0.0.0.0", 9)
    with looped, wide:
        assert loopback_source(looped) == "127.0.0.1"
        assert loopback_source(wide) is None
