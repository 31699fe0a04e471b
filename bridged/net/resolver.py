"""Name resolution for every command that takes a host name.

One function, so AT+CIPDOMAIN, AT+CIPSTART, AT+CIPSEND's UDP remote,
AT+PING and AT+CIUPDATE all resolve alike: an address literal is returned
as it is (no lookup), anything else goes to the nameservers AT+CIPDNS set
by hand, or, with AT+CIPDNS "from DHCP", to the host's own resolver (on a
gateway, that is what its DHCP client configured).

AT+CIUPDATE passes no servers: the update server is the admin's, never
looked up with the nameservers the MCU set.

With AF_UNSPEC the IPv4 addresses come first, as lwIP's default address
type (IPv4, then IPv6) orders them: AT+CIPDOMAIN's <ip network> 1.

Host name overrides ([dns] hosts and hosts_file, see bridged.net.hosts) are
consulted here, after the literal check and before any server, so every
caller meets them.  The supervisor installs them in each process it forks
(``set_overrides``).  An overridden name never reaches DNS: asked for a
family it has no address of, it is "not found", as with nss files.

Injected DNS faults (``dns_fail``, ``dns_slow``, bridged.faults) are drawn
here too, per lookup of a name (never for an address literal), before the
overrides: the process that draws them installs a hook (`set_fault_hook`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from types import MappingProxyType
from typing import Awaitable, Callable, Mapping, Sequence

import structlog

__all__ = ["resolve", "ResolveError", "name_problem", "sockaddr", "MAX_NAME", "MAX_LABEL",
           "set_overrides", "set_fault_hook", "draw_faults", "normal_name", "is_address"]

log = structlog.get_logger()

MAX_NAME = 253  # bytes of a DNS name in text form, without the root's final dot
MAX_LABEL = 63


class ResolveError(OSError):
    """The name has no address of the wanted family, or the lookup failed."""


# Name (as normal_name gives it) -> addresses, from [dns] hosts and hosts_file.
_overrides: Mapping[str, tuple[str, ...]] = MappingProxyType({})


# (host, timeout) -> the timeout left; raises ResolveError for a lookup that fails by a fault.
FaultHook = Callable[[str, float], Awaitable[float]]
_fault_hook: FaultHook | None = None


def set_fault_hook(hook: FaultHook | None) -> None:
    """Draw this process's DNS faults on every lookup of a name (None: none)."""
    global _fault_hook
    _fault_hook = hook


async def draw_faults(host: str, timeout: float) -> float:
    """This process's DNS faults for a lookup another process does (a link worker resolves
    AT+CIPSTART's host): the timeout left; ResolveError when the lookup fails by a fault."""
    if _fault_hook is None or _literal(host) is not None or name_problem(host) is not None:
        return timeout
    return await _fault_hook(host, timeout)


def set_overrides(table: Mapping[str, tuple[str, ...]]) -> None:
    """Make ``table`` answer this process's lookups of its names, before any DNS server.

    Keys are names as ``normal_name`` gives them; values valid address
    literals (bridged.config checked them).  An empty table turns overriding off.
    The table is used as it is, not copied: a forked child shares the one its
    supervisor built (``hosts.overrides`` gives a read-only one).
    """
    global _overrides
    _overrides = table


def normal_name(name: str) -> str:
    """``name`` as resolvers compare names: case folded, one final dot dropped."""
    return (name[:-1] if name.endswith(".") else name).lower()


def is_address(host: str) -> bool:
    """Whether ``host`` is an address literal, which resolve returns without a lookup."""
    return _literal(host) is not None


async def resolve(host: str, family: int = socket.AF_UNSPEC, servers: Sequence[str] = (),
                  timeout: float = 5.0) -> list[str]:
    """The addresses of ``host``, IPv4 first, without duplicates.

    Args:
        family: AF_INET, AF_INET6, or AF_UNSPEC for either.
        servers: nameservers to ask (AT+CIPDNS manual); empty: the host's resolver.
        timeout: seconds for the whole lookup.

    Raises:
        ResolveError: no address of that family, or the lookup failed or timed out.
    """
    ip = _literal(host)
    if ip is not None:
        if family != socket.AF_UNSPEC and (ip.version == 6) != (family == socket.AF_INET6):
            raise ResolveError(f"{host} is not an {'IPv6' if family == socket.AF_INET6 else 'IPv4'} address")
        return [str(ip)]
    problem = name_problem(host)
    if problem is not None:
        # Refused before any lookup: the host resolver's IDNA codec raises
        # UnicodeError on such names, which no caller expects.
        raise ResolveError(problem)
    if _fault_hook is not None:
        timeout = await _fault_hook(host, timeout)
    overridden = _overrides.get(normal_name(host))
    if overridden is not None:
        return _overridden(host, family, overridden)
    try:
        async with asyncio.timeout(timeout):
            if servers:
                found = await _ask_servers(host, family, servers, timeout)
            else:
                found = await _ask_host(host, family)
    except TimeoutError:
        raise ResolveError(f"no answer for {host} within {timeout:g} s") from None
    if not found:
        raise ResolveError(f"no address for {host}")
    return sorted(dict.fromkeys(found), key=lambda address: ":" in address)  # stable: IPv4 first


