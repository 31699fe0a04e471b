"""Faults and restarts: an at_reset that comes while a command's after-action waits for
its answer to go out."""

from __future__ import annotations

import time

from tests.integration.test_faults_at import fault_cli


def test_at_reset_while_an_after_action_waits_drops_it(make_daemon):
    """AT+UART_CUR=9600's OK is still on its way (paced at 300 baud behind AT+GMR's answer)
    when an at_reset comes: the chip restarts with AT+UART_DEF's speed, and the switch to
    9600 that the lost answer held back is not made after the boot."""
    daemon = make_daemon("[uart]\nbaud = 300\npace = true\n")
    host = daemon.host()
    host.boot()
    host.write(b"AT+GMR\r\nAT+UART_CUR=9600,8,1,0,0\r\n")
    host.expect(b"AT version:", timeout=10)  # both lines are read (paced too) before GMR's answer ends
    time.sleep(1.0)
    done = fault_cli(daemon, "at_reset")
    assert done.returncode == 0, done.stderr
    host.expect(b"\r\nready\r\n", timeout=30)
    host.read_quiet(0.3)
    assert b"\r\n+UART_CUR:300,8,1,0," in host.ask(b"AT+UART_CUR?", timeout=10)  # (echo on: ATE is not stored)
    assert daemon.wait_event("after_action_dropped")
