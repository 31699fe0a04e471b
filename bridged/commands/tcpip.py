"""TCP/IP commands of the foundation: AT+CIPMUX, AT+CIPSTART(EX), AT+CIPCLOSE,
AT+CIPSTATE, AT+CIPSTATUS, AT+CIPDINFO, AT+CIPRECVTYPE/MODE, AT+CIPV6,
AT+CIPTCPOPT (the send commands: bridged.commands.send; AT+CIPRECVDATA and
AT+CIPRECVLEN: bridged.commands.recv).

Every rejection is a bare ERROR on the AT port, as ESP-AT v2+ answers; the
texts ESP-AT writes to its log port (``ALREADY CONNECTED``, ``invalid link``,
``no ip`` ...) become the ``why`` of the AtError and so reach bridged's log.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from bridged.at.errors import ExecFail, ParamCountMismatch, ParamInvalid
from bridged.at.format import closed, connect, info, link_conn, q
from bridged.at.params import Int, Str, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import ConnectSpec, Context, LinkView
from bridged.commands.dns import lookup_servers
from bridged.commands.options import SysMsg, TcpOptions
from bridged.commands.registry import Reply, handles
from bridged.commands.ssl import with_tls
from bridged.commands.wifi import station_ip

__all__ = ["connected_message"]

ALL_LINKS = 5  # "max": AT+CIPCLOSE=5 closes every link
STREAM_TYPES = ("TCP", "TCPv6", "SSL", "SSLv6")
DATAGRAM_TYPES = ("UDP", "UDPv6")


def _link_id_spec(ctx: Context) -> Int:
    return Int(0, ctx.links.count - 1)


def _require_ip(ctx: Context) -> None:
    if station_ip(ctx) is None:
        raise ExecFail("no ip: the station is not connected (AT+CWJAP first)")


def connected_message(ctx: Context, view: LinkView) -> bytes:
    """``CONNECT`` / ``<id>,CONNECT``, or +LINK_CONN with AT+SYSMSG bit 1."""
    if SysMsg.LINK_CONN in ctx.state.sysmsg:
        return link_conn(view.link_id, view.type, view.server, view.remote_ip, view.remote_port, view.local_port)
    return connect(ctx.link_arg(view.link_id))


# -- AT+CIPMUX ----------------------------------------------------------------------


@handles("+CIPMUX", Kind.QUERY)
def cipmux_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPMUX", ctx.state.cipmux))


@handles("+CIPMUX", Kind.SET)
def cipmux_set(ctx: Context, line: CommandLine) -> Reply:
    (mode,) = bind(line.tokens, (Int(0, 1),))
    if mode == ctx.state.cipmux:
        return Reply()
    busy = [i for i in range(ctx.links.count) if ctx.links.is_busy(i)]
    if busy:
        raise ExecFail(f"connection exists: links {busy} are open")
    if mode == 1 and ctx.state.cipmode != 0:
        raise ExecFail("IPMODE != 0: AT+CIPMODE=0 first")
    if mode == 0 and ctx.server.running:
        raise ExecFail("CIPSERVER != 0: AT+CIPSERVER=0 first")
    ctx.state.cipmux = mode
    return Reply()


# -- AT+CIPSTART / AT+CIPSTARTEX ----------------------------------------------------

# The last of each tail, <timeout>, exists from ESP-AT 4.1 (Personality.start_timeout).
_TCP_TAIL = (Int(0, 7200, None), Str(64, ""), Int(0, 60000, 0))
# A link whose worker crashed is served again within a second (the supervisor
# restarts it at once; a worker that keeps crashing backs off longer).
_WORKER_RESTART = 2.0
_UDP_TAIL = (Int(0, 65535, 0), Int(0, 2, None), Str(64, ""), Int(0, 60000, 0))


def _check_host(ctx: Context, type_: str, host: str) -> None:
    if not host:
        raise ParamInvalid("remote host error: empty", 2)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return  # a name: resolved by the link worker, through AT+CIPDNS's servers
    if addr.version == 6 and not type_.endswith("v6"):
        raise ExecFail(f"unmatched type and remote host: an IPv6 address needs {type_}v6")
    if addr.version == 4 and type_.endswith("v6"):
        raise ExecFail(f"unmatched type and remote host: {type_} needs an IPv6 address")


def _bind_start(ctx: Context, tokens: tuple, head: tuple, tail: tuple) -> list:
    """Bind AT+CIPSTART's parameters as this ESP-AT version has them: before
    4.1 there is no <timeout>, so a parameter in its place is one too many
    (ERROR); <timeout> is then 0: ``[links] connect_timeout_ms`` bounds the
    connect, as the kernel's timeout bounds ESP-AT's."""
    if ctx.personality.start_timeout:
        return bind(tokens, head + tail)
    return bind(tokens, head + tail[:-1]) + [0]


def _connect_spec(ctx: Context, link_id: int, tokens: tuple) -> ConnectSpec:
    """Check AT+CIPSTART's parameters after the link id."""
    if not tokens:
        raise ParamCountMismatch("AT+CIPSTART needs a type", 0)
    (type_,) = bind(tokens[:1], (Str(6),))
    if type_ not in STREAM_TYPES + DATAGRAM_TYPES:
        raise ExecFail(f"connection type {type_!r}: TCP, TCPv6, UDP, UDPv6, SSL or SSLv6")
    if type_.endswith("v6") and not ctx.state.cipv6:
        raise ExecFail("IPv6 is disabled: AT+CIPV6=1 first")
    if type_ in DATAGRAM_TYPES:
        return _udp_spec(ctx, type_, tokens[1:])
    host, port, keep_alive, local_ip, timeout = _bind_start(ctx, tokens[1:], (Str(64), Int(1, 65535)), _TCP_TAIL)
    _check_host(ctx, type_, host)
    if keep_alive is not None:  # shared with AT+CIPTCPOPT: the later wins
        opts = ctx.state.tcpopts[link_id] = dataclasses.replace(ctx.state.tcpopts[link_id], keep_alive=keep_alive)
        ctx.links.set_options(link_id, opts.so_linger, opts.tcp_nodelay, opts.keep_alive)
    spec = ConnectSpec(type_, host, port, local_ip, timeout)
    return with_tls(ctx, link_id, spec) if type_.startswith("SSL") else spec