def _overridden(host: str, family: int, addresses: tuple[str, ...]) -> list[str]:
    """The override's answer: its addresses of ``family``, IPv4 first; none is "not found"."""
    wanted = [a for a in addresses if family == socket.AF_UNSPEC or (":" in a) == (family == socket.AF_INET6)]
    kind = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}.get(family, "any")
    log.info("host_override", host=host, family=kind, addresses=wanted)
    if not wanted:
        raise ResolveError(f"{host} is overridden ([dns] hosts) without an {kind} address; DNS is not asked")
    return sorted(wanted, key=lambda address: ":" in address)


def sockaddr(address: str, port: int) -> tuple:
    """The socket address for one of resolve's answers and a port.

    An IPv6 link-local address may carry its zone ("fe80::1%eth0"): a
    hand-made (address, port, 0, 0) would set the scope id to 0 and the
    kernel refuses (EINVAL) to reach a link-local address without one.
    """
    if ":" not in address:
        return address, port
    info = socket.getaddrinfo(address, port, socket.AF_INET6, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    return info[0][4]


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` spells, if it is one.

    Besides the usual forms, IPv4 in inet_aton's shorthand ("127.1",
    "0x7f.0.0.1", "1.2.3" = 1.2.0.3): lwIP's ipaddr_aton, which ESP-AT's
    lookups try before asking DNS, accepts them, and so does the host's
    resolver; without this, manual AT+CIPDNS servers were asked for them.
    """
    if not host or (":" not in host and not _SHORTHAND_CHARS.issuperset(host)):
        return None  # a name (IPv6 has a colon; IPv4 no other letters); inet_aton would take "1.2.3.4 x"
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if ":" in host:
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


_SHORTHAND_CHARS = frozenset("0123456789abcdefABCDEFxX.")


def name_problem(name: str) -> str | None:
    """Why no DNS server could answer ``name``, or None when it could.

    Empty or overlong names and labels, and any byte outside printable ASCII
    (the MCU's bytes arrive as latin-1; lwIP sends them as they are, with no
    IDNA, so no real server would know such a name).  A final dot is allowed.
    """
    bare = name[:-1] if name.endswith(".") else name
    if not bare:
        return "domain name is empty"
    if len(bare) > MAX_NAME:
        return f"domain name is {len(bare)} bytes long, DNS allows {MAX_NAME}"
    if not all(33 <= ord(c) <= 126 for c in bare):
        return f"domain name {name!r} has a space or a byte outside printable ASCII"
    for label in bare.split("."):
        if not 1 <= len(label) <= MAX_LABEL:
            return f"domain name {name!r} has a label of {len(label)} bytes (1..{MAX_LABEL})"
    return None


async def _ask_host(host: str, family: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, family=family, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ResolveError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    return [info[4][0] for info in infos]


async def _ask_servers(host: str, family: int, servers: Sequence[str], timeout: float) -> list[str]:
    """A and/or AAAA from ``servers`` only (no resolv.conf, no search list, no cache).

    AF_UNSPEC asks for AAAA only when the name has no A record, as lwIP does
    for its IPv4-then-IPv6 address type.
    """
    # dnspython is imported here, not at the top: most link workers never need it.
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = list(servers)
    resolver.lifetime = timeout
    types = {socket.AF_INET: ("A",), socket.AF_INET6: ("AAAA",)}.get(family, ("A", "AAAA"))
    for rdtype in types:
        try:
            answer = await resolver.resolve(host, rdtype, search=False, lifetime=timeout)
        except dns.resolver.NoAnswer:
            continue  # the name exists, without this type
        except dns.resolver.NXDOMAIN:
            raise ResolveError(f"{host} does not exist (NXDOMAIN from {', '.join(servers)})") from None
        except dns.exception.Timeout:
            raise ResolveError(f"no answer for {host} from {', '.join(servers)} within {timeout:g} s") from None
        except dns.resolver.NoNameservers as exc:
            raise ResolveError(f"cannot resolve {host}: no server answered well ({exc})") from None
        except dns.exception.DNSException as exc:  # a malformed name, a bad answer
            raise ResolveError(f"cannot resolve {host}: {exc}") from None
        return [rdata.address for rdata in answer]
    return []
