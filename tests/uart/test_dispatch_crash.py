"""uart.dispatch: a command handler that raises (a bug of ours, not the host's) is
answered ERROR, logged as command_crashed, and the next command is handled."""

from __future__ import annotations

from types import SimpleNamespace

from bridged.at.parser import Parser
from bridged.at.session import Ready, Session
from bridged.commands.registry import Reply
from bridged.ops.status import UartCounters
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
