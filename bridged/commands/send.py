"""AT+CIPSEND, AT+CIPSENDEX and AT+CIPSENDL (set forms: normal transmission
mode) and AT+CIPSENDLCFG.  Each checks the link and answers the ``>`` prompt
with a SendRequest; the data phase is bridged.at.datamode's.  AT+CIPSEND's
execute form, passthrough, is bridged.commands.passthrough's.

Every rejection is a bare ERROR on the AT port (``invalid link`` and the like
go to bridged's log), as in bridged.commands.tcpip.
"""

from __future__ import annotations

import functools
import ipaddress
import socket

from bridged.at.datamode import DataKind
from bridged.at.errors import ExecFail, ParamCountMismatch
from bridged.at.format import PROMPT, info
from bridged.at.params import Int, Spec, Str, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import Context, LinkView
from bridged.commands.dns import lookup_servers
from bridged.commands.registry import Reply, SendRequest, handles
from bridged.net.localaddr import link_policy
from bridged.net.resolver import ResolveError, resolve

__all__ = ["quick_send"]

_QUICK_LINES = 64  # send lines remembered per session (a host repeats a few, hundreds of times a second)


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
        request = SendRequest(link_id, length, kind=kind)
        _remember(ctx, line, request)
        return Reply(final=PROMPT, send=request)
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


def _remember(ctx: Context, line: CommandLine, request: SendRequest) -> None:
    """A TCP send line that got its prompt: `quick_send` may answer it next time."""
    quick = ctx.quick_sends
    if len(quick) >= _QUICK_LINES:
        quick.clear()
    quick[line.raw] = (ctx.state.cipmux, request, line.name)


def quick_send(ctx: Context, raw: bytes) -> tuple[SendRequest, str] | None:
    """The prompt's request (and the command's name) for a send line, ``raw`` with
    its \\r\\n, this session answered with one before, when every check
    `_send_command` made still passes (CIPMODE=0, the same CIPMUX, the link open
    to sends and still TCP); None: ask the registry.

    The parameters were bound and the command found in this ESP-AT version
    then; neither can change within a session (the config is the process's).
    """
    hit = ctx.quick_sends.get(raw)
    if hit is None:
        return None
    mux, request, name = hit
    state = ctx.state
    if state.cipmode != 0 or state.cipmux != mux:
        return None
    links = ctx.links
    link_id = request.link_id
    if not links.can_send(link_id) or links.view(link_id).type.startswith("UDP"):
        return None
    return request, name


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
