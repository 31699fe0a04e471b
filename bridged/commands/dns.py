"""AT+CIPDNS: the DNS servers ESP-AT would use.

With <enable> 0 the servers come "from DHCP": on a gateway that is what the
host's resolver was given, so bridged shows the nameservers of
/etc/resolv.conf (ESP-AT's fallback 208.67.222.222 and 8.8.8.8 when there is
none).  Manual servers (<enable> 1) are kept as AT+SYSSTORE says.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from bridged.at.errors import ExecFail, ParamInvalid
from bridged.at.format import info, q
from bridged.at.params import Int, Str, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import Context
from bridged.commands.registry import Reply, handles

__all__ = ["dns_servers", "FALLBACK"]

FALLBACK = ("208.67.222.222", "8.8.8.8")
RESOLV_CONF = Path("/etc/resolv.conf")


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
    stored = ctx.store.get("cipdns") if ctx.state.sysstore else None
    manual = ctx.extra.get("cipdns", stored)
    if manual:
        return 1, tuple(manual)
    return 0, _host_nameservers() or FALLBACK


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
    if len(set(servers)) != len(servers):
        raise ExecFail("the DNS servers must differ")
    manual = (servers or list(FALLBACK)) if enable else []
    ctx.extra["cipdns"] = manual
    if ctx.state.sysstore:
        ctx.store.set("cipdns", manual)
    return Reply()
