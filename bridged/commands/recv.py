"""AT+CIPRECVDATA and AT+CIPRECVLEN: passive receive mode's reads (the mode
itself, AT+CIPRECVTYPE/AT+CIPRECVMODE, is bridged.commands.tcpip's).

A driver in passive mode polls and reads in small pieces, the same line
hundreds of times a second: ``quick_recv`` answers a read line this session
answered before without the registry's walk and the parameters' binding
(as ``commands.send.quick_send`` does for the send lines).  Only the binding
is remembered; every check of the link runs on each read, as on the normal
path, and any failure goes the normal way (the same ERROR).
"""

from __future__ import annotations

from bridged.at.errors import AtError, ExecFail
from bridged.at.format import fields, info, q
from bridged.at.params import Int, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import Context
from bridged.commands.registry import Reply, handles

__all__ = ["quick_recv"]

_QUICK_LINES = 64  # read lines remembered per session (a driver repeats a few)
_MAX_READ = Int(1, 0x7FFFFFFF)


@handles("+CIPRECVDATA", Kind.SET)
def ciprecvdata(ctx: Context, line: CommandLine) -> Reply:
    if ctx.mux:
        link_id, length = bind(line.tokens, (Int(0, ctx.links.count - 1), _MAX_READ))
    else:
        (length,) = bind(line.tokens, (_MAX_READ,))
        link_id = 0
    reply = _read(ctx, link_id, length)
    quick = ctx.quick_reads
    if len(quick) >= _QUICK_LINES:
        quick.clear()
    quick[line.raw] = (ctx.state.cipmux, link_id, length)
    return reply


def quick_recv(ctx: Context, line: CommandLine) -> Reply | None:
    """The answer to an AT+CIPRECVDATA line this session bound before, under the
    same AT+CIPMUX, when it reads data; None: ask the registry (which answers
    a failed read with its ERROR).  The command exists in this ESP-AT version
    and binds the same (the config is the process's) since it did then."""
    hit = ctx.quick_reads.get(line.raw)
    if hit is None or hit[0] != ctx.state.cipmux:
        return None
    try:
        return _read(ctx, hit[1], hit[2])
    except AtError:
        return None  # nothing was taken: the registry's path fails the same way


def _read(ctx: Context, link_id: int, length: int) -> Reply:
    links = ctx.links
    if not links.is_passive(link_id):
        raise ExecFail(f"link {link_id} is in active receive mode (AT+CIPRECVTYPE)")
    if links.unread(link_id) == 0:
        raise ExecFail(f"no data: link {link_id} has nothing buffered")
    view = links.view(link_id)
    data = links.read(link_id, length)
    head = b"+CIPRECVDATA:%d," % len(data)
    if ctx.state.cipdinfo and view is not None:
        head += fields(q(view.remote_ip), view.remote_port) + b","
    # The data runs straight into the final \r\nOK\r\n, with no line end of its own.
    return Reply(head + data, then=lambda: links.after_read(link_id))


@handles("+CIPRECVLEN", Kind.QUERY)
def ciprecvlen(ctx: Context, line: CommandLine) -> Reply:
    """Unread bytes per link; a link not connected shows the version's value
    (-1 before 3.0: WiFiEspAT's AT 2 mode reads anything else as connected)."""
    fw = ctx.personality
    values = []
    for link_id in range(fw.recvlen_fields(ctx.links.count, ctx.mux)):
        # unread() first: it may find that a drained link has ended.
        unread = ctx.links.unread(link_id) if link_id < ctx.links.count else 0
        connected = link_id < ctx.links.count and ctx.links.view(link_id) is not None
        values.append(unread if connected else fw.recvlen_unused)
    return Reply(info("+CIPRECVLEN", *values))
