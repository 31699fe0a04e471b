"""Attacks on the command shares (uart.dispatch, 64 lines a go): a command that goes
busy, restarts the chip, changes the baud or starts a data phase on a share's last
line or the next one's first; a flood at exactly a share's size; a restart fault,
a stop, a replug and peers' data while shares pass.  Nothing may be lost, reordered
or answered twice, and the port must be read again afterwards."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time

import pytest

from tests.harness import Daemon, Demux, Host
from tests.integration.test_command_flood import _flood, _status
from tests.integration.test_faults_at import fault_cli
from tests.integration.test_replug import Device

_SHARE = 64  # uart.dispatch._PASS_SHARE
_OK = b"\r\nOK\r\n"
_AT = b"AT\r\n"


def _booted(daemon):
    host = daemon.host()
    host.boot()  # echo off
    host.read_quiet(0.2)
    return host


def _split(daemon) -> None:
    """The flood met a share's end (its write came in one read): what the test is about."""
    assert _status(daemon)["uart"]["max_command_batch"] == _SHARE


def _connect(host, port: int) -> None:
    host.command(b"AT+CIPMUX=1")
    host.write(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d\r\n' % port)
    host.expect(b"CONNECT\r\n\r\nOK\r\n")


def _peer_got(server, length: int) -> str:
    deadline = time.monotonic() + 10
    while sum(server.counts.values()) < length:
        assert time.monotonic() < deadline, f"the peer got {list(server.counts.values())} bytes"
        time.sleep(0.01)
    return [h.hexdigest() for h in server.hashes.values()][-1]


@pytest.mark.parametrize("count", [63, 64, 128])
def test_a_flood_of_a_shares_size_then_a_quick_send(daemon, sink_server, count):
    """``count`` AT in one write, a share's size and either side of it, then at once a send
    line the session prompted before (uart.direct's quick line) and its payload: every OK,
    the prompt after them, the peer gets the payload; nothing more comes."""
    host = _booted(daemon)
    _connect(host, sink_server.port)
    assert host.send_data(b"AT+CIPSEND=0,4", b"abcd").endswith(b"SEND OK\r\n")  # prompted before
    payload = os.urandom(300)
    expected = _OK * count + b"\r\nOK\r\n\r\n>"
    assert _flood(host, _AT * count + b"AT+CIPSEND=0,300\r\n", len(expected)) == expected
    host.write(payload)
    assert host.expect(b"SEND OK\r\n") == b"\r\nRecv 300 bytes\r\n\r\nSEND OK\r\n"
    assert _peer_got(sink_server, 304) == hashlib.sha256(b"abcd" + payload).hexdigest()
    assert host.read_quiet(0.2) == b""
    assert _status(daemon)["uart"]["max_command_batch"] == min(count + 1, _SHARE)  # (one read: the send line too)
    host.close()


@pytest.mark.parametrize("at", [_SHARE, _SHARE + 1])
def test_a_command_that_goes_busy_at_a_share_boundary(daemon, echo_server, at):
    """AT+CIPSTART as a share's last line or the next one's first, 300 AT behind it in the
    same write: the AT before it answered, the ones behind refused busy (one chunk: one busy
    p...), CONNECT and OK, then the port is read again: AT answers, the link is up."""
    host = _booted(daemon)
    host.command(b"AT+CIPMUX=1")
    start = b'AT+CIPSTART=0,"TCP","127.0.0.1",%d\r\n' % echo_server.port
    host.write(_AT * (at - 1) + start + _AT * 300)
    out = host.expect(b"CONNECT\r\n", timeout=10) + host.expect(_OK)
    out += host.read_quiet(0.3)
    head = _OK * (at - 1)
    assert out.startswith(head), out[:400]
    rest = out[len(head):]
    # The 300 AT behind it came in one read or a few: each read refused with one busy p...
    assert re.fullmatch(rb"(\r\nbusy p\.\.\.\r\n)+0,CONNECT\r\n\r\nOK\r\n", rest), rest
    assert host.command(b"AT") == _OK
    assert b'+CIPSTATUS:0,"TCP","127.0.0.1",%d' % echo_server.port in host.command(b"AT+CIPSTATUS")
    _split(daemon)
    host.close()


@pytest.mark.parametrize("at", [_SHARE, _SHARE + 1])
def test_at_rst_at_a_share_boundary_drops_what_came_behind(daemon, at):
    """AT+RST as a share's last line or the next one's first, 500 AT behind it in the same
    write: the AT before it answered, its OK, ready, and none of those behind answered
    (the restarting chip never heard them); the new session reads the port."""
    host = _booted(daemon)
    host.write(_AT * (at - 1) + b"AT+RST\r\n" + _AT * 500)
    out = host.expect(b"\r\nready\r\n", timeout=10)
    assert out == _OK * at + b"\r\nready\r\n"
    host.read_quiet(0.3)  # the rejoin's WIFI lines
    assert host.command(b"AT") == _AT + _OK  # echo on again: a new session
    _split(daemon)
    host.close()


@pytest.mark.parametrize("at", [_SHARE, _SHARE + 1])
def test_a_baud_change_at_a_share_boundary(daemon, at):
    """AT+UART_CUR (an after-action: input is left in the port until the output drained) as
    a share's last line or the next one's first, 200 AT behind it in the same write: every
    AT answered, in order, once, and the new settings are in force."""
    host = _booted(daemon)
    host.write(_AT * (at - 1) + b"AT+UART_CUR=230400,8,1,0,0\r\n" + _AT * 200)
    expected = _OK * (at + 200)
    assert host.read_exactly(len(expected), timeout=20) == expected
    assert host.read_quiet(0.3) == b""
    assert host.ask(b"AT+UART_CUR?") == b"+UART_CUR:230400,8,1,0,0\r\n" + _OK
    _split(daemon)
    host.close()


@pytest.mark.parametrize("at", [_SHARE, _SHARE + 1])
@pytest.mark.parametrize("command", [b"AT+CIPSEND=0,%d", b"AT+CIPSENDL=0,%d"])
def test_a_send_at_a_share_boundary_with_its_payload_behind(daemon, sink_server, at, command):
    """A send as a share's last line or the next one's first, its payload behind it in the
    same write: the AT before it answered, the prompt, SEND OK, the peer's hash; then AT."""
    host = _booted(daemon)
    _connect(host, sink_server.port)
    payload = os.urandom(2000)
    host.write(_AT * (at - 1) + command % len(payload) + b"\r\n" + payload)
    out = host.expect(b"SEND OK\r\n", timeout=10)
    assert out.startswith(_OK * (at - 1) + b"\r\nOK\r\n\r\n>"), out[:600]
    assert _peer_got(sink_server, len(payload)) == hashlib.sha256(payload).hexdigest()
    assert host.command(b"AT") == _OK
    assert host.read_quiet(0.2) == b""
    _split(daemon)
    host.close()


@pytest.mark.parametrize("at", [_SHARE, _SHARE + 1])
def test_passthrough_entered_at_a_share_boundary(daemon, echo_server, at):
    """Passthrough entered on a share's last line or the next one's first, bytes behind it
    in the same write: they are the link's (echoed back), +++ after the silence leaves it,
    and AT answers."""
    host = _booted(daemon)
    host.command(b"AT+CIPMODE=1")
    host.write(b'AT+CIPSTART="TCP","127.0.0.1",%d\r\n' % echo_server.port)
    host.expect(b"CONNECT\r\n\r\nOK\r\n")
    host.write(_AT * (at - 1) + b"AT+CIPSEND\r\n" + b"hello behind the line")
    assert host.expect(b"hello behind the line", timeout=10) == _OK * at + b"\r\n>hello behind the line"
    time.sleep(0.1)
    host.write(b"+++")
    time.sleep(0.1)
    assert host.command(b"AT") == _OK
    _split(daemon)
    host.close()


def test_an_at_reset_fault_among_shares(daemon):
    """An injected restart (at_reset, on demand) while a long flood passes in shares: ready
    comes, every answer before it is a whole OK, and afterwards the port is read: AT answers."""
    host = _booted(daemon)
    done = []

    def inject() -> None:
        time.sleep(0.3)
        done.append(fault_cli(daemon, "at_reset").returncode)

    thread = threading.Thread(target=inject, daemon=True)
    thread.start()
    data = _AT * 200_000
    view, written, out = memoryview(data), 0, bytearray()
    deadline = time.monotonic() + 60
    while b"\r\nready\r\n" not in out:
        assert time.monotonic() < deadline, f"no ready: {bytes(out[-300:])!r}"
        try:
            out += os.read(host.fd, 1 << 20)
        except BlockingIOError:
            pass
        if written < len(data):
            try:
                written += os.write(host.fd, view[written : written + 4096])
            except BlockingIOError:
                time.sleep(0.001)
    thread.join(20)
    assert done == [0]
    before = bytes(out[: out.index(b"\r\nready\r\n")])
    assert before == _OK * (len(before) // len(_OK)), before[-200:]
    host.read_quiet(0.5)
    host.write(b"\r\n")  # ends a line the restart may have cut
    host.read_quiet(0.3)
    assert host.ask(b"AT").endswith(_OK)
    assert _status(daemon)["uart"]["max_command_batch"] <= _SHARE
    host.close()


def test_stopped_while_shares_pass(daemon):
    """SIGTERM while a flood passes in shares: the daemon exits 0 in time (make_daemon
    checks the code and that nothing was logged as an error)."""
    host = _booted(daemon)
    os.write(host.fd, _AT * 1000)
    deadline = time.monotonic() + 10
    while len(host.buf) < 50 * len(_OK):
        assert time.monotonic() < deadline
        host._fill(0.01)
    assert daemon.stop() == 0
    host.close()


def test_a_peers_data_during_a_flood(daemon, sink_server):
    """A peer streams to the MCU while it floods AT: every +IPD payload whole and in order,
    every AT answered once (the +IPD frames come between answers, not inside one)."""
    listener = socket.create_server(("127.0.0.1", 0))
    host = _booted(daemon)
    host.command(b"AT+CIPMUX=1")
    host.write(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d\r\n' % listener.getsockname()[1])
    listener.settimeout(10)
    conn, _ = listener.accept()
    host.expect(b"CONNECT\r\n\r\nOK\r\n")
    stream = os.urandom(1 << 20)
    sender = threading.Thread(target=conn.sendall, args=(stream,), daemon=True)
    count = 30_000
    demux = Demux(host)
    sender.start()
    view, written = memoryview(_AT * count), 0
    deadline = time.monotonic() + 60
    while written < len(view) or len(demux.data.get(0, b"")) < len(stream) or demux.text.count(_OK) < count:
        assert time.monotonic() < deadline, (written, len(demux.data.get(0, b"")), demux.text.count(_OK))
        if written < len(view):
            try:
                written += os.write(host.fd, view[written : written + 4096])
            except BlockingIOError:
                pass
        demux.pump(0.001)
    sender.join(10)
    assert hashlib.sha256(bytes(demux.data[0])).digest() == hashlib.sha256(stream).digest()
    text = bytes(demux.text)  # (with each +IPD's own \r\n before it)
    assert text.count(_OK) == count and text.replace(b"\r\n", b"") == b"OK" * count, text[:1000]
    _split(daemon)
    conn.close()
    listener.close()
    host.close()


def test_a_flood_the_host_does_not_read(daemon):
    """20,000 AT+GMR written while the host reads nothing for a second (the output backs
    up: commands wait, the port is held, shares or not), then read: every answer, in order."""
    host = _booted(daemon)
    answer = host.ask(b"AT+GMR")
    count = 20_000
    data = b"AT+GMR\r\n" * count
    view, written = memoryview(data), 0
    until = time.monotonic() + 1.0
    while time.monotonic() < until and written < len(data):
        try:
            written += os.write(host.fd, view[written : written + 4096])
        except BlockingIOError:
            time.sleep(0.01)
    assert written < len(data), "the daemon read it all: nothing backed up"
    out = _flood(host, bytes(view[written:]), len(answer) * count)
    assert out == answer * count
    assert host.read_quiet(0.3) == b""
    _split(daemon)
    host.close()


@pytest.fixture
def device(tmp_path):
    dev = Device(tmp_path)
    yield dev
    dev.close()


def test_unplugged_and_back_while_shares_pass(tmp_path, device):
    """The serial device hangs up while a flood passes in shares, and returns: the same
    session reads the port again (AT answers, no ready) and what came before the hang-up
    was answered with whole OKs only."""
    daemon = Daemon(tmp_path, "", port=str(device.link)).start()
    try:
        host = Host(None, fd=device.master)
        host.boot()
        host.read_quiet(0.2)
        data, written = memoryview(_AT * 100_000), 0
        until = time.monotonic() + 0.5  # the flood goes on until the very hang-up
        while time.monotonic() < until:
            try:
                written += os.write(host.fd, data[written : written + 4096])
            except BlockingIOError:
                pass
            host._fill(0.001)
        assert len(host.buf) > 100 * len(_OK)
        before = bytes(host.buf)
        device.unplug()
        daemon.wait_event("port_lost")
        host = device.plug()
        daemon.wait_event("port_back")
        after = host.read_quiet(0.5)
        assert before.replace(_OK, b"") == b"", before[-300:]
        # After it, the rest of a write the hang-up cut may come first (the output's, as ever).
        assert re.fullmatch(rb"(\nOK\r\n|OK\r\n|K\r\n|\r\n|\n)?(\r\nOK\r\n)*", after), after[:300]
        host.write(b"\r\n")  # ends a line the hang-up may have cut
        host.read_quiet(0.3)
        assert host.command(b"AT") == _OK
        assert b"ready" not in before + after
        _split(daemon)
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("fault", ["at_busy", "at_errcode"])
def test_an_at_fault_on_demand_across_shares(daemon, fault):
    """``fault`` on demand for the next 100 commands, then 1,000 AT in one write: the fault's
    answer for the first 100 (across a share's end, the fault hook on, then off once spent),
    OK for the rest, in order, once each."""
    host = _booted(daemon)
    assert fault_cli(daemon, fault, "count=1").returncode == 0
    faulted = host.ask(b"AT") if fault == "at_errcode" else host.command(b"AT", b"busy p...\r\n")
    assert faulted not in (_OK, b"")
    assert fault_cli(daemon, fault, "count=100").returncode == 0
    expected = faulted * 100 + _OK * 900
    assert _flood(host, _AT * 1000, len(expected)) == expected
    assert host.read_quiet(0.3) == b""
    assert host.command(b"AT") == _OK
    _split(daemon)
    host.close()


@pytest.mark.parametrize("at", [_SHARE, _SHARE + 1])
def test_an_over_long_line_at_a_share_boundary(daemon, at):
    """A 600-byte line (over [uart] max_line) as a share's last line or the next one's
    first, AT behind it in the same write: OK for each AT, one ERROR for the long line,
    in order; none of its bytes read as a command."""
    host = _booted(daemon)
    long_line = b"AT+" + b"X" * 595 + b"\r\n"
    expected = _OK * (at - 1) + b"\r\nERROR\r\n" + _OK * 300
    assert _flood(host, _AT * (at - 1) + long_line + _AT * 300, len(expected)) == expected
    assert host.read_quiet(0.3) == b""
    _split(daemon)
    host.close()
