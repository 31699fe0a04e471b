"""Basic AT commands: AT, ATE, AT+RST, AT+GMR, AT+RESTORE, AT+SYSSTORE,
AT+SYSMSG, AT+SYSLOG, AT+RFPOWER, AT+SYSRAM, AT+UART_CUR/_DEF.

Byte formats from esp-at-behavior.md section 1.  The query lines ESP-AT
prints without a line end (AT+SYSMSG?, AT+SYSRAM?) use ``info(eol=False)``.
"""

from __future__ import annotations

import bridged
from bridged.at.format import info, q
from bridged.at.params import Int, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import Context, UartSettings
from bridged.commands.options import SysMsg
from bridged.commands.registry import Reply, forms, handles, names

# Fixed so that AT+GMR reads the same on every run of one release, in C's
# __DATE__ __TIME__ layout (day space-padded), as ESP-AT prints its build time.
BUILD_TIME = "Nov 26 2026 00:00:00"


def gmr_text(ctx: Context) -> bytes:
    fw = ctx.config.firmware
    version = f"bridged-{bridged.__version__}"
    lines = (
        f"AT version:{fw.at_version}({version} - ESP32 - {BUILD_TIME})",
        f"SDK version:{fw.sdk_version}",
        f"compile time({version}):{BUILD_TIME}",
        f"Bin version:{ctx.personality.bin_version}({fw.module})",
    )
    return "".join(line + "\r\n" for line in lines).encode("ascii")


@handles("", Kind.EXECUTE)
def at(ctx: Context, line: CommandLine) -> Reply:
    return Reply()


@handles("E0", Kind.EXECUTE)
def echo_off(ctx: Context, line: CommandLine) -> Reply:
    ctx.state.echo = False
    return Reply()


@handles("E1", Kind.EXECUTE)
def echo_on(ctx: Context, line: CommandLine) -> Reply:
    ctx.state.echo = True
    return Reply()


@handles("+RST", Kind.EXECUTE)
def rst(ctx: Context, line: CommandLine) -> Reply:
    return Reply(then=ctx.silence_links, after=lambda: ctx.restart(False))


@handles("+RESTORE", Kind.EXECUTE)
def restore(ctx: Context, line: CommandLine) -> Reply:
    return Reply(then=ctx.silence_links, after=lambda: ctx.restart(True))


@handles("+GMR", Kind.EXECUTE)
def gmr(ctx: Context, line: CommandLine) -> Reply:
    return Reply(gmr_text(ctx))


@handles("+SYSSTORE", Kind.QUERY)
def sysstore_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+SYSSTORE", int(ctx.state.sysstore)))


@handles("+SYSSTORE", Kind.SET)
def sysstore_set(ctx: Context, line: CommandLine) -> Reply:
    (value,) = bind(line.tokens, (Int(0, 1),))
    ctx.state.sysstore = bool(value)
    return Reply()


@handles("+SYSMSG", Kind.QUERY)
def sysmsg_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+SYSMSG", int(ctx.state.sysmsg), eol=False))


@handles("+SYSMSG", Kind.SET)
def sysmsg_set(ctx: Context, line: CommandLine) -> Reply:
    (value,) = bind(line.tokens, (Int(0, 7),))
    ctx.state.sysmsg = SysMsg(value)
    ctx.state.persist(ctx.store, "sysmsg")
    return Reply()


@handles("+SYSLOG", Kind.QUERY)
def syslog_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+SYSLOG", int(ctx.state.syslog)))


@handles("+SYSLOG", Kind.SET)
def syslog_set(ctx: Context, line: CommandLine) -> Reply:
    (value,) = bind(line.tokens, (Int(0, 1),))
    ctx.state.syslog = bool(value)
    return Reply()


@handles("+RFPOWER", Kind.QUERY)
def rfpower_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info("+RFPOWER", *ctx.state.rfpower))


@handles("+RFPOWER", Kind.SET)
def rfpower_set(ctx: Context, line: CommandLine) -> Reply:
    old = ctx.state.rfpower
    wifi, adv, scan, conn = bind(
        line.tokens, (Int(40, 84), Int(0, 15, old[1]), Int(0, 15, old[2]), Int(0, 15, old[3]))
    )
    ctx.state.rfpower = (wifi, adv, scan, conn)
    return Reply()


@handles("+SYSRAM", Kind.QUERY)
def sysram_query(ctx: Context, line: CommandLine) -> Reply:
    # Plausible ESP32 figures (the docs' example); drivers only display them.
    return Reply(info("+SYSRAM", 148408, 84044, eol=False))


# -- AT+UART_CUR / AT+UART_DEF / AT+UART ----------------------------------------

_UART_SPECS = (Int(80, 5_000_000), Int(5, 8), Int(1, 3), Int(0, 2), Int(0, 3))


def _uart_reply(ctx: Context, line: CommandLine, persist: bool) -> Reply:
    settings = UartSettings(*bind(line.tokens, _UART_SPECS))
    if persist:
        ctx.store.set("uart_def", list(settings.fields()))
    # OK goes out at the old settings; the port changes once it has drained.
    return Reply(after=lambda: ctx.apply_uart(settings))


@handles("+UART_CUR", Kind.QUERY)
@handles("+UART", Kind.QUERY)
def uart_cur_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(info(line.name, *ctx.uart.fields()))


@handles("+UART_DEF", Kind.QUERY)
def uart_def_query(ctx: Context, line: CommandLine) -> Reply:
    stored = ctx.store.get("uart_def")
    fields = tuple(stored) if stored else ctx.uart_factory.fields()
    return Reply(info("+UART_DEF", *fields))


@handles("+UART_CUR", Kind.SET)
def uart_cur_set(ctx: Context, line: CommandLine) -> Reply:
    return _uart_reply(ctx, line, persist=False)


@handles("+UART_DEF", Kind.SET)
@handles("+UART", Kind.SET)
def uart_def_set(ctx: Context, line: CommandLine) -> Reply:
    return _uart_reply(ctx, line, persist=True)


@handles("+CMD", Kind.QUERY)
def cmd_query(ctx: Context, line: CommandLine) -> Reply:
    """The command list: index, name, then 0/1 for the test, query, set and execute forms."""
    body = b""
    present = [name for name in names() if ctx.personality.has_command(name)]
    for index, name in enumerate(present):
        have = forms(name)
        flags = [int(kind in have) for kind in (Kind.TEST, Kind.QUERY, Kind.SET, Kind.EXECUTE)]
        body += info("+CMD", index, q("AT" + name), *flags)
    return Reply(body)
