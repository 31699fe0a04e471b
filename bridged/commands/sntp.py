"""AT+CIPSNTPCFG, AT+CIPSNTPTIME, AT+CIPSNTPINTV.

``[sntp] source`` decides where the time comes from:

* ``"servers"`` (default): AT+CIPSNTPCFG=1 starts the front's SNTP client
  (bridged.net.sntp_client) on the servers the MCU gave (ESP-AT's three
  defaults when it gave none), names resolved with the AT+CIPDNS servers.
  AT+CIPSNTPTIME? shows the device clock: 1970-01-01 plus the time since
  power-on until a server answers, as an unsynchronised ESP32 does, then the
  server's time counted on.  ``+TIME_UPDATED`` follows the first accepted
  answer after each AT+CIPSNTPCFG=1 only (ESP-AT v4's at_time_sync_cb clears
  a flag AT+CIPSNTPCFG sets), never a periodic resync, never a server that
  does not answer.  AT+CIPSNTPCFG=0 stops the client.
* ``"host"``: for a gateway whose own clock NTP keeps: AT+CIPSNTPTIME? shows
  the host clock, ``+TIME_UPDATED`` follows AT+CIPSNTPCFG=1's OK at once
  when the station is connected, and nothing is sent to any server.

bridged never sets the host's clock.  What ESP-AT v4 does (at_ipCmd.c of the
v4.1.1.0 AT core, read from its RISC-V objects), and so bridged:

* AT+CIPSNTPCFG=<enable>[,<timezone>[,"s1"[,"s2"[,"s3"]]]]: a server name
  is 1..32 bytes, given or omitted only at the end; the time zone may be left
  out only when no server follows (then the previous one stays).  <enable> 0
  forgets the servers.
* AT+CIPSNTPCFG? prints ``+CIPSNTPCFG:1,<tz>,"s1",...`` while servers are
  configured, else ``+CIPSNTPCFG:0,<tz>`` (so 0 after a reboot); both end
  with CRLF (the code appends it after the servers).
* AT+CIPSNTPTIME? prints asctime's text without its newline, in the time
  zone last set (UTC before any).

The device clock lives in the front, not in the session: AT+RST and
AT+RESTORE keep it (the spec page: the time "will not be lost after a
software reset"); they stop the client and forget the configuration, as a
reboot of the ESP does.  Restarting bridged is a power cycle: back to 1970.
SSL links in auth mode 2 or 3 check certificate dates against the device
clock (``tls_time``), so they fail until a server has answered, as on an ESP32.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from bridged.at.errors import ParamCountMismatch, ParamInvalid
from bridged.at.format import TIME_UPDATED, info, q
from bridged.at.params import Int, Str, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import Context, SntpSettings
from bridged.commands.dns import lookup_servers
from bridged.commands.registry import Reply, handles
from bridged.commands.wifi import station_ip, watch_station

__all__ = ["timezone_offset", "tls_time", "DEFAULT_SERVERS"]

DEFAULT_SERVERS = ("cn.ntp.org.cn", "ntp.sjtu.edu.cn", "us.pool.ntp.org")
_MAX_SERVER = 32  # bytes of a server name (AT core: strlen > 32 is ERROR)


def timezone_offset(tz: int) -> int:
    """Seconds east of UTC for AT+CIPSNTPCFG's <timezone> (hours, or [+|-]hhmm).

    Raises:
        ValueError: outside [-12,14] hours or minutes over 59.
    """
    if -12 <= tz <= 14:
        return tz * 3600
    sign = -1 if tz < 0 else 1
    hours, minutes = divmod(abs(tz), 100)
    if hours > (12 if sign < 0 else 14) or minutes > 59:
        raise ValueError(tz)
    return sign * (hours * 3600 + minutes * 60)


def _shown_timezone(tz: int) -> int:
    """The query shows whole hours: 015 (UTC+00:15) reads back as 0 (spec note)."""
    return tz if -12 <= tz <= 14 else int(tz / 100)


def _from_servers(ctx: Context) -> bool:
    return ctx.config.sntp.source == "servers"


def tls_time(ctx: Context) -> int | None:
    """When a verifying SSL link checks certificate dates: the device clock now, or None for the host's."""
    return int(ctx.sntp.clock.now()) if _from_servers(ctx) else None


@dataclass(frozen=True, slots=True)
class _Session:
    """The session as the SNTP client sees it (bridged.net.sntp_client.Device)."""

    ctx: Context

    def interval(self) -> float:
        return self.ctx.state.sntp_interval

    def dns_servers(self) -> Sequence[str]:
        return lookup_servers(self.ctx)

    def ipv6(self) -> bool:
        return self.ctx.state.cipv6

    def online(self) -> bool:
        return station_ip(self.ctx) is not None

    def time_updated(self) -> None:
        if self.ctx.personality.time_updated_urc:  # from 3.0; 2.x syncs silently
            self.ctx.urc(TIME_UPDATED)


@handles("+CIPSNTPCFG", Kind.QUERY)
def sntpcfg_query(ctx: Context, line: CommandLine) -> Reply:
    cfg = ctx.state.sntp
    tz = _shown_timezone(cfg.timezone)
    if cfg.servers:
        return Reply(info("+CIPSNTPCFG", 1, tz, *(q(s) for s in cfg.servers)))
    return Reply(info("+CIPSNTPCFG", 0, tz))


@handles("+CIPSNTPCFG", Kind.SET)
def sntpcfg_set(ctx: Context, line: CommandLine) -> Reply:
    tokens = line.tokens
    if not 1 <= len(tokens) <= 5:
        raise ParamCountMismatch(f"expected 1..5 parameters, got {len(tokens)}", 5 << 8 | min(len(tokens), 0xFF))
    server = Str(_MAX_SERVER, min_len=1)
    enable, *rest = bind(tokens, (Int(0, 1), Int(-1259, 1459), server, server, server)[: len(tokens)])
    tz = rest[0] if rest else ctx.state.sntp.timezone
    try:
        timezone_offset(tz)
    except ValueError:
        raise ParamInvalid(f"timezone {tz} is outside UTC-12:00..UTC+14:00", 2) from None
    servers = (tuple(rest[1:]) or DEFAULT_SERVERS) if enable else ()
    ctx.state.sntp = SntpSettings(servers, tz)
    if not _from_servers(ctx):
        # ESP-AT prints +TIME_UPDATED from 3.0; 2.x syncs silently.
        if enable and station_ip(ctx) is not None and ctx.personality.time_updated_urc:
            return Reply(then=lambda: ctx.urc(TIME_UPDATED))
        return Reply()
    if enable:
        watch_station(ctx, ctx.sntp.wake)
        ctx.sntp.start(servers, _Session(ctx))
    else:
        ctx.sntp.stop()
    return Reply()


@handles("+CIPSNTPTIME", Kind.QUERY)
def sntptime_query(ctx: Context, line: CommandLine) -> Reply:
    now = ctx.sntp.clock.now() if _from_servers(ctx) else time.time()
    now += timezone_offset(ctx.state.sntp.timezone)
    return Reply(info("+CIPSNTPTIME", time.asctime(time.gmtime(now)), eol=False))


@handles("+CIPSNTPINTV", Kind.QUERY)
def sntpintv_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPSNTPINTV", ctx.state.sntp_interval))


@handles("+CIPSNTPINTV", Kind.SET)
def sntpintv_set(ctx: Context, line: CommandLine) -> Reply:
    (interval,) = bind(line.tokens, (Int(15, 4294967),))
    ctx.state.sntp_interval = interval
    return Reply()
