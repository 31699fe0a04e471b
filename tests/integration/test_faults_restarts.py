"""Faults and restarts: an at_reset that comes while a command's after-action waits for
its answer to go out, the fault counts of `bridged status` across a front restart, and
the input offsets of an on-demand uart_overrun across an AT+RST's boot."""

from __future__ import annotations

import os
import signal
import time

from tests.harness import EchoServer
from tests.integration.test_faults_at import answer, fault_cli
from tests.integration.test_status import status_json


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


def test_fault_counts_go_on_across_a_front_restart(make_daemon):
    """Two busy commands, the front killed and forked again, one more busy command and a
    link worker's fault: bridged status counts at_busy 3 (not 1) and the worker's too."""
    daemon = make_daemon("[faults]\nseed = 5\n")
    host = daemon.host()
    host.boot()
    assert fault_cli(daemon, "at_busy", "count=2").returncode == 0
    assert answer(host, b"AT") == answer(host, b"AT") == b"\r\nbusy p...\r\n"
    front = daemon.wait_event("child_started", role="front")[-1]["pid"]
    os.kill(front, signal.SIGKILL)
    daemon.expected_errors |= {"child_died", "front_died", "worker_died"}
    daemon.wait_event("child_started", role="front", count=2, timeout=10)
    host.expect(b"\r\nready\r\n", timeout=15)
    host.read_quiet(0.3)
    assert fault_cli(daemon, "at_busy").returncode == 0
    assert answer(host, b"AT") == b"\r\nbusy p...\r\n"
    assert fault_cli(daemon, "net_connect_refused", "link=0").returncode == 0
    deadline = time.monotonic() + 10
    while not [e for e in daemon.events("fault_armed") if e.get("name") == "net_connect_refused"]:
        assert time.monotonic() < deadline, "no worker armed net_connect_refused"
        time.sleep(0.05)
    assert status_json(daemon)["faults"]["counts"] == {"at_busy": 3}
    host.command(b"AT+CIPMUX=1")
    server = EchoServer()
    try:
        assert host.ask(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % server.port, timeout=10).endswith(b"ERROR\r\n")
    finally:
        server.close()
    deadline = time.monotonic() + 10
    while status_json(daemon)["faults"]["counts"] != {"at_busy": 3, "net_connect_refused": 1}:
        assert time.monotonic() < deadline, status_json(daemon)
        time.sleep(0.1)


def _overrun_offsets(daemon) -> list[int]:
    return [e["offset"] for e in daemon.events("fault_injected") if e.get("fault") == "uart_overrun"]


def test_input_a_booting_chip_drops_is_counted_and_overrun_offsets_go_on_past_it(make_daemon):
    """100 bytes the MCU sends during an AT+RST's boot are lost, but read: status uart.bytes_in
    counts them, and an overrun fired on demand after ready hits at its offset in the whole stream
    (5 bytes of the first demand's line + AT+RST's 8 + the 100), not 100 bytes short."""
    daemon = make_daemon("[firmware]\nboot_ms = 300\n")
    host = daemon.host()
    host.boot()
    assert fault_cli(daemon, "uart_overrun", "count=1", "bytes=1").returncode == 0
    assert answer(host, b"A" + b"AT") == b"\r\nOK\r\n"  # its first byte lost: "AT" arrives
    daemon.wait_event("uart_input_fault_over")
    before = status_json(daemon)["uart"]["bytes_in"]
    host.command(b"AT+RST")
    host.write(b"x" * 100)  # the chip is booting: lost
    host.expect(b"\r\nready\r\n")
    assert daemon.wait_event("boot_input_dropped")[-1]["bytes"] == 100
    assert status_json(daemon)["uart"]["bytes_in"] == before + 8 + 100
    assert fault_cli(daemon, "uart_overrun", "count=1", "bytes=1").returncode == 0
    host.write(b"AAT\r\n")
    host.expect(b"\r\nOK\r\n")
    deadline = time.monotonic() + 5  # a per-byte kind's second log line may wait up to a second
    while len(_overrun_offsets(daemon)) < 2:
        assert time.monotonic() < deadline, daemon.events("fault_injected")
        time.sleep(0.05)
    assert _overrun_offsets(daemon) == [0, 5 + 8 + 100]


def test_input_an_injected_overrun_loses_is_counted_as_read(daemon):
    """uart.bytes_in is all that was read from the MCU (as bytes_out is all that was written to
    it): the 3 bytes an on-demand uart_overrun loses were read too, as a booting chip's loss is;
    the next overrun's offset counts them once, hooked or not."""
    host = daemon.host()
    host.boot()
    before = status_json(daemon)["uart"]["bytes_in"]
    assert fault_cli(daemon, "uart_overrun", "count=1", "bytes=3").returncode == 0
    assert answer(host, b"xyzAT") == b"\r\nOK\r\n"  # "xyz" lost, "AT" answered
    daemon.wait_event("uart_input_fault_over")
    assert status_json(daemon)["uart"]["bytes_in"] == before + 7
    assert fault_cli(daemon, "uart_overrun", "count=1", "bytes=1").returncode == 0
    assert answer(host, b"AAT") == b"\r\nOK\r\n"
    deadline = time.monotonic() + 5  # a per-byte kind's second log line may wait up to a second
    while len(_overrun_offsets(daemon)) < 2:
        assert time.monotonic() < deadline, daemon.events("fault_injected")
        time.sleep(0.05)
    assert _overrun_offsets(daemon) == [0, 7]
    assert status_json(daemon)["uart"]["bytes_in"] == before + 7 + 5