def _udp_spec(ctx: Context, type_: str, tokens: tuple) -> ConnectSpec:
    host, port, local_port, mode, local_ip, timeout = _bind_start(ctx, tokens, (Str(64), Int(0, 65535)), _UDP_TAIL)
    _check_host(ctx, type_, host)
    if mode is not None and not local_port:
        raise ExecFail("UDP <mode> needs <local port> first")
    return ConnectSpec(type_, host, port, local_ip, timeout, local_port, mode or 0)


async def _open(ctx: Context, link_id: int, spec: ConnectSpec) -> Reply:
    epoch = ctx.state.wifi_epoch
    await ctx.links.wait_ready(link_id, _WORKER_RESTART)
    # The worker resolves (an SSL link needs the name itself for SNI and the
    # certificate check); it asks the servers AT+CIPDNS holds now.
    spec = dataclasses.replace(spec, dns_servers=lookup_servers(ctx))
    view = await ctx.links.connect(link_id, spec)
    if ctx.state.wifi_epoch != epoch:
        # The station lost its AP meanwhile (a wifi_drop): the links closed, and
        # a connect under way fails with them, as it would over no AP.
        await ctx.links.close(link_id)
        raise ExecFail("connect failed: the station lost its AP meanwhile")
    ctx.state.had_link = True
    return Reply(connected_message(ctx, view))


def _start(ctx: Context, link_id: int, tokens: tuple):
    if ctx.links.is_busy(link_id):
        raise ExecFail(f"ALREADY CONNECTED: link {link_id} is in use")
    spec = _connect_spec(ctx, link_id, tokens)
    _require_ip(ctx)
    return _open(ctx, link_id, spec)


