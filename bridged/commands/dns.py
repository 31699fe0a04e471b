"""AT+CIPDNS: the DNS servers ESP-AT would use; AT+CIPDOMAIN: a name lookup.

With <enable> 0 the servers come "from DHCP": on a gateway that is what the
host's resolver was given, so bridged shows the nameservers of
/etc/resolv.conf (ESP-AT's fallback 208.67.222.222 and 8.8.8.8 when there is
none) and names go to the host's resolver.  Manual servers (<enable> 1) are
kept as AT+SYSSTORE says, and every name lookup (AT+CIPDOMAIN, AT+CIPSTART,
AT+CIPSEND's UDP remote, passthrough reconnections) asks them and only them.

AT+CIPDOMAIN=<"domain name">[,<ip network>][,<timeout>]: <ip network> 1
prefers IPv4 (IPv6 only when the name has no IPv4 address: lwIP's
IPv4-then-IPv6 order), 2 is IPv4 only, 3 IPv6 only.  The page does not tie
IPv6 to AT+CIPV6 for this command, so it is not gated.  <timeout> is in ms,
0..60000; 0 means "as the network allows", for bridged the profile's
``links.connect_timeout_ms``.  The page gives no length limit for the name
(it sends names longer than AT+CIPSTART's 64 bytes here), so DNS's own
limits apply: 253 bytes, labels of 1 to 63.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from bridged.at.errors import ExecFail, ParamInvalid
from bridged.at.format import cipdomain, info, q
from bridged.at.params import Int, Str, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import Context
from bridged.commands.registry import Reply, handles
from bridged.commands.wifi import station_ip
from bridged.net.resolver import MAX_NAME, ResolveError, name_problem, resolve

__all__ = ["dns_servers", "lookup_servers", "check_domain", "FALLBACK"]

FALLBACK = ("208.67.222.222", "8.8.8.8")
RESOLV_CONF = Path("/etc/resolv.conf")
_FAMILIES = {1: socket.AF_UNSPEC, 2: socket.AF_INET, 3: socket.AF_INET6}


def _host_nameservers() -> tuple[str, ...]:
    try:
        lines = RESOLV_CONF.read_text().splitlines()
    except OSError:
        return ()
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
            except ValueError:
                continue
    return tuple(found[:3])


def dns_servers(ctx: Context) -> tuple[int, tuple[str, ...]]:
    """(enable, servers) as AT+CIPDNS? shows them."""
    # Until AT+CIPDNS is set in this boot, what was stored is what the ESP
    # loaded at boot, whatever AT+SYSSTORE says now: it only decides whether
    # a set is saved (esp-at-behavior.md 1.8, "queries always report RAM state").
    manual = ctx.store.get("cipdns") if ctx.cipdns is None else ctx.cipdns
    if manual:
        return 1, tuple(manual)
    return 0, _host_nameservers() or FALLBACK


def lookup_servers(ctx: Context) -> tuple[str, ...]:
    """The servers net.resolver.resolve must ask: AT+CIPDNS's manual ones, or () for the host's resolver."""
    enable, servers = dns_servers(ctx)
    return servers if enable == 1 else ()


def check_domain(name: str, index: int = 1) -> None:
    """Refuse what no DNS server could answer, before asking one.

    Raises:
        ParamInvalid: an empty or overlong name or label, or a byte no host name has.
    """
    problem = name_problem(name)
    if problem is not None:
        raise ParamInvalid(problem, index)


@handles("+CIPDNS", Kind.QUERY)
def cipdns_query(ctx: Context, line: CommandLine) -> Reply:
    enable, servers = dns_servers(ctx)
    return Reply(info("+CIPDNS", enable, *(q(s) for s in servers)))


@handles("+CIPDNS", Kind.SET)
def cipdns_set(ctx: Context, line: CommandLine) -> Reply:
    enable, *given = bind(line.tokens, (Int(0, 1), Str(46, ""), Str(46, ""), Str(46, "")))
    servers = [s for s in given if s]
    for index, server in enumerate(given, start=2):
        if server:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise ParamInvalid(f"DNS server {server!r} is not an IP address", index) from None
    # The same address in two spellings ("::1", "0::1") is the same server.
    if len({ipaddress.ip_address(s) for s in servers}) != len(servers):
        raise ExecFail("the DNS servers must differ")
    manual = (servers or list(FALLBACK)) if enable else []
    ctx.cipdns = manual
    if ctx.state.sysstore:
        ctx.store.set("cipdns", manual)
    return Reply()


@handles("+CIPDOMAIN", Kind.SET)
def cipdomain_set(ctx: Context, line: CommandLine):
    specs = (Str(MAX_NAME + 1), Int(1, 3, 1), Int(0, 60000, 0))
    if ctx.personality.domain_timeout:
        name, network, timeout_ms = bind(line.tokens, specs)
    else:  # <timeout> exists from ESP-AT 4.1
        (name, network), timeout_ms = bind(line.tokens, specs[:2]), 0
    check_domain(name)
    if station_ip(ctx) is None:
        raise ExecFail("no ip: the station is not connected (AT+CWJAP first)")
    timeout = (timeout_ms or ctx.config.links.connect_timeout_ms) / 1000
    return _lookup(name, _FAMILIES[network], lookup_servers(ctx), timeout)


async def _lookup(name: str, family: int, servers: tuple[str, ...], timeout: float) -> Reply:
    try:
        addresses = await resolve(name, family, servers, timeout)
    except ResolveError as exc:
        raise ExecFail(f"DNS Fail: {exc}") from None
    return Reply(cipdomain(addresses[0]))
