"""bridged.uart.flow: which flow control value drives RTS, when, and what a
port without modem lines (a pty) costs: one log line, no crash."""

from __future__ import annotations

import os
import termios

import pytest
from structlog.testing import capture_logs

from bridged.commands.context import UartSettings
from bridged.uart.flow import QUEUE_HIGH, Flow, RtsControl, TtyModemLines, crtscts
from bridged.uart.port import SerialPort, apply_termios


class FakeLines:
    """Modem lines that record every RTS change asked of them."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def set_rts(self, asserted: bool) -> None:
        self.calls.append(asserted)


class Queue:
    """The kernel's input queue, as the test says it is."""

    def __init__(self) -> None:
        self.size = 0

    def __call__(self) -> int:
        return self.size


def _control(flow: Flow) -> tuple[RtsControl, FakeLines, Queue]:
    queue, lines = Queue(), FakeLines()
    control = RtsControl(queue)
    control.attach(lines, flow, fresh=True)
    return control, lines, queue


def test_rts_follows_the_held_input():
    """rts: RTS drops when the front starts holding input and rises when it stops, once each."""
    control, lines, _ = _control(Flow.RTS)
    assert lines.calls == [True]  # set at open: a port without modem lines shows at start
    control.input_held(True)
    control.input_held(True)
    control.input_held(False)
    control.input_held(False)
    assert lines.calls == [True, False, True]


def test_rts_drops_while_the_kernel_queue_is_past_the_high_water_mark():
    """rts: a big read with the kernel's queue still past QUEUE_HIGH drops RTS
    until a read finds it below; small reads never ask the kernel."""
    control, lines, queue = _control(Flow.RTS)
    queue.size = 10 * QUEUE_HIGH
    control.after_read(QUEUE_HIGH - 1)  # small: not even looked at
    assert lines.calls == [True]
    control.after_read(4095)
    assert lines.calls == [True, False]
    control.after_read(100)  # while dropped, every read looks again
    assert lines.calls == [True, False]
    queue.size = 0
    control.after_read(100)
    assert lines.calls == [True, False, True]


@pytest.mark.parametrize("flow", [Flow.NONE, Flow.CTS, Flow.RTSCTS])
def test_other_flows_leave_rts_alone(flow):
    """none, cts, rtscts: held input and full queues never touch RTS (none: asserted; else the kernel's)."""
    control, lines, queue = _control(flow)
    queue.size = 10 * QUEUE_HIGH
    control.input_held(True)
    control.after_read(4095)
    control.input_held(False)
    assert lines.calls == []


def test_leaving_rts_with_rts_dropped_gives_the_line_back_asserted():
    """AT+UART_CUR from rts (held, RTS low) to none or cts: RTS is raised once, then left alone."""
    control, lines, _ = _control(Flow.RTS)
    control.input_held(True)
    control.attach(lines, Flow.NONE)
    control.input_held(False)
    control.input_held(True)
    assert lines.calls == [True, False, True]


def test_entering_rts_while_held_drops_rts_at_once():
    """AT+UART_CUR to rts while input is held: RTS goes down then, not at the next change."""
    control, lines, _ = _control(Flow.CTS)
    control.input_held(True)
    control.attach(lines, Flow.RTS)
    assert lines.calls == [False]


def test_crtscts_only_where_cts_is_honoured():
    """The kernel's CRTSCTS is on for cts and rtscts, off for none and rts."""
    assert [crtscts(f) for f in Flow] == [False, False, True, True]


def test_a_pty_has_no_modem_lines_said_once(pty_pair):
    """TIOCMBIS fails on a pty: one warning naming the port, then nothing, never an exception."""
    _, slave = pty_pair
    lines = TtyModemLines(slave, "/dev/ttyTEST")
    with capture_logs() as logs:
        for asserted in (True, False, True, False):
            lines.set_rts(asserted)
    assert not lines.usable
    assert [e["event"] for e in logs] == ["rts_not_driven"]
    assert logs[0]["port"] == "/dev/ttyTEST" and "no modem lines" in logs[0]["why"]


@pytest.mark.parametrize("flow", list(Flow))
def test_serial_port_sets_crtscts_per_flow_and_keeps_it_through_apply(pty_pair, flow):
    """SerialPort on a tty: CRTSCTS as the flow says, at open and after AT+UART_CUR (apply)."""
    _, slave = pty_pair
    port = SerialPort(os.ttyname(slave), UartSettings(115200, 8, 1, 0, int(flow)))
    try:
        assert bool(termios.tcgetattr(slave)[2] & termios.CRTSCTS) == crtscts(flow)
        other = Flow(3 - flow)
        port.apply(UartSettings(115200, 8, 1, 0, int(other)))
        assert bool(termios.tcgetattr(slave)[2] & termios.CRTSCTS) == crtscts(other)
        assert port.settings.flow == other
    finally:
        port.close()


@pytest.mark.parametrize("flow", list(Flow))
def test_a_pty_gets_crtscts_per_flow_too(pty_pair, flow):
    """--pty (apply_termios on the slave): the same CRTSCTS rule as a real port."""
    _, slave = pty_pair
    apply_termios(slave, UartSettings(115200, 8, 1, 0, int(Flow(3 - flow))))
    apply_termios(slave, UartSettings(115200, 8, 1, 0, int(flow)))
    assert bool(termios.tcgetattr(slave)[2] & termios.CRTSCTS) == crtscts(flow)
