"""The short path's memory of send lines (bridged.commands.send) stays bounded, without a daemon."""

from __future__ import annotations

from types import SimpleNamespace

from bridged.at.datamode import DataKind
from bridged.at.parser import parse_command_line
from bridged.commands import send
from bridged.commands.context import SessionState
from bridged.commands.registry import SendRequest


def test_a_host_sending_many_distinct_lines_keeps_at_most_64():
    """1000 distinct prompted send lines (a hostile host's lengths 1..1000) leave at most 64
    remembered, and the last one is among them (the memory is bounded, never stale-only)."""
    ctx = SimpleNamespace(quick_sends={}, state=SessionState())
    for length in range(1, 1001):
        line = parse_command_line(b"AT+CIPSEND=0,%d\r\n" % length)
        send._remember(ctx, line, SendRequest(0, length, kind=DataKind.SEND))
        assert len(ctx.quick_sends) <= 64
    assert ctx.quick_sends[b"AT+CIPSEND=0,1000\r\n"] == (0, SendRequest(0, 1000, kind=DataKind.SEND), "+CIPSEND")
