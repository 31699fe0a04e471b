"""uart.dispatch: a command handler that raises (a bug of ours, not the host's) is
answered ERROR, logged as command_crashed, and the next command is handled."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

from bridged.at.parser import Parser
from bridged.at.session import Ready, Session
from bridged.commands.registry import Reply
from bridged.ops.status import UartCounters
from bridged.readgate import ReadGate
from bridged.uart.dispatch import CommandDispatch


class _Faults:
    """The front's fault hooks with the AT fault kind on (no short paths), its
    dispatch a handler that raises for AT+CRASH and answers OK otherwise."""

    at_commands = True

    @staticmethod
    def refuse(line) -> bool:
        return False

    @staticmethod
    def dispatch(ctx, line) -> Reply:
        if line.name == "+CRASH":
            raise KeyError("a bug")
        return Reply(b"", b"\r\nOK\r\n")


class _Front(CommandDispatch):
    def __init__(self) -> None:
        self.session = Session()
        self.session.handle(Ready(), 0.0)
        self.parser = Parser(256)
        self.faults = _Faults()
        self.tap = None
        self.counters = UartCounters()
        self.ctx = SimpleNamespace(state=SimpleNamespace(echo=False, syslog=False))
        self.written: list[bytes] = []
        self.output = SimpleNamespace(reply=self.written.append, backlogged=False)


def test_a_handler_that_raises_is_answered_error_and_the_next_command_runs(capsys):
    """AT+CRASH's handler raises: ERROR, command_crashed logged, and the AT behind it
    in the same read still gets its OK (nothing escapes into the port's read callback)."""
    front = _Front()
    front.parser.receive_bytes(b"AT+CRASH\r\nAT\r\n", 0.0)
    front._process()
    assert b"".join(front.written) == b"\r\nERROR\r\n\r\nOK\r\n"
    assert "command_crashed" in capsys.readouterr().out


class _Boom(_Faults):
    """The fault hook raises for AT+BOOM: a bug of ours outside the handler's guard."""

    @staticmethod
    def refuse(line) -> bool:
        if line.name == "+BOOM":
            raise KeyError("a bug")
        return False


def test_a_bug_in_a_later_share_leaves_the_port_read():
    """A flood's second share meets a bug of ours that escapes ``_process`` (here the fault
    hook raises): the loop logs it, as it would from the port's read callback, and the read
    gate is not left held for the share (the port would never be read again, while the
    heartbeat still answered); the next read's commands are handled."""

    async def run() -> tuple[list, frozenset, bool, bytes]:
        loop = asyncio.get_running_loop()
        caught: list = []
        loop.set_exception_handler(lambda loop, context: caught.append(context.get("exception")))
        read, write = os.pipe()
        front = _Front()
        front.faults = _Boom()
        front.loop = loop
        front._stopped = loop.create_future()
        front._gate = ReadGate(loop, lambda: None)
        front._gate.open(read)
        try:
            front.parser.receive_bytes(b"AT\r\n" * 64 + b"AT+BOOM\r\nAT\r\n", 0.0)
            front._process()  # the first share; the rest waits a loop pass
            assert front._gate.holds == {"command share"}
            for _ in range(3):
                await asyncio.sleep(0)
            holds, is_open = front._gate.holds, front._gate.is_open
            front._process()  # (as the next read would)
            return caught, holds, is_open, b"".join(front.written)
        finally:
            front._gate.close()
            os.close(read)
            os.close(write)

    caught, holds, is_open, written = asyncio.run(run())
    assert [type(exc) for exc in caught] == [KeyError]
    assert holds == frozenset() and is_open
    assert written == b"\r\nOK\r\n" * 65
