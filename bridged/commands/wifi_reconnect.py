"""AT+CWRECONNCFG, and the station's reconnection after it lost its AP.

A station that loses its AP without being told to (a passive disconnect: on
bridged, the injected fault ``wifi_drop``) prints ``WIFI DISCONNECT``, and
then, as AT+CWRECONNCFG says, tries to join again every <interval_second>
seconds, at most <repeat_count> times (0: for ever); interval 0 means no
reconnection: the station stays disconnected until the MCU joins again.
AT+CWJAP's <reconn_interval> (default 1 s) sets the interval too
(esp-at-behavior.md 1.16).  Each attempt is a join (`wifi.join`): it fails
while the AP is still gone, and an injected ``wifi_join_fail`` fails it too.
A success prints ``WIFI CONNECTED`` then ``WIFI GOT IP``; a failed attempt
prints nothing (ESP-AT prints WIFI DISCONNECT only for a station that was
connected).

Anything else that changes the Wi-Fi state meanwhile (AT+CWJAP, AT+CWQAP,
AT+CWMODE) ends the reconnection: it sees ``wifi_epoch`` move.  A restart
cancels it with the session (`Context.background`).
"""

from __future__ import annotations

import asyncio
from typing import Callable

import structlog

from bridged.at.format import info, wifi
from bridged.at.params import Int, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import Context
from bridged.commands.registry import Reply, handles
from bridged.commands.wifi import CONNECTING, DISCONNECTED, join, set_wifi_state

__all__ = ["lose_ap"]

log = structlog.get_logger()


@handles("+CWRECONNCFG", Kind.QUERY)
def cwreconncfg_query(ctx: Context, line: CommandLine) -> Reply:
    interval, count = ctx.state.reconncfg
    return Reply(info("+CWRECONNCFG", interval, count))


@handles("+CWRECONNCFG", Kind.SET)
def cwreconncfg_set(ctx: Context, line: CommandLine) -> Reply:
    interval, count = bind(line.tokens, (Int(0, 7200), Int(0, 1000)))
    ctx.state.reconncfg = (interval, count)
    ctx.state.persist(ctx.store, "reconncfg")
    return Reply()


def lose_ap(ctx: Context, say: Callable[[bytes], None], close_links: Callable[[], None]) -> bool:
    """The station lost its AP: WIFI DISCONNECT, every link closed, then reconnection.

    Args:
        say: queues a Wi-Fi message (the caller knows whether passthrough hides it).
        close_links: closes every link, each reported ``CLOSED`` after the Wi-Fi line.

    Returns:
        False when the station was not connected (nothing to lose).
    """
    if not ctx.state.wifi_connected:
        return False
    interval, count = ctx.state.reconncfg
    set_wifi_state(ctx, CONNECTING if interval else DISCONNECTED)
    say(wifi("DISCONNECT"))
    close_links()
    if interval:
        ctx.in_background(_reconnect(ctx, say, interval, count))
    return True


async def _reconnect(ctx: Context, say: Callable[[bytes], None], interval: int, count: int) -> None:
    epoch = ctx.state.wifi_epoch
    attempts = 0
    while True:
        await asyncio.sleep(interval)
        if ctx.state.wifi_epoch != epoch:
            return  # AT+CWJAP, CWQAP or CWMODE took over the station
        attempts += 1
        lines, code = join(ctx, ctx.state.wifi_ssid, ctx.state.wifi_password)
        if code is None:
            log.info("wifi_reconnected", attempts=attempts)
            say(lines)
            return
        if count and attempts >= count:
            log.info("wifi_reconnect_gave_up", attempts=attempts)
            set_wifi_state(ctx, DISCONNECTED)
            return
        set_wifi_state(ctx, CONNECTING)  # join() left it disconnected: still retrying
        epoch = ctx.state.wifi_epoch
