"""This host's own addresses: what the ``self`` entry of ``[links] allow/deny`` means.

``self`` is every address this host's stack takes as its own: each
address an interface carries (getifaddrs, through ifaddr); the broadcast
address of each IPv4 network on them and 255.255.255.255, as Linux hands
every broadcast it sends to its own sockets too, whatever the socket
options; the subnet-router anycast address of each IPv6 prefix (the prefix
itself, taken by the host when it forwards); and the addresses that reach
this host whatever the interfaces say: 127.0.0.0/8, 0.0.0.0/8 (Linux
delivers a connection to 0.0.0.0 locally), ::1 and ::.  Multicast groups
are not ``self``: a link's multicast is not looped back to this host
(bridged.links.udp), and the groups do not change where a datagram goes.

The interface addresses are read again when a check comes more than
``ttl`` seconds after the last reading, so an address the gateway gains
(DHCP, a VPN coming up) is ``self`` at most that late, and a process that
checks nothing reads nothing.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable

import ifaddr
import structlog

from bridged.net.policy import Address, Policy

__all__ = ["LocalAddresses", "link_policy", "own_addresses"]

log = structlog.get_logger()

def _interface_addresses() -> frozenset[Address]:
    return own_addresses(ifaddr.get_adapters())


def own_addresses(adapters: list[ifaddr.Adapter]) -> frozenset[Address]:
    """The addresses of ``adapters`` that reach this host (see the module's docstring)."""
    found: set[Address] = set()
    for adapter in adapters:
        for ip in adapter.ips:
            text = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                network = ipaddress.ip_interface(f"{text.partition('%')[0]}/{ip.network_prefix}").network
                found.add(ipaddress.ip_address(text.partition("%")[0]))
            except ValueError:
                continue
            if network.version == 4 and network.prefixlen <= 30:  # /31 and /32 have no broadcast
                found.add(network.broadcast_address)
            elif network.version == 6 and network.prefixlen < 127:  # as Linux's addrconf_join_anycast
                found.add(network.network_address)
    return frozenset(found)


class LocalAddresses:
    """A callable: is this address one of this host's own?  For ``Policy(is_local=...)``."""

    def __init__(self, ttl: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 read: Callable[[], frozenset[Address]] = _interface_addresses) -> None:
        self.ttl = ttl
        self._clock = clock
        self._read = read
        self._addresses: frozenset[Address] = frozenset()
        self._read_at: float | None = None

    def __call__(self, ip: Address) -> bool:
        # 0.0.0.0/8, 127.0.0.0/8 and 255.255.255.255, :: and ::1 by number: this runs for a datagram's check.
        if (int(ip) >> 24 in (0, 127) or int(ip) == 0xFFFF_FFFF) if ip.version == 4 else int(ip) <= 1:
            return True
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self.ttl:
            try:
                self._addresses = self._read()
            except OSError as exc:
                # Keep the last reading: forgetting the host's addresses would let them through.
                log.warning("local_addresses_unreadable", error=str(exc))
            self._read_at = now
        return ip in self._addresses


_local = LocalAddresses()  # one per process: a forked child reads its own addresses


@functools.lru_cache(maxsize=4)
def link_policy(allow: tuple[str, ...], deny: tuple[str, ...], local_ports: str) -> Policy:
    """The Policy of ``[links]`` (bridged.config checked the entries), built once per configuration."""
    return Policy(allow, deny, local_ports, is_local=_local)
