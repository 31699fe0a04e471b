"""Name resolution for every command that takes a host name.

One function, so AT+CIPDOMAIN, AT+CIPSTART, AT+CIPSEND's UDP remote,
AT+PING and AT+CIUPDATE all resolve alike: an address literal is returned
as it is (no lookup), anything else goes to the nameservers AT+CIPDNS set
by hand, or, with AT+CIPDNS "from DHCP", to the host's own resolver (on a
gateway, that is what its DHCP client configured).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Sequence

__all__ = ["resolve", "ResolveError"]


class ResolveError(OSError):
    """The name has no address of the wanted family, or the lookup failed."""


async def resolve(host: str, family: int = socket.AF_UNSPEC, servers: Sequence[str] = (),
                  timeout: float = 5.0) -> list[str]:
    """The addresses of ``host``, in the resolver's order, without duplicates.

    Args:
        family: AF_INET, AF_INET6, or AF_UNSPEC for either.
        servers: nameservers to ask (AT+CIPDNS manual); empty: the host's resolver.
        timeout: seconds for the whole lookup.

    Raises:
        ResolveError: no address of that family, or the lookup failed or timed out.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if family != socket.AF_UNSPEC and (ip.version == 6) != (family == socket.AF_INET6):
            raise ResolveError(f"{host} is not an {'IPv6' if family == socket.AF_INET6 else 'IPv4'} address")
        return [str(ip)]
    if servers:
        raise ResolveError("resolving through AT+CIPDNS servers is not implemented yet")
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, None, family=family, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise ResolveError(f"no answer for {host} within {timeout:g} s") from None
    except OSError as exc:
        raise ResolveError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    found: list[str] = []
    for info in infos:
        address = info[4][0]
        if address not in found:
            found.append(address)
    if not found:
        raise ResolveError(f"no address for {host}")
    return found
