"""AT+CIPSERVER, AT+CIPSERVERMAXCONN, AT+CIPSTO.

Rules from the spec's notes and ESP-AT's handlers (esp-at-behavior.md 3.10):
a server needs AT+CIPMUX=1; there is at most one; the port defaults to 333;
AT+CIPSERVERMAXCONN must come before the server; AT+CIPSTO is accepted only
while a server runs (its query works any time); deleting with <param2>=1
closes the server's clients, 0 keeps them.  From ESP-AT 4.1 a fifth
parameter, <netif>, picks the interface to listen on and the query shows it.
"""

from __future__ import annotations

from bridged.at.errors import ExecFail, ParamCountMismatch
from bridged.at.format import closed, info, q
from bridged.at.params import OMITTED, Int, Str, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import Context
from bridged.commands.registry import Reply, handles
from bridged.commands.wifi import station
from bridged.net.interfaces import interface_info, own_address

__all__: list[str] = []

SERVER_TYPES = ("TCP", "TCPv6", "SSL", "SSLv6")


@handles("+CIPSERVER", Kind.QUERY)
def cipserver_query(ctx: Context, line: CommandLine) -> Reply:
    server = ctx.server
    if not server.running:
        return Reply(info("+CIPSERVER", 0))
    netif = (server.netif,) if ctx.personality.server_netif else ()
    return Reply(info("+CIPSERVER", 1, server.port, q(server.type), server.ca_enable, *netif))


_CREATE_SPECS = (Int(0, 1), Int(1, 65535, 333), Str(6, "TCP"), Int(0, 1, 0))
_NETIF = Int(0, 3, 0)  # 0 all interfaces, 1 station, 2 softAP, 3 Ethernet (ESP-AT 4.1+)


@handles("+CIPSERVER", Kind.SET)
def cipserver_set(ctx: Context, line: CommandLine):
    tokens = line.tokens
    (mode,) = bind(tokens[:1], (Int(0, 1),))
    if mode == 0:
        if len(tokens) > 2 and any(t is not OMITTED for t in tokens[2:]):
            raise ParamCountMismatch("<type> and <CA enable> must be omitted when deleting a server")
        _, close_clients = bind(tokens[:2], (Int(0, 1), Int(0, 1, 0)))
        return _delete(ctx, bool(close_clients))
    if ctx.personality.server_netif:
        _, port, type_, ca_enable, netif = bind(tokens, _CREATE_SPECS + (_NETIF,))
    else:
        (_, port, type_, ca_enable), netif = bind(tokens, _CREATE_SPECS), 0
    return _create(ctx, port, type_, ca_enable, netif)


def _listen_ip(ctx: Context, type_: str, netif: int) -> str:
    """The address to listen on ("" = all).

    The interface's own address, not the wildcard, so the server hears only
    what the ESP's own address would receive.  <netif> 0 and 1 keep
    bridged's choice, the station's (its IPv4 once joined, else all
    addresses); 2 and 3 take the IPv4 of ``[wifi] ap_interface`` /
    ``eth_interface``.  An IPv6 server takes that interface's first global
    IPv6 address (::1 on ``lo``), or all addresses when it has none.
    """
    v6 = type_.endswith("v6")
    if netif in (0, 1):
        iface = station(ctx)
        if v6:
            return own_address(iface.name, v6=True) if iface.is_up else ""
        return iface.ipv4 if iface.connected else ""
    name = ctx.config.wifi.ap_interface if netif == 2 else ctx.config.wifi.eth_interface
    if v6:
        return own_address(name, v6=True) if name else ""
    if netif == 2 and ctx.state.cwmode not in (2, 3):
        raise ExecFail("<netif> 2 needs the softAP (AT+CWMODE=2 or 3)")
    iface = interface_info(name) if name else None
    if iface is None or not iface.connected:
        raise ExecFail(f"<netif> {netif}: no {'softAP' if netif == 2 else 'Ethernet'} interface with an IPv4 address")
    return iface.ipv4


def _create(ctx: Context, port: int, type_: str, ca_enable: int, netif: int) -> Reply:
    server = ctx.server
    if not ctx.mux:
        raise ExecFail("a server needs AT+CIPMUX=1")
    if type_ not in SERVER_TYPES:
        raise ExecFail(f"server type {type_!r}: TCP, TCPv6, SSL or SSLv6")
    if type_.endswith("v6") and not ctx.state.cipv6:
        raise ExecFail("IPv6 is disabled: AT+CIPV6=1 first")
    if server.running:
        if (server.port, server.type) == (port, type_):
            return Reply()  # ESP-AT logs "no change"
        raise ExecFail(f"server has already been started on port {server.port}")
    bind_ip = _listen_ip(ctx, type_, netif)
    try:
        server.start(port, type_, ca_enable, bind_ip, netif)
    except OSError as exc:
        raise ExecFail(f"cannot listen on port {port}: {exc.strerror or exc}") from None
    server.update()
    return Reply()


async def _close_all(ctx: Context, link_ids: list[int]) -> Reply:
    body = b""
    for link_id in link_ids:
        if ctx.links.view(link_id) is not None:
            await ctx.before_close(link_id)  # what a +++ left of its stream goes first, as for AT+CIPCLOSE
            await ctx.links.close(link_id)
            body += closed(link_id)
    return Reply(body)


def _delete(ctx: Context, close_clients: bool):
    if not ctx.server.running:
        raise ExecFail("no server is running")
    ctx.server.stop()
    if close_clients:
        return _close_all(ctx, ctx.links.server_links())
    return Reply()


@handles("+CIPSERVERMAXCONN", Kind.QUERY)
def maxconn_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPSERVERMAXCONN", ctx.server.max_conn))


@handles("+CIPSERVERMAXCONN", Kind.SET)
def maxconn_set(ctx: Context, line: CommandLine) -> Reply:
    (count,) = bind(line.tokens, (Int(1, ctx.links.count),))
    if ctx.server.running:
        raise ExecFail("server has already been started: set AT+CIPSERVERMAXCONN before AT+CIPSERVER")
    ctx.server.max_conn = count
    return Reply()


@handles("+CIPSTO", Kind.QUERY)
def cipsto_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+CIPSTO", ctx.server.timeout))


@handles("+CIPSTO", Kind.SET)
def cipsto_set(ctx: Context, line: CommandLine) -> Reply:
    (seconds,) = bind(line.tokens, (Int(0, 7200),))
    if not ctx.server.running:
        raise ExecFail("AT+CIPSTO needs a running server (AT+CIPSERVER=1 first)")
    ctx.server.timeout = seconds
    return Reply()
