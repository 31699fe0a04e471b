"""Command table: name and form -> handler.

Up to four forms per command, as ESP-AT registers them (at_uart_cmd.c):
test ``AT+X=?``, query ``AT+X?``, set ``AT+X=...``, execute ``AT+X``.  A form a
command does not have answers ERROR (ERR CODE subcategory 0x0C), an unknown
name ERROR (0x09).

A command the configured ESP-AT version lacks (bridged.firmware) answers as an
unknown one.

Handlers take the session context and the parsed line and return a ``Reply``
(or a coroutine that returns one, for commands that wait on the network: the
front answers ``busy p...`` to input meanwhile).  They never write to the UART.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from bridged.at.datamode import DataKind
from bridged.at.errors import OperationNotSupported, UnsupportedCommand
from bridged.at.format import OK
from bridged.at.parser import CommandLine, Kind

if TYPE_CHECKING:
    from bridged.commands.context import Context

__all__ = ["Reply", "SendRequest", "handles", "lookup", "dispatch", "names", "carries_secret"]

# Commands whose parameters hold a password or a key: the log says their name
# and why they failed, never a parameter (AtError.value) of theirs.  Some are
# not emulated; a line naming one still never has its parameters logged.
_SECRET_CARRYING = frozenset({
    "+CWJAP", "+CWSAP", "+CWJEAP", "+CIPSSLCPSK", "+CIPSSLCPSKHEX",
    "+MQTTUSERCFG", "+MQTTLONGPASSWORD", "+HTTPCLIENT", "+HTTPURLCFG",
})


@dataclass(frozen=True, slots=True)
class SendRequest:
    """After the ``>`` prompt, payload goes to ``link_id`` as ``kind`` says."""

    link_id: int
    length: int
    remote: tuple[str, int] | None = None
    kind: DataKind = DataKind.SEND


@dataclass(frozen=True, slots=True)
class Reply:
    """What a command answers.

    Attributes:
        body: information lines written before the final result.
        final: the result code (OK, ERROR, PROMPT ...).
        after: called once the reply has been handed to the UART (a baud
            change, a restart); input waits meanwhile.
        then: called as soon as the reply is queued, to queue what must
            follow it (a URC after OK: the UART output keeps that order);
            never waits, so the next command's answer never waits either.
        send: with final=PROMPT, where the payload that follows goes.
    """

    body: bytes = b""
    final: bytes = OK
    after: Callable[[], Any] | None = None
    then: Callable[[], Any] | None = None
    send: SendRequest | None = None


Handler = Callable[["Context", CommandLine], "Reply | Awaitable[Reply]"]

_TABLE: dict[tuple[str, Kind], Handler] = {}


def handles(name: str, *kinds: Kind) -> Callable[[Handler], Handler]:
    """Register the decorated function for ``name`` in the given forms."""

    def register(fn: Handler) -> Handler:
        for kind in kinds:
            key = (name, kind)
            if key in _TABLE:
                raise RuntimeError(f"AT{name}{kind.value} registered twice")
            _TABLE[key] = fn
        return fn

    return register


def lookup(name: str, kind: Kind) -> Handler:
    """The handler for a command line's name and form.

    Raises:
        UnsupportedCommand: no command of that name.
        OperationNotSupported: the command exists but not in that form.
    """
    handler = _TABLE.get((name, kind))
    if handler is not None:
        return handler
    if any(n == name for n, _ in _TABLE):
        raise OperationNotSupported(f"AT{name} has no {kind.name.lower()} form")
    raise UnsupportedCommand(f"unknown command AT{name}")


def dispatch(ctx: "Context", line: CommandLine) -> "Reply | Awaitable[Reply]":
    """Run a command line's handler, as the configured ESP-AT version would.

    Raises:
        UnsupportedCommand: no such command, or not in this ESP-AT version.
        OperationNotSupported: the command has no such form.
    """
    if not ctx.personality.has_command(line.name):
        raise UnsupportedCommand(f"AT{line.name} does not exist in ESP-AT {ctx.config.firmware.at_version}")
    return lookup(line.name, line.kind)(ctx, line)


def is_async(result: object) -> bool:
    return inspect.isawaitable(result)


def carries_secret(name: str) -> bool:
    """Whether AT<name>'s parameters may hold a password or a key."""
    return name.upper() in _SECRET_CARRYING


def names() -> list[str]:
    return sorted({n for n, _ in _TABLE})


def forms(name: str) -> set[Kind]:
    return {kind for n, kind in _TABLE if n == name}
