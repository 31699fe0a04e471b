"""An MCU flooding commands: the front handles them a share at a time (uart.dispatch,
64 lines), its event loop going round between (status, heartbeats, links), and
every command is still answered, in order, data phases and AT+RST included.

Status' ``uart.max_command_batch`` (the most command lines handled in one go) makes
the bound a count, not a timing: before the shares a flood's 4 KiB read (1,024 AT)
was handled whole.  The tests that check nothing is lost or reordered also check the
flood went through the shares (the batch is exactly 64), so that is what they cover."""

from __future__ import annotations

import hashlib
import os
import select
import threading
import time

from bridged.ops.protocol import request
from tests.integration.test_status import connect, control_path

_SHARE = 64  # uart.dispatch._PASS_SHARE
_OK = b"\r\nOK\r\n"
_ERROR = b"\r\nERROR\r\n"


def _flood(host, data: bytes, answers: int, timeout: float = 60.0) -> bytes:
    """Write ``data`` as fast as the pty takes it while reading the answers as they come,
    until ``answers`` bytes came (bounded)."""
    out = bytearray(host.buf)
    host.buf.clear()
    view, written = memoryview(data), 0
    deadline = time.monotonic() + timeout
    while len(out) < answers:
        assert time.monotonic() < deadline, f"{written} of {len(data)} written, {len(out)} of {answers} read"
        readable, writable, _ = select.select([host.fd], [host.fd] if written < len(data) else [], [], 0.05)
        if readable:
            try:
                out += os.read(host.fd, 1 << 20)
            except BlockingIOError:
                pass
        if writable:
            try:
                written += os.write(host.fd, view[written : written + 65536])
            except BlockingIOError:
                pass
    host.buf += out[answers:]
    return bytes(out[:answers])


def _status(daemon) -> dict:
    with connect(control_path(daemon)) as sock:  # (a 10 s timeout)
        return request(sock, {"cmd": "status"})["status"]


class _StatusPoll(threading.Thread):
    """Asks the daemon's status over one control connection until stopped; keeps
    (seconds it took, uart status) of each answer."""

    def __init__(self, daemon) -> None:
        super().__init__(daemon=True)
        self.sock = connect(control_path(daemon))
        self.answers: list[tuple[float, dict]] = []
        self.done = threading.Event()

    def run(self) -> None:
        with self.sock:
            while not self.done.is_set():
                asked = time.monotonic()
                uart = request(self.sock, {"cmd": "status"})["status"]["uart"]
                self.answers.append((time.monotonic() - asked, uart))
                self.done.wait(0.005)

    def stop(self) -> list[tuple[float, dict]]:
        self.done.set()
        self.join(15)
        assert not self.is_alive(), "a status request never came back"
        return self.answers


def test_a_flood_is_handled_a_share_at_a_time_while_status_answers(daemon):
    """100,000 AT written as fast as the pty takes them: status answers during the flood,
    and never more than 64 commands were handled in one go (a 4 KiB read's 1,024 before)."""
    host = daemon.host()
    host.expect(b"\r\nready\r\n")
    host.read_quiet(0.3)  # the rejoin's WIFI lines
    count = 100_000
    poll = _StatusPoll(daemon)
    poll.start()
    try:
        out = _flood(host, b"AT\r\n" * count, len(b"AT\r\n" + _OK) * count)
    finally:
        answers = poll.stop()
    assert out == (b"AT\r\n" + _OK) * count
    during = [(took, uart) for took, uart in answers if uart["bytes_in"] < 4 * count]
    slowest = max(took for took, _ in answers)
    assert during, f"no status answered during the flood ({len(answers)} after it)"
    batches = [uart["max_command_batch"] for _, uart in answers]
    assert max(batches) <= _SHARE, f"{max(batches)} commands in one go (slowest status {slowest * 1000:.0f} ms)"
    assert _status(daemon)["uart"]["max_command_batch"] == _SHARE
    host.close()


def _numbered(count: int) -> tuple[bytes, bytes]:
    """``count`` AT+TRANSINTVL lines, some out of range (ERROR), each 7th followed by a
    query whose answer is the value the last good line set, and a bad line each 11th;
    and their answers (echo on), in order."""
    lines, answers, value = [], [], 20
    for i in range(count):
        ms = i % 1500
        line = b"AT+TRANSINTVL=%d\r\n" % ms
        if ms <= 1000:
            value = ms
        lines.append(line)
        answers.append(line + (_OK if ms <= 1000 else _ERROR))
        if i % 7 == 0:
            lines.append(b"AT+TRANSINTVL?\r\n")
            answers.append(b"AT+TRANSINTVL?\r\n+TRANSINTVL:%d\r\n" % value + _OK)
        if i % 11 == 0:
            lines.append(b"X%d\r\n" % i)
            answers.append(b"X%d\r\n" % i + _ERROR)
    return b"".join(lines), b"".join(answers)


def test_every_command_of_a_flood_is_answered_in_order(daemon):
    """30,000 numbered commands, queries of what the lines before set and bad lines among
    them, in one flood: every answer comes, in order, byte for byte, handled in shares."""
    host = daemon.host()
    host.expect(b"\r\nready\r\n")
    host.read_quiet(0.3)
    data, expected = _numbered(30_000)
    out = _flood(host, data, len(expected))
    assert out.count(_OK) == expected.count(_OK) and out.count(_ERROR) == expected.count(_ERROR)
    assert out == expected
    assert host.read_quiet(0.3) == b""
    assert _status(daemon)["uart"]["max_command_batch"] == _SHARE
    host.close()


def test_at_rst_at_the_end_of_a_flood_restarts(daemon):
    """5,000 AT then AT+RST in one write: each AT answered, AT+RST's OK, ready, and the
    restarted session answers; the flood went through the shares."""
    host = daemon.host()
    host.expect(b"\r\nready\r\n")
    host.read_quiet(0.3)
    expected = (b"AT\r\n" + _OK) * 5000 + b"AT+RST\r\n" + _OK
    assert _flood(host, b"AT\r\n" * 5000 + b"AT+RST\r\n", len(expected)) == expected
    host.expect(b"\r\nready\r\n")
    host.read_quiet(0.3)
    assert host.command(b"AT") == b"AT\r\n" + _OK
    assert _status(daemon)["uart"]["max_command_batch"] == _SHARE
    host.close()


def test_a_send_behind_a_flood_in_the_same_write_reaches_the_peer(daemon, sink_server):
    """5,000 AT, then AT+CIPSEND=0,4096 and its payload, in one write: every AT answered,
    the prompt, SEND OK, and the peer gets the payload intact (its hash)."""
    host = daemon.host()
    host.boot()  # echo off
    host.command(b"AT+CIPMUX=1")
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % sink_server.port)
    sink_server.wait_connections(1)
    payload = os.urandom(4096)
    expected = _OK * 5000 + _OK + b"\r\n>" + b"\r\nRecv 4096 bytes\r\n\r\nSEND OK\r\n"
    out = _flood(host, b"AT\r\n" * 5000 + b"AT+CIPSEND=0,4096\r\n" + payload, len(expected))
    assert out == expected
    deadline = time.monotonic() + 10
    while list(sink_server.counts.values()) != [len(payload)]:
        assert time.monotonic() < deadline, f"the peer got {list(sink_server.counts.values())} bytes"
        time.sleep(0.01)
    assert [h.hexdigest() for h in sink_server.hashes.values()] == [hashlib.sha256(payload).hexdigest()]
    assert _status(daemon)["uart"]["max_command_batch"] == _SHARE
    host.close()
