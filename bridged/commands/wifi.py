"""Wi-Fi commands, emulated over a host interface.

The ESP's station is a host interface (config ``wifi.station_interface``);
"joining" the configured network succeeds when that interface is up with an
IPv4 address.  The one visible AP is the configured SSID.  A factory-fresh
ESP32 starts in station mode, not connected (AT+CWSTATE? gives 0).

Message order on a successful AT+CWJAP (esp-at-behavior.md 1.16):
``[WIFI DISCONNECT] WIFI CONNECTED WIFI GOT IP OK``; a failure prints
``+CWJAP:<code>`` then ERROR (1 timeout, 2 wrong password, 3 AP not found,
4 connect failed).  AT+CWQAP answers OK, then ``WIFI DISCONNECT``.

Other parts that follow the station (AT+MDNS's responder) register with
``watch_station``: every change of the Wi-Fi state or of the mode calls them,
as ESP-IDF's netif events reach its mdns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from bridged.at.errors import ExecFail
from bridged.at.format import ERROR, fields, info, q, wifi
from bridged.at.params import Int, Str, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import Context
from bridged.commands.registry import Reply, handles
from bridged.net.interfaces import InterfaceInfo, interface_info, mac_plus_one, station_interface

log = structlog.get_logger()

__all__ = ["station", "station_ip", "autoconnect_messages", "watch_station", "join", "set_wifi_state",
           "CONNECTING", "DISCONNECTED", "GOT_IP"]

NOT_STARTED, GOT_IP, CONNECTING, DISCONNECTED = 0, 2, 3, 4


def station(ctx: Context) -> InterfaceInfo:
    return interface_info(station_interface(ctx.config.wifi.station_interface))


def station_ip(ctx: Context) -> InterfaceInfo | None:
    """The station interface when the emulated Wi-Fi is connected, else None."""
    if not ctx.state.wifi_connected or ctx.state.cwmode not in (1, 3):
        return None
    info_ = station(ctx)
    return info_ if info_.connected else None


def watch_station(ctx: Context, callback: Callable[[], None]) -> None:
    """Call ``callback()`` after each join, leave or mode change of this session.

    The watchers live in the session's context, so a restart (a new
    context) drops them, as a reboot drops what ran.
    """
    if callback not in ctx.station_watchers:
        ctx.station_watchers.append(callback)


def _station_changed(ctx: Context) -> None:
    for callback in ctx.station_watchers:
        callback()


def set_wifi_state(ctx: Context, value: int) -> None:
    ctx.state.wifi_state = value
    ctx.state.wifi_epoch += 1
    _station_changed(ctx)


def _has_station(ctx: Context) -> bool:
    return ctx.state.cwmode in (1, 3)


def _bssid(ctx: Context) -> str:
    return ctx.config.wifi.bssid or (station(ctx).mac or "00:00:00:00:00:00")


_JOIN_FAILURES = {1: "timeout", 2: "wrong password", 3: "AP not found", 4: "connect failed"}


def join(ctx: Context, ssid: str, password: str) -> tuple[bytes, int | None]:
    """Try to join (AT+CWJAP, a reconnection); returns the messages and the +CWJAP failure code or None."""
    cfg = ctx.config.wifi
    lines = wifi("DISCONNECT") if ctx.state.wifi_connected else b""
    set_wifi_state(ctx, CONNECTING)
    injected = ctx.faults.join_code() if ctx.faults is not None else None  # wifi_join_fail, an AP gone
    if injected is not None:
        code = injected
    elif ssid != cfg.ssid:
        code = 3  # AP not found: only the configured network is visible
    elif cfg.check_credentials and password != cfg.password:
        code = 2
    elif not station(ctx).connected:
        code = 3
    else:
        code = None
    if code is not None:
        set_wifi_state(ctx, DISCONNECTED)
        log.warning("wifi_join_failed", ssid=ssid, code=code, why=_JOIN_FAILURES[code])  # never the password
        return lines + info("+CWJAP", code), code
    set_wifi_state(ctx, GOT_IP)
    log.info("wifi_joined", ssid=ssid, interface=station(ctx).name)
    return lines + wifi("CONNECTED") + wifi("GOT IP"), None


def autoconnect_messages(ctx: Context) -> bytes:
    """What ESP-AT prints after ``ready`` when it rejoins the stored network."""
    st = ctx.state
    if not (st.cwautoconn and st.wifi_ssid and _has_station(ctx)):
        return b""
    lines, code = join(ctx, st.wifi_ssid, st.wifi_password)
    return b"" if code is not None else lines


_CWJAP_SPECS = (
    Str(32, ""),  # ssid (omitted: the stored one)
    Str(64, ""),  # password
    Str(17, ""),  # bssid
    Int(0, 1, 0),  # pci_en
    Int(0, 7200, 1),  # reconn_interval
    Int(1, 100, 3),  # listen_interval
    Int(0, 1, 0),  # scan_mode
    Int(3, 600, 15),  # jap_timeout
    Int(0, 1, 1),  # pmf
)


def _cwjap_reply(ctx: Context, ssid: str, password: str) -> Reply:
    lines, code = join(ctx, ssid, password)
    if code is not None:
        return Reply(lines, ERROR)
    ctx.state.wifi_ssid, ctx.state.wifi_password = ssid, password
    ctx.state.persist(ctx.store, "wifi_ssid", "wifi_password")
    return Reply(lines)


def _cwjap(ctx: Context, ssid: str, password: str):  # -> Reply | Awaitable[Reply]
    if not _has_station(ctx):
        raise ExecFail("AT+CWJAP needs station mode (AT+CWMODE=1 or 3)")
    delay = ctx.config.wifi.connect_delay_ms / 1000
    if delay <= 0:
        return _cwjap_reply(ctx, ssid, password)

    async def join_later() -> Reply:
        set_wifi_state(ctx, CONNECTING)
        await asyncio.sleep(delay)
        return _cwjap_reply(ctx, ssid, password)

    return join_later()


@handles("+CWJAP", Kind.SET)
def cwjap_set(ctx: Context, line: CommandLine):
    values = bind(line.tokens, _CWJAP_SPECS, min_count=1)
    ctx.state.reconncfg = (values[4], ctx.state.reconncfg[1])  # <reconn_interval>: AT+CWRECONNCFG's interval
    ctx.state.persist(ctx.store, "reconncfg")
    ssid = values[0] or ctx.state.wifi_ssid
    password = values[1] if len(line.tokens) > 1 else ctx.state.wifi_password
    return _cwjap(ctx, ssid, password)


@handles("+CWJAP", Kind.EXECUTE)
def cwjap_execute(ctx: Context, line: CommandLine):
    if not ctx.state.wifi_ssid:
        raise ExecFail("AT+CWJAP: no stored network to join")
    return _cwjap(ctx, ctx.state.wifi_ssid, ctx.state.wifi_password)


@handles("+CWJAP", Kind.QUERY)
def cwjap_query(ctx: Context, line: CommandLine) -> Reply:
    if station_ip(ctx) is None:
        return Reply()  # "No AP" goes to ESP-AT's log port only
    cfg = ctx.config.wifi
    return Reply(info("+CWJAP", q(ctx.state.wifi_ssid), q(_bssid(ctx)), cfg.channel, cfg.rssi, 0, 1, 3, 0, 1))


@handles("+CWQAP", Kind.EXECUTE)
def cwqap(ctx: Context, line: CommandLine) -> Reply:
    was_connected = ctx.state.wifi_connected
    set_wifi_state(ctx, DISCONNECTED)
    if not was_connected:
        return Reply()
    return Reply(then=lambda: ctx.urc(wifi("DISCONNECT")))


@handles("+CWSTATE", Kind.QUERY)
def cwstate(ctx: Context, line: CommandLine) -> Reply:
    st = ctx.state
    ssid = st.wifi_ssid if st.wifi_state in (GOT_IP, CONNECTING) else ""
    return Reply(info("+CWSTATE", st.wifi_state, q(ssid)))


@handles("+CWMODE", Kind.QUERY)
def cwmode_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CWMODE", ctx.state.cwmode))


@handles("+CWMODE", Kind.SET)
def cwmode_set(ctx: Context, line: CommandLine) -> Reply:
    mode, auto = bind(line.tokens, (Int(0, 3), Int(0, 1, 1)))
    st = ctx.state
    had_station = _has_station(ctx)
    st.cwmode = mode
    st.persist(ctx.store, "cwmode")
    if had_station != _has_station(ctx):
        _station_changed(ctx)
    if had_station and not _has_station(ctx) and st.wifi_connected:
        set_wifi_state(ctx, DISCONNECTED)
        return Reply(then=lambda: ctx.urc(wifi("DISCONNECT")))
    if not had_station and _has_station(ctx) and auto:
        msgs = autoconnect_messages(ctx)
        if msgs:
            return Reply(then=lambda: ctx.urc(msgs))
    return Reply()


@handles("+CWAUTOCONN", Kind.QUERY)
def cwautoconn_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CWAUTOCONN", int(ctx.state.cwautoconn), eol=False))


@handles("+CWAUTOCONN", Kind.SET)
def cwautoconn_set(ctx: Context, line: CommandLine) -> Reply:
    (value,) = bind(line.tokens, (Int(0, 1),))
    ctx.state.cwautoconn = bool(value)
    ctx.store.set("cwautoconn", bool(value))  # always saved, whatever SYSSTORE says
    return Reply()


@handles("+CWHOSTNAME", Kind.QUERY)
def cwhostname_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CWHOSTNAME", ctx.state.hostname))  # ESP-AT prints it unquoted


@handles("+CWHOSTNAME", Kind.SET)
def cwhostname_set(ctx: Context, line: CommandLine) -> Reply:
    (name,) = bind(line.tokens, (Str(32, min_len=1),))
    if not _has_station(ctx):
        raise ExecFail("AT+CWHOSTNAME needs station mode")
    ctx.state.hostname = name
    return Reply()


@handles("+CWDHCP", Kind.QUERY)
def cwdhcp_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CWDHCP", ctx.state.cwdhcp, eol=False))


@handles("+CWDHCP", Kind.SET)
def cwdhcp_set(ctx: Context, line: CommandLine) -> Reply:
    operate, mask = bind(line.tokens, (Int(0, 1), Int(1, 3)))
    st = ctx.state
    st.cwdhcp = (st.cwdhcp | mask) if operate else (st.cwdhcp & ~mask)
    st.persist(ctx.store, "cwdhcp")
    return Reply()


@handles("+CWLAPOPT", Kind.SET)
def cwlapopt_set(ctx: Context, line: CommandLine) -> Reply:
    sort, mask, _rssi, _auth = bind(line.tokens, (Int(0, 1), Int(0, 0x7FF), Int(-100, 40, -100), Int(0, 0xFFFF, 0xFFFF)))
    ctx.state.cwlapopt = (sort, mask)
    return Reply()


def _cwlap_line(ctx: Context) -> bytes:
    cfg = ctx.config.wifi
    values = (cfg.ecn, q(cfg.ssid), cfg.rssi, q(_bssid(ctx)), cfg.channel, 0, 0, 4, 4, 7, 0)
    mask = ctx.state.cwlapopt[1]
    shown = fields(*(f for bit, f in enumerate(values) if mask & (1 << bit)))
    return b"+CWLAP:(" + shown + b")\r\n"


@handles("+CWLAP", Kind.EXECUTE)
def cwlap(ctx: Context, line: CommandLine) -> Reply:
    if not _has_station(ctx):
        raise ExecFail("AT+CWLAP needs station mode")
    return Reply(_cwlap_line(ctx) if station(ctx).is_up else b"")


@handles("+CWLAP", Kind.SET)
def cwlap_filtered(ctx: Context, line: CommandLine) -> Reply:
    ssid, mac, channel, *_ = bind(
        line.tokens, (Str(32, ""), Str(17, ""), Int(0, 14, 0), Int(0, 1, 0), Int(0, 1500, 0), Int(0, 1500, 0)),
        min_count=1,
    )
    if not _has_station(ctx):
        raise ExecFail("AT+CWLAP needs station mode")
    cfg = ctx.config.wifi
    match = (
        (not ssid or ssid == cfg.ssid)
        and (not mac or mac.lower() == _bssid(ctx))
        and (not channel or channel == cfg.channel)
    )
    return Reply(_cwlap_line(ctx) if match and station(ctx).is_up else b"")


# -- addresses ------------------------------------------------------------------


def _ip_lines(prefix: str, iface: InterfaceInfo | None, ipv6: bool) -> bytes:
    connected = iface is not None and iface.connected
    ip = iface.ipv4 if connected else "0.0.0.0"
    gw = (iface.gateway or "0.0.0.0") if connected else "0.0.0.0"
    mask = iface.netmask if connected else "0.0.0.0"
    out = info(prefix, b'ip:"' + ip.encode() + b'"')
    out += info(prefix, b'gateway:"' + gw.encode() + b'"')
    out += info(prefix, b'netmask:"' + mask.encode() + b'"')
    if ipv6 and connected:
        for addr in iface.ipv6_ll[:1]:
            out += info(prefix, b'ip6ll:"' + addr.encode() + b'"')
        for addr in iface.ipv6_gl[:1]:
            out += info(prefix, b'ip6gl:"' + addr.encode() + b'"')
    return out


@handles("+CIPSTA", Kind.QUERY)
def cipsta_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(_ip_lines("+CIPSTA", station_ip(ctx), ctx.state.cipv6))


def _ap(ctx: Context) -> InterfaceInfo | None:
    name = ctx.config.wifi.ap_interface
    return interface_info(name) if name else None


def _ap_mac(ctx: Context) -> str:
    ap = _ap(ctx)
    if ap is not None and ap.mac:
        return ap.mac
    return mac_plus_one(station(ctx).mac or "00:00:00:00:00:00")


@handles("+CIPAP", Kind.QUERY)
def cipap_query(ctx: Context, line: CommandLine) -> Reply:
    ap = _ap(ctx) if ctx.state.cwmode in (2, 3) else None
    return Reply(_ip_lines("+CIPAP", ap, ctx.state.cipv6))


@handles("+CIPSTAMAC", Kind.QUERY)
def cipstamac_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPSTAMAC", q(station(ctx).mac or "00:00:00:00:00:00")))


@handles("+CIPAPMAC", Kind.QUERY)
def cipapmac_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPAPMAC", q(_ap_mac(ctx))))


def _cifsr_lines(kind: str, iface: InterfaceInfo | None, mac: str, ipv6: bool) -> bytes:
    ip = iface.ipv4 if iface is not None and iface.connected else "0.0.0.0"
    out = info("+CIFSR", f"{kind}IP", q(ip or "0.0.0.0"))
    if ipv6 and iface is not None and iface.connected:
        for addr in iface.ipv6_ll[:1]:
            out += info("+CIFSR", f"{kind}IP6LL", q(addr))
        for addr in iface.ipv6_gl[:1]:
            out += info("+CIFSR", f"{kind}IP6GL", q(addr))
    return out + info("+CIFSR", f"{kind}MAC", q(mac))


@handles("+CIFSR", Kind.EXECUTE)
def cifsr(ctx: Context, line: CommandLine) -> Reply:
    st = ctx.state
    out = b""
    if st.cwmode in (2, 3):
        out += _cifsr_lines("AP", _ap(ctx), _ap_mac(ctx), st.cipv6)
    if st.cwmode in (1, 3):
        out += _cifsr_lines("STA", station_ip(ctx), station(ctx).mac or "00:00:00:00:00:00", st.cipv6)
    eth = ctx.config.wifi.eth_interface
    if eth:
        iface = interface_info(eth)
        out += _cifsr_lines("ETH", iface, iface.mac or "00:00:00:00:00:00", st.cipv6)
    return Reply(out)
