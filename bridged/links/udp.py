"""Opening UDP "connections" the way AT+CIPSTART asks for them.

ESP-AT's UDP link is a bound socket with a current remote: sends go to the
remote (or to the host and port AT+CIPSEND names), and datagrams are received
from anyone.  Remote 255.255.255.255 enables broadcast; a multicast remote
(224.0.0.0/4 or ff00::/8) joins that group (AT+CIPSTART "Notes").

Where a link binds.  The ESP32's only addresses are its station's, so a
link binds the station interface's address (``wifi.station_interface``;
127.0.0.1 or ::1 when that is ``lo``), not the wildcard, which would also
take datagrams sent to the gateway's other addresses.  Exceptions: the
AT+CIPSTART local IP when the MCU gives one; a remote of 255.255.255.255 or
of 0.0.0.0 / :: (a "listener", WiFiEspAT's idiom) binds the wildcard, as
broadcasts reach only a wildcard socket; a multicast remote binds the group
address itself, so it receives the group and nothing sent to the host.

No SO_REUSEADDR, except on a multicast link binding the group's own port
(every member of the group binds that port, mDNS responders among them):
with it a link could bind a port a gateway service holds with SO_REUSEADDR
and take that service's datagrams.

No multicast loopback (IP_MULTICAST_LOOP, IPV6_MULTICAST_LOOP off): the
kernel would hand what a link sends to a group to every socket of this host
on that port, the gateway's own services included (every host is in
224.0.0.1 and ff02::1), past ``[links] deny = ["self"]``.  An ESP32 does
not hear its own multicast either (lwIP leaves loopback off).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable

from bridged.ipc.messages import Connect
from bridged.net.policy import DestinationRefused, Refusal
from bridged.net.resolver import resolve, sockaddr

__all__ = ["open_udp", "loopback_source"]

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _join_group(sock: socket.socket, group: ipaddress.IPv4Address | ipaddress.IPv6Address, local_ip: str,
                ifindex: int) -> None:
    if group.version == 4:
        local = socket.inet_aton(local_ip) if local_ip else b"\0\0\0\0"
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group.packed + local)
        if local_ip:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, local)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group.packed + struct.pack("@I", ifindex))


def _no_check(address: str, port: int) -> Refusal | None:
    return None


def _pick(addresses: list[str], port: int, check: Callable[[str, int], Refusal | None]) -> str:
    """The first address the policy lets the link send to.

    The unspecified address (0.0.0.0, ::) is no destination but a listener
    waiting for its first sender: it opens, and each send is checked.
    """
    refusal = None
    for address in addresses:
        if ipaddress.ip_address(address.split("%")[0]).is_unspecified:
            return address
        refusal = check(address, port)
        if refusal is None:
            return address
    raise DestinationRefused(refusal)


def _group_scope(group: ipaddress.IPv4Address | ipaddress.IPv6Address, ifindex: int) -> int:
    """The interface an IPv6 link-local (ff02::/16) or node-local group needs; 0 for others."""
    return ifindex if group.version == 6 and (group.packed[1] & 0x0F) <= 2 else 0


def _bind_address(request: Connect, remote: ipaddress.IPv4Address | ipaddress.IPv6Address,
                  station_ip: str, ifindex: int) -> tuple:
    port = request.local_port
    if remote.is_multicast:
        if remote.version == 6:
            return str(remote), port, 0, _group_scope(remote, ifindex)
        return str(remote), port
    wildcard = "::" if remote.version == 6 else "0.0.0.0"
    if request.local_ip:
        return request.local_ip, port
    if remote == _BROADCAST or remote.is_unspecified:
        return wildcard, port
    return station_ip or wildcard, port


def loopback_source(sock: socket.socket) -> str | None:
    """The loopback address a UDP link sends from, if it does: bound there, or
    (IPv4) its multicast interface is (the MCU's local IP 127.0.0.1).

    Whatever such a link sends stays on this host, a group's datagram
    included: on ``lo`` it is delivered to this host's sockets, loopback
    option or not.
    """
    sources = [sock.getsockname()[0]]
    if sock.family == socket.AF_INET:
        sources.append(socket.inet_ntoa(sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, 4)))
    for source in sources:
        if ipaddress.ip_address(source.partition("%")[0]).is_loopback:
            return source
    return None


async def open_udp(request: Connect, default_timeout_ms: int,
                   check: Callable[[str, int], Refusal | None] = _no_check,
                   station_ip: str = "", station_index: int = 0) -> tuple[socket.socket, tuple]:
    """Return a bound non-blocking UDP socket and the link's remote address.

    Args:
        check: the policy ([links] allow/deny) for each resolved address.
        station_ip: the station interface's address ("" for none: the wildcard).
        station_index: its interface index, for IPv6 multicast.

    Raises:
        OSError: resolution or binding failed (PermissionError for a port
            below 1024 without CAP_NET_BIND_SERVICE; DestinationRefused when
            the policy refused every address of the remote).
        TimeoutError: resolution took longer than the timeout.
    """
    v6 = request.link_type.endswith("v6")
    timeout = (request.timeout_ms or default_timeout_ms) / 1000
    family = socket.AF_INET6 if v6 else socket.AF_INET
    address = _pick(await resolve(request.host, family, request.dns_servers, timeout), request.port, check)
    remote = sockaddr(address, request.port)  # keeps a link-local address's zone
    remote_ip = ipaddress.ip_address(address.split("%")[0])
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        if remote_ip == _BROADCAST:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if remote_ip.is_multicast and request.local_port == request.port:
            # The group's port is shared by every member on this host (the
            # only SO_REUSEADDR a link sets): see the module's docstring.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(_bind_address(request, remote_ip, station_ip, station_index))
        if remote_ip.is_multicast:
            _join_group(sock, remote_ip, request.local_ip, _group_scope(remote_ip, station_index))
    except BaseException:
        sock.close()
        raise
    return sock, remote
