"""This host's own addresses: what the ``self`` entry of ``[links] allow/deny`` means.

``self`` is every address an interface of this host carries (getifaddrs,
through ifaddr), and the addresses that reach this host whatever the
interfaces say: 127.0.0.0/8, 0.0.0.0/8 (Linux delivers a connection to
0.0.0.0 locally), ::1 and ::.  Broadcast and multicast addresses are not
``self``: deny them by range where the MCU must not use them.

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

__all__ = ["LocalAddresses", "link_policy"]

log = structlog.get_logger()

def _interface_addresses() -> frozenset[Address]:
    found: set[Address] = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                found.add(ipaddress.ip_address(text.partition("%")[0]))
            except ValueError:
                continue
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
        # 0.0.0.0/8 and 127.0.0.0/8, :: and ::1 by number: this runs for a datagram's check.
        if (int(ip) >> 24 in (0, 127)) if ip.version == 4 else int(ip) <= 1:
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
