"""Opening UDP "connections" the way AT+CIPSTART asks for them.

ESP-AT's UDP link is a bound socket with a current remote: sends go to the
remote (or to the host and port AT+CIPSEND names), and datagrams are received
from anyone.  Remote 255.255.255.255 enables broadcast; a multicast remote
(224.0.0.0/4 or ff00::/8) joins that group (AT+CIPSTART "Notes").
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from bridged.ipc.messages import Connect
from bridged.net.resolver import resolve, sockaddr

__all__ = ["open_udp"]


def _join_group(sock: socket.socket, group: ipaddress.IPv4Address | ipaddress.IPv6Address, local_ip: str) -> None:
    if group.version == 4:
        local = socket.inet_aton(local_ip) if local_ip else b"\0\0\0\0"
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group.packed + local)
        if local_ip:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, local)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group.packed + struct.pack("@I", 0))


async def open_udp(request: Connect, default_timeout_ms: int) -> tuple[socket.socket, tuple]:
    """Return a bound non-blocking UDP socket and the link's remote address.

    Raises:
        OSError: resolution or binding failed (PermissionError for a port
            below 1024 without CAP_NET_BIND_SERVICE).
        TimeoutError: resolution took longer than the timeout.
    """
    v6 = request.link_type.endswith("v6")
    timeout = (request.timeout_ms or default_timeout_ms) / 1000
    family = socket.AF_INET6 if v6 else socket.AF_INET
    address = (await resolve(request.host, family, request.dns_servers, timeout))[0]
    remote = sockaddr(address, request.port)  # keeps a link-local address's zone
    remote_ip = ipaddress.ip_address(address.split("%")[0])
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if remote_ip.version == 4 and remote_ip == ipaddress.IPv4Address("255.255.255.255"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        any_ip = "::" if v6 else "0.0.0.0"
        local_ip = "" if remote_ip.is_multicast else request.local_ip
        sock.bind((local_ip or any_ip, request.local_port))
        if remote_ip.is_multicast:
            _join_group(sock, remote_ip, request.local_ip)
    except BaseException:
        sock.close()
        raise
    return sock, remote
