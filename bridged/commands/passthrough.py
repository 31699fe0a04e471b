"""Passthrough ("transparent transmission"): AT+CIPMODE, AT+CIPSEND without
parameters, AT+TRANSINTVL, AT+CIPRECONNINTV, AT+SAVETRANSLINK.

Rules (spec AT+CIPMODE / AT+CIPSEND notes, esp-at-behavior.md 3.6, 4.2):
passthrough needs one usable link: the single connection (TCP, or UDP whose
<mode> is 0), or (from ESP-AT 2.3, #631) the one client of a server limited
to one connection.
After ``+++`` CIPMODE stays 1 (passthrough receiving mode: data still comes
raw); AT+CIPSEND enters again.  AT+SAVETRANSLINK is always stored and takes
effect at the next boot: bridged connects and enters passthrough by itself,
printing ``\\r\\n>``.
"""

from __future__ import annotations

from bridged.at.datamode import DataKind
from bridged.at.errors import ExecFail
from bridged.at.format import PROMPT, info
from bridged.at.params import Int, Str, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import ConnectSpec, Context
from bridged.commands.dns import lookup_servers
from bridged.commands.registry import Reply, SendRequest, handles
from bridged.commands.ssl import with_tls

__all__ = ["saved_link"]


def _passthrough_link(ctx: Context) -> int | None:
    """The link passthrough would use, or None."""
    if not ctx.mux:
        return 0 if ctx.links.can_send(0) else None
    if not ctx.personality.server_passthrough:
        return None
    server = ctx.server
    if not server.running or server.max_conn != 1:
        return None
    clients = ctx.links.server_links()
    return clients[0] if clients and ctx.links.can_send(clients[0]) else None


def _check_cipmode(ctx: Context) -> None:
    links = [i for i in range(ctx.links.count) if ctx.links.is_busy(i)]
    if ctx.mux:
        if not ctx.personality.server_passthrough:
            raise ExecFail("passthrough needs AT+CIPMUX=0 (a server's passthrough came in ESP-AT 2.3)")
        server = ctx.server
        clients = [i for i in links if i not in ctx.links.server_links()]
        if len(clients) > 1:
            raise ExecFail("shouldn't set cipmode with existed multiple clients")
        if clients and server.running:
            raise ExecFail("shouldn't set cipmode with existed client and server")
        if not server.running or server.max_conn != 1:
            raise ExecFail("passthrough needs AT+CIPMUX=0, or a server with AT+CIPSERVERMAXCONN=1")
    spec = ctx.links.spec(0) if not ctx.mux else None
    if spec is not None and spec.type.startswith("UDP") and spec.udp_mode != 0:
        raise ExecFail("UDP passthrough needs AT+CIPSTART <mode> 0")


@handles("+CIPMODE", Kind.QUERY)
def cipmode_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPMODE", ctx.state.cipmode))


@handles("+CIPMODE", Kind.SET)
def cipmode_set(ctx: Context, line: CommandLine) -> Reply:
    (mode,) = bind(line.tokens, (Int(0, 1),))
    if mode == 1:
        _check_cipmode(ctx)
    ctx.state.cipmode = mode
    return Reply()


@handles("+CIPSEND", Kind.EXECUTE)
def cipsend_passthrough(ctx: Context, line: CommandLine) -> Reply:
    if ctx.state.cipmode != 1:
        raise ExecFail("AT+CIPSEND without parameters needs AT+CIPMODE=1")
    link_id = _passthrough_link(ctx)
    if link_id is None:
        raise ExecFail("no link for passthrough")
    return Reply(final=PROMPT, send=SendRequest(link_id, 0, kind=DataKind.PASSTHROUGH))


@handles("+TRANSINTVL", Kind.QUERY)
def transintvl_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+TRANSINTVL", ctx.state.transintvl))


@handles("+TRANSINTVL", Kind.SET)
def transintvl_set(ctx: Context, line: CommandLine) -> Reply:
    (ms,) = bind(line.tokens, (Int(0, 1000),))
    ctx.state.transintvl = ms
    return Reply()


@handles("+CIPRECONNINTV", Kind.QUERY)
def reconnintv_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPRECONNINTV", ctx.state.reconnintv))


@handles("+CIPRECONNINTV", Kind.SET)
def reconnintv_set(ctx: Context, line: CommandLine) -> Reply:
    (interval,) = bind(line.tokens, (Int(1, 36000),))
    ctx.state.reconnintv = interval
    ctx.state.persist(ctx.store, "reconnintv")
    return Reply()


_SAVE_TYPES = ("TCP", "TCPv6", "UDP", "UDPv6", "SSL", "SSLv6")


@handles("+SAVETRANSLINK", Kind.SET)
def savetranslink_set(ctx: Context, line: CommandLine) -> Reply:
    (mode,) = bind(line.tokens[:1], (Int(0, 1),))
    if mode == 0:
        ctx.store.delete("savetranslink")
        return Reply()
    _, host, port, type_ = bind(line.tokens[:4], (Int(0, 1), Str(64), Int(1, 65535), Str(6, "TCP")))
    if type_ not in _SAVE_TYPES:
        raise ExecFail(f"AT+SAVETRANSLINK type {type_!r}: TCP, TCPv6, SSL, SSLv6, UDP or UDPv6")
    if type_.startswith("UDP"):
        (local_port,) = bind(line.tokens[4:], (Int(0, 65535, 0),))
        saved = {"type": type_, "host": host, "port": port, "local_port": local_port, "keep_alive": 0}
    else:
        (keep_alive,) = bind(line.tokens[4:], (Int(0, 7200, 0),))
        saved = {"type": type_, "host": host, "port": port, "local_port": 0, "keep_alive": keep_alive}
    ctx.store.set("savetranslink", saved)  # always stored, whatever AT+SYSSTORE says
    return Reply()


def saved_link(ctx: Context) -> tuple[ConnectSpec, int] | None:
    """The boot-time passthrough link AT+SAVETRANSLINK stored, with its keep-alive."""
    saved = ctx.store.get("savetranslink")
    if not saved:
        return None
    spec = ConnectSpec(saved["type"], saved["host"], saved["port"], local_port=saved["local_port"],
                       dns_servers=lookup_servers(ctx))
    if spec.type.startswith("SSL"):  # the stored AT+CIPSSLCCONF of link 0 applies
        spec = with_tls(ctx, 0, spec)
    return spec, saved["keep_alive"]
