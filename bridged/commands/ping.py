"""AT+PING: one ICMP echo to a host, answered ``+PING:<time>`` and OK.

Spec (AT+PING): ``AT+PING=<"host">`` takes an IPv4 or IPv6 address or a
domain name; a name is resolved first, IPv4 preferred; IPv6 needs
AT+CIPV6=1.  ``+PING:TIMEOUT`` then ERROR when there is no reply in time or
the name does not resolve.  The command blocks: input meanwhile gets
``busy p...`` (esp-at-behavior.md 2.4).

Choices where the page is silent (UNCONFIRMED against hardware):
* <time> is whole milliseconds, truncated, as ESP-IDF's esp_ping computes it
  (``PING_TIME_DIFF_MS``): a reply within the millisecond shows ``+PING:0``.
* one echo request, waited for ``PING_TIMEOUT_S`` (esp_ping's default 1 s).
* the host is a string of 1 to 64 bytes (ESP-AT's domain name limit, 3.12);
  an IPv6 literal with AT+CIPV6=0, or no station IP, is a plain ERROR.
* a name resolves to IPv4 only with AT+CIPV6=0; with 1, to either family,
  the first IPv4 address first.
"""

from __future__ import annotations

import socket

import structlog

from bridged.at.errors import ExecFail
from bridged.at.format import PING_TIMEOUT, ping_time
from bridged.at.params import Str, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import Context
from bridged.commands.dns import lookup_servers
from bridged.commands.registry import Reply, handles
from bridged.commands.wifi import station_ip
from bridged.net import ping
from bridged.net.resolver import ResolveError, resolve

__all__ = ["PING_TIMEOUT_S", "RESOLVE_TIMEOUT_S"]

log = structlog.get_logger()

PING_TIMEOUT_S = 1.0
RESOLVE_TIMEOUT_S = 5.0
HOST_MAX = 64


def _timed_out(why: str) -> ExecFail:
    return ExecFail(why, body=PING_TIMEOUT)


@handles("+PING", Kind.SET)
def ping_set(ctx: Context, line: CommandLine):
    (host,) = bind(line.tokens, (Str(HOST_MAX, min_len=1),))
    if ":" in host and not ctx.state.cipv6:
        raise ExecFail(f"{host} is an IPv6 address: AT+CIPV6=1 first")
    if station_ip(ctx) is None:
        raise ExecFail("no ip: the station is not connected (AT+CWJAP first)")
    return _ping(ctx, host)


async def _ping(ctx: Context, host: str) -> Reply:
    family = socket.AF_UNSPEC if ctx.state.cipv6 else socket.AF_INET
    try:
        addresses = await resolve(host, family, lookup_servers(ctx), RESOLVE_TIMEOUT_S)
    except ResolveError as exc:
        raise _timed_out(f"cannot resolve {host}: {exc}") from None
    address = addresses[0]  # resolve() lists IPv4 first: "IPv4 preferred"
    try:
        rtt, kind = await ping.echo(address, PING_TIMEOUT_S)
    except ping.PingNotPermitted as exc:
        log.error("ping_not_permitted", why=str(exc))
        raise ExecFail(str(exc)) from None
    except ping.PingTimeout as exc:
        raise _timed_out(str(exc)) from None
    except OSError as exc:  # no route, network down: ESP-AT's ping just goes unanswered
        raise _timed_out(f"cannot send an echo request to {address}: {exc.strerror or exc}") from None
    ms = int(rtt * 1000)
    log.info("ping_answered", host=host, address=address, ms=ms, socket=kind.value)
    return Reply(ping_time(ms))
