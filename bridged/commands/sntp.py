"""AT+CIPSNTPCFG, AT+CIPSNTPTIME, AT+CIPSNTPINTV.

A gateway's Linux clock is already kept by NTP, so the time ESP-AT would get
from its SNTP servers is the host's: AT+CIPSNTPTIME? shows the host clock in
the configured time zone, and ``+TIME_UPDATED`` follows AT+CIPSNTPCFG=1 once
the station is connected.  bridged never sets the host's clock.
"""

from __future__ import annotations

import time

from bridged.at.errors import ParamInvalid
from bridged.at.format import info, q
from bridged.at.params import Int, Str, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import Context
from bridged.commands.registry import Reply, handles
from bridged.commands.wifi import station_ip

__all__ = ["timezone_offset", "DEFAULT_SERVERS"]

DEFAULT_SERVERS = ("cn.ntp.org.cn", "ntp.sjtu.edu.cn", "us.pool.ntp.org")
TIME_UPDATED = b"+TIME_UPDATED\r\n"


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


@handles("+CIPSNTPCFG", Kind.QUERY)
def sntpcfg_query(ctx: Context, line: CommandLine) -> Reply:
    cfg = ctx.extra.setdefault("sntp", {"enable": 1, "tz": 0, "servers": DEFAULT_SERVERS})
    servers = [q(s) for s in cfg["servers"]]
    return Reply(info("+CIPSNTPCFG", cfg["enable"], _shown_timezone(cfg["tz"]), *servers, eol=False))


@handles("+CIPSNTPCFG", Kind.SET)
def sntpcfg_set(ctx: Context, line: CommandLine) -> Reply:
    enable, tz, *servers = bind(line.tokens, (Int(0, 1), Int(-1259, 1459, 0), Str(64, ""), Str(64, ""), Str(64, "")))
    try:
        timezone_offset(tz)
    except ValueError:
        raise ParamInvalid(f"timezone {tz} is outside UTC-12:00..UTC+14:00", 2) from None
    chosen = tuple(s for s in servers if s) or DEFAULT_SERVERS
    ctx.extra["sntp"] = {"enable": enable, "tz": tz, "servers": chosen}
    # ESP-AT prints +TIME_UPDATED from 3.0; 2.x syncs silently.
    if enable and station_ip(ctx) is not None and ctx.personality.time_updated_urc:
        return Reply(after=lambda: ctx.urc(TIME_UPDATED))
    return Reply()


@handles("+CIPSNTPTIME", Kind.QUERY)
def sntptime_query(ctx: Context, line: CommandLine) -> Reply:
    cfg = ctx.extra.get("sntp", {"tz": 0})
    now = time.time() + timezone_offset(cfg["tz"])
    return Reply(info("+CIPSNTPTIME", time.asctime(time.gmtime(now)), eol=False))


@handles("+CIPSNTPINTV", Kind.QUERY)
def sntpintv_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPSNTPINTV", ctx.extra.get("sntp_interval", 3600)))


@handles("+CIPSNTPINTV", Kind.SET)
def sntpintv_set(ctx: Context, line: CommandLine) -> Reply:
    (interval,) = bind(line.tokens, (Int(15, 4294967),))
    ctx.extra["sntp_interval"] = interval
    return Reply()
