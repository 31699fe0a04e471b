"""TCP/IP commands of the foundation: AT+CIPMUX, AT+CIPSTART(EX), AT+CIPSEND,
AT+CIPCLOSE, AT+CIPSTATE, AT+CIPSTATUS, AT+CIPDINFO, AT+CIPRECVTYPE/MODE,
AT+CIPV6.

Every rejection is a bare ERROR on the AT port, as ESP-AT v2+ answers; the
texts ESP-AT writes to its log port (``ALREADY CONNECTED``, ``invalid link``,
``no ip`` ...) become the ``why`` of the AtError and so reach bridged's log.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import socket

from bridged.at.datamode import DataKind
from bridged.at.errors import ExecFail, ParamCountMismatch, ParamInvalid
from bridged.at.format import PROMPT, closed, connect, fields, info, link_conn, q
from bridged.at.params import Int, Spec, Str, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import ConnectSpec, Context, LinkView
from bridged.commands.dns import lookup_servers
from bridged.commands.registry import Reply, SendRequest, handles
from bridged.commands.ssl import with_tls
from bridged.commands.wifi import station_ip
from bridged.net.localaddr import link_policy
from bridged.net.resolver import ResolveError, resolve

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
    if ctx.state.sysmsg & 2:
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
    host, port, keep_alive, local_ip, timeout = bind(tokens[1:], (Str(64), Int(1, 65535)) + _TCP_TAIL)
    _check_host(ctx, type_, host)
    if keep_alive is not None:  # shared with AT+CIPTCPOPT: the later wins
        opts = ctx.state.tcpopts[link_id]
        opts[3] = keep_alive
        ctx.links.set_options(link_id, opts[0], opts[1], opts[3])
    spec = ConnectSpec(type_, host, port, local_ip, timeout)
    return with_tls(ctx, link_id, spec) if type_.startswith("SSL") else spec


def _udp_spec(ctx: Context, type_: str, tokens: tuple) -> ConnectSpec:
    host, port, local_port, mode, local_ip, timeout = bind(tokens, (Str(64), Int(0, 65535)) + _UDP_TAIL)
    _check_host(ctx, type_, host)
    if mode is not None and not local_port:
        raise ExecFail("UDP <mode> needs <local port> first")
    return ConnectSpec(type_, host, port, local_ip, timeout, local_port, mode or 0)


async def _open(ctx: Context, link_id: int, spec: ConnectSpec) -> Reply:
    await ctx.links.wait_ready(link_id, _WORKER_RESTART)
    # The worker resolves (an SSL link needs the name itself for SNI and the
    # certificate check); it asks the servers AT+CIPDNS holds now.
    spec = dataclasses.replace(spec, dns_servers=lookup_servers(ctx))
    view = await ctx.links.connect(link_id, spec)
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


# -- AT+CIPSEND (normal transmission mode) ----------------------------------------


@functools.lru_cache(maxsize=16)
def _send_specs(links: int | None, max_length: int) -> tuple[Spec, ...]:
    """[<link ID>,]<length>[,<remote host>,<remote port>]: built once per form
    (a send command can come hundreds of times a second)."""
    specs = (Int(1, max_length), Str(64, ""), Int(0, 65535, None))
    return specs if links is None else (Int(0, links - 1),) + specs


def _send_command(ctx: Context, line: CommandLine, kind: DataKind, max_length: int):
    """AT+CIPSEND / CIPSENDEX / CIPSENDL's set form: checks, then the prompt."""
    if ctx.state.cipmode != 0:
        raise ExecFail("IPMODE=1: the set form needs AT+CIPMODE=0")
    if ctx.mux:
        link_id, length, host, port = bind(line.tokens, _send_specs(ctx.links.count, max_length))
    else:
        length, host, port = bind(line.tokens, _send_specs(None, max_length))
        link_id = 0
    if not ctx.links.can_send(link_id):
        raise ExecFail(f"invalid link: link {link_id} is not connected")
    view = ctx.links.view(link_id)
    if not host and port is None:
        if view.type.startswith("UDP"):
            _admit(ctx, link_id, [view.remote_ip], view.remote_port)  # a listener's 0.0.0.0 may be refused
        return Reply(final=PROMPT, send=SendRequest(link_id, length, kind=kind))
    if not view.type.startswith("UDP"):
        raise ExecFail("a remote host and port are for UDP links only")
    if not host or port is None:
        raise ParamCountMismatch("a send needs both <remote host> and <remote port>")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return _udp_send(ctx, view, link_id, length, host, port, kind)  # a name: resolve first
    if (ip.version == 6) != view.type.endswith("v6"):
        raise ExecFail(f"unmatched type and remote host: {host} on a {view.type} link")
    return Reply(final=PROMPT, send=SendRequest(link_id, length, (_admit(ctx, link_id, [str(ip)], port), port), kind))