@handles("+CIPSTART", Kind.SET)
def cipstart(ctx: Context, line: CommandLine):
    tokens = line.tokens
    if not ctx.mux:
        return _start(ctx, 0, tokens)
    (link_id,) = bind(tokens[:1], (_link_id_spec(ctx),))
    return _start(ctx, link_id, tokens[1:])


@handles("+CIPSTARTEX", Kind.SET)
def cipstartex(ctx: Context, line: CommandLine):
    if not ctx.mux:
        return _start(ctx, 0, line.tokens)
    # A slot whose worker is restarting is free too, taken only after the ready ones.
    free = sorted((i for i in range(ctx.links.count) if not ctx.links.is_busy(i)),
                  key=lambda i: not ctx.links.is_ready(i))
    if not free:
        raise ExecFail("no free link id")
    return _start(ctx, free[0], line.tokens)


# -- AT+CIPCLOSE ----------------------------------------------------------------------


async def _close(ctx: Context, ids: list[int]) -> Reply:
    body = b""
    for link_id in ids:
        await ctx.before_close(link_id)
        await ctx.links.close(link_id)
        body += closed(ctx.link_arg(link_id))
    return Reply(body)


@handles("+CIPCLOSE", Kind.SET)
def cipclose_set(ctx: Context, line: CommandLine):
    if not ctx.mux:
        raise ExecFail("MUX=0: use AT+CIPCLOSE without a link id")
    (link_id,) = bind(line.tokens, (Int(0, ALL_LINKS),))
    if link_id == ALL_LINKS:
        return _close(ctx, [i for i in range(ctx.links.count) if ctx.links.view(i) is not None])
    if link_id >= ctx.links.count or ctx.links.view(link_id) is None:
        raise ExecFail(f"link {link_id} is not connected")
    return _close(ctx, [link_id])


@handles("+CIPCLOSE", Kind.EXECUTE)
def cipclose_execute(ctx: Context, line: CommandLine):
    if ctx.mux:
        raise ExecFail("MUX=1: AT+CIPCLOSE needs a link id")
    if ctx.links.view(0) is None:
        raise ExecFail("link 0 is not connected")
    return _close(ctx, [0])


# -- AT+CIPSTATE / AT+CIPSTATUS -------------------------------------------------------


def _state_fields(view: LinkView) -> tuple:
    return (view.link_id, q(view.type), q(view.remote_ip), view.remote_port, view.local_port, int(view.server))


def _views(ctx: Context) -> list[LinkView]:
    return [v for v in (ctx.links.view(i) for i in range(ctx.links.count)) if v is not None]


@handles("+CIPSTATE", Kind.QUERY)
def cipstate(ctx: Context, line: CommandLine) -> Reply:
    return Reply(b"".join(info("+CIPSTATE", *_state_fields(v)) for v in _views(ctx)))


@handles("+CIPSTATUS", Kind.EXECUTE)
def cipstatus(ctx: Context, line: CommandLine) -> Reply:
    views = _views(ctx)
    if station_ip(ctx) is None:
        stat = 5
    elif views:
        stat = 3
    elif ctx.state.had_link:
        stat = 4
    else:
        stat = 2
    body = b"STATUS:%d\r\n" % stat
    body += b"".join(info("+CIPSTATUS", *_state_fields(v)) for v in views)
    return Reply(body)


# -- AT+CIPDINFO, AT+CIPRECVTYPE / AT+CIPRECVMODE, AT+CIPV6 ----------------------------


@handles("+CIPDINFO", Kind.QUERY)
def cipdinfo_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPDINFO", "true" if ctx.state.cipdinfo else "false", eol=False))


@handles("+CIPDINFO", Kind.SET)
def cipdinfo_set(ctx: Context, line: CommandLine) -> Reply:
    (mode,) = bind(line.tokens, (Int(0, 1),))
    ctx.state.cipdinfo = bool(mode)
    return Reply()


def _set_recv_mode(ctx: Context, link_ids: range | list[int], mode: int) -> Reply:
    for link_id in link_ids:
        ctx.state.recv_modes[link_id] = mode
        ctx.links.set_passive(link_id, mode == 1)
    return Reply()