def _admit(ctx: Context, link_id: int, addresses: list[str], port: int) -> str:
    """The first address [links] allow/deny lets this datagram go to.

    Checked here, before the prompt, so a refused remote is ERROR, as a
    send to a host the ESP cannot reach; the worker counts the refusal.
    """
    links = ctx.config.links
    policy = link_policy(links.allow, links.deny, links.local_ports)
    if policy.open:
        return addresses[0]
    refusal = None
    for address in addresses:
        refusal = policy.check(address, port)
        if refusal is None:
            return address
        ctx.links.refused(link_id, refusal)
    raise ExecFail(f"remote refused: {refusal.reason()}")


@handles("+CIPSEND", Kind.SET)
def cipsend(ctx: Context, line: CommandLine):
    return _send_command(ctx, line, DataKind.SEND, ctx.config.links.cipsend_max)


@handles("+CIPSENDEX", Kind.SET)
def cipsendex(ctx: Context, line: CommandLine):
    return _send_command(ctx, line, DataKind.SENDEX, ctx.config.links.cipsend_max)


@handles("+CIPSENDL", Kind.SET)
def cipsendl(ctx: Context, line: CommandLine):
    return _send_command(ctx, line, DataKind.SENDL, 0x7FFFFFFF)


@handles("+CIPSENDLCFG", Kind.QUERY)
def cipsendlcfg_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPSENDLCFG", *ctx.state.sendl_cfg))


@handles("+CIPSENDLCFG", Kind.SET)
def cipsendlcfg_set(ctx: Context, line: CommandLine) -> Reply:
    report, transmit = bind(line.tokens, (Int(100, 1 << 20), Int(100, 2920, ctx.state.sendl_cfg[1])))
    ctx.state.sendl_cfg = (report, transmit)
    return Reply()


async def _udp_send(ctx: Context, view: LinkView, link_id: int, length: int, host: str, port: int,
                    kind: DataKind) -> Reply:
    """AT+CIPSEND to a UDP peer of the MCU's choosing, for this datagram only."""
    family = socket.AF_INET6 if view.type.endswith("v6") else socket.AF_INET
    timeout = ctx.config.links.connect_timeout_ms / 1000
    try:
        addresses = await resolve(host, family, lookup_servers(ctx), timeout)
    except ResolveError as exc:
        raise ExecFail(f"unknown host {host}: {exc}") from None
    return Reply(final=PROMPT, send=SendRequest(link_id, length, (_admit(ctx, link_id, addresses, port), port), kind))


# -- AT+CIPCLOSE ----------------------------------------------------------------------


async def _close(ctx: Context, ids: list[int]) -> Reply:
    body = b""
    for link_id in ids:
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


@handles("+CIPRECVDATA", Kind.SET)
def ciprecvdata(ctx: Context, line: CommandLine) -> Reply:
    if ctx.mux:
        link_id, length = bind(line.tokens, (_link_id_spec(ctx), Int(1, 0x7FFFFFFF)))
    else:
        (length,) = bind(line.tokens, (Int(1, 0x7FFFFFFF),))
        link_id = 0
    if not ctx.links.is_passive(link_id):
        raise ExecFail(f"link {link_id} is in active receive mode (AT+CIPRECVTYPE)")
    if ctx.links.unread(link_id) == 0:
        raise ExecFail(f"no data: link {link_id} has nothing buffered")
    view = ctx.links.view(link_id)
    data = ctx.links.read(link_id, length)
    head = b"+CIPRECVDATA:%d," % len(data)
    if ctx.state.cipdinfo and view is not None:
        head += fields(q(view.remote_ip), view.remote_port) + b","
    # The data runs straight into the final \r\nOK\r\n, with no line end of its own.
    return Reply(head + data, after=lambda: ctx.links.after_read(link_id))


@handles("+CIPRECVLEN", Kind.QUERY)
def ciprecvlen(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPRECVLEN", *(ctx.links.unread(i) for i in range(ctx.links.count))))


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


@handles("+CIPTCPOPT", Kind.QUERY)
def ciptcpopt_query(ctx: Context, line: CommandLine) -> Reply:
    ids = range(ctx.links.count) if ctx.mux else range(1)
    return Reply(b"".join(info("+CIPTCPOPT", i, *ctx.state.tcpopts[i]) for i in ids))


@handles("+CIPTCPOPT", Kind.SET)
def ciptcpopt_set(ctx: Context, line: CommandLine) -> Reply:
    if ctx.mux:
        link_id, *values = bind(line.tokens, (Int(0, ALL_LINKS),) + _TCPOPT_SPECS, min_count=4)
        if link_id != ALL_LINKS and link_id >= ctx.links.count:
            raise ParamInvalid(f"link id {link_id} out of range", 1)
        ids = range(ctx.links.count) if link_id == ALL_LINKS else [link_id]
    else:
        values = bind(line.tokens, _TCPOPT_SPECS, min_count=3)
        ids = [0]
    for i in ids:
        opts = ctx.state.tcpopts[i]
        for index, value in enumerate(values):
            if value is not None:  # an omitted option keeps its value
                opts[index] = value
        ctx.links.set_options(i, opts[0], opts[1], opts[3])
    ctx.state.persist(ctx.store, "tcpopts")
    return Reply()