@handles("+CIPRECVMODE", Kind.QUERY)
def ciprecvmode_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPRECVMODE", ctx.state.recv_modes[0]))


@handles("+CIPRECVMODE", Kind.SET)
def ciprecvmode_set(ctx: Context, line: CommandLine) -> Reply:
    """The v2/v3 name: sets every link, in either connection mode."""
    (mode,) = bind(line.tokens, (Int(0, 1),))
    return _set_recv_mode(ctx, range(ctx.links.count), mode)


@handles("+CIPRECVTYPE", Kind.QUERY)
def ciprecvtype_query(ctx: Context, line: CommandLine) -> Reply:
    ids = range(ctx.links.count) if ctx.mux else range(1)
    return Reply(b"".join(info("+CIPRECVTYPE", i, ctx.state.recv_modes[i]) for i in ids))


@handles("+CIPRECVTYPE", Kind.SET)
def ciprecvtype_set(ctx: Context, line: CommandLine) -> Reply:
    if not ctx.mux:
        (mode,) = bind(line.tokens, (Int(0, 1),))
        return _set_recv_mode(ctx, [0], mode)
    link_id, mode = bind(line.tokens, (Int(0, ALL_LINKS), Int(0, 1)))
    if link_id == ALL_LINKS:
        return _set_recv_mode(ctx, range(ctx.links.count), mode)
    if link_id >= ctx.links.count:
        raise ParamInvalid(f"link id {link_id} out of range", 1)
    return _set_recv_mode(ctx, [link_id], mode)


@handles("+CIPV6", Kind.QUERY)
def cipv6_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPV6", int(ctx.state.cipv6)))


@handles("+CIPV6", Kind.SET)
def cipv6_set(ctx: Context, line: CommandLine) -> Reply:
    (enable,) = bind(line.tokens, (Int(0, 1),))
    ctx.state.cipv6 = bool(enable)
    ctx.state.persist(ctx.store, "cipv6")
    return Reply()


# -- AT+CIPTCPOPT --------------------------------------------------------------------

_TCPOPT_SPECS = (Int(-1, 65535, None), Int(0, 1, None), Int(0, 0x7FFFFFFF, None), Int(0, 7200, None))


def _tcpopt_count(ctx: Context) -> int:
    """so_linger, tcp_nodelay, so_sndtimeo, and <keep_alive> from ESP-AT 2.4."""
    return 4 if ctx.personality.tcpopt_keep_alive else 3


@handles("+CIPTCPOPT", Kind.QUERY)
def ciptcpopt_query(ctx: Context, line: CommandLine) -> Reply:
    ids = range(ctx.links.count) if ctx.mux else range(1)
    shown = _tcpopt_count(ctx)
    return Reply(b"".join(info("+CIPTCPOPT", i, *ctx.state.tcpopts[i].fields()[:shown]) for i in ids))


@handles("+CIPTCPOPT", Kind.SET)
def ciptcpopt_set(ctx: Context, line: CommandLine) -> Reply:
    specs = _TCPOPT_SPECS[:_tcpopt_count(ctx)]
    if ctx.mux:
        link_id, *values = bind(line.tokens, (Int(0, ALL_LINKS),) + specs, min_count=4)
        if link_id != ALL_LINKS and link_id >= ctx.links.count:
            raise ParamInvalid(f"link id {link_id} out of range", 1)
        ids = range(ctx.links.count) if link_id == ALL_LINKS else [link_id]
    else:
        values = bind(line.tokens, specs, min_count=3)
        ids = [0]
    names = (f.name for f in dataclasses.fields(TcpOptions))  # in AT+CIPTCPOPT's parameter order
    given = {name: value for name, value in zip(names, values) if value is not None}  # an omitted one is kept
    for i in ids:
        opts = ctx.state.tcpopts[i] = dataclasses.replace(ctx.state.tcpopts[i], **given)
        ctx.links.set_options(i, opts.so_linger, opts.tcp_nodelay, opts.keep_alive)
    ctx.state.persist(ctx.store, "tcpopts")
    return Reply()
