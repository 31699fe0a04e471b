"""A host that stops reading the UART: the front stops reading it too, keeps its
memory bounded, and answers every command once the host reads again."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

from bridged.ops.protocol import request
from tests.harness import Daemon, Host
from tests.integration.test_status import connect, control_path

_AT = b"AT\r\n"
_X = b"X\r\n"
# Echo is on after ready: each command comes back, then its answer.
_ANSWERS = _AT + b"\r\nOK\r\n" + _X + b"\r\nERROR\r\n"
# 170,000 commands back to back, each X logging a bad_line: ~5 s of the front's CPU, in loop
# iterations of one 4 KiB read each (~1,170 commands, ~65 ms of CPU).  On a loaded 2-core
# machine an iteration takes over a second (0.53 s measured beside 14 busy loops), and the
# default watchdog (a pong within each 1 s tick, three ticks in a row) killed the busy front
# mid-answers: the test's config was too tight for its load, not the front stuck.  Patience
# here; whether the front keeps serving while its UART is stalled is asked directly (status).
_PATIENT = "[watchdog]\nmissed_heartbeats = 20\n"


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _front_pid(daemon: Daemon) -> int:
    return daemon.wait_event("child_started", role="front")[-1]["pid"]


class _Writer(threading.Thread):
    """Writes ``data`` to the host's fd without ever reading; notes its progress."""

    def __init__(self, host: Host, data: bytes, timeout: float, piece: int = 4096) -> None:
        super().__init__(daemon=True)
        self.fd, self.data, self.timeout, self.piece = host.fd, memoryview(data), timeout, piece
        self.written = 0
        self.last_progress = time.monotonic()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while self.written < len(self.data) and time.monotonic() < deadline:
            select.select([], [self.fd], [], 0.05)
            try:
                n = os.write(self.fd, self.data[self.written : self.written + self.piece])
            except BlockingIOError:
                continue
            self.written += n
            self.last_progress = time.monotonic()

    def wait_stalled(self, quiet: float, timeout: float) -> None:
        """Until everything is written or nothing was for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while self.is_alive() and time.monotonic() - self.last_progress < quiet:
            assert time.monotonic() < deadline, "the writer neither finished nor stalled"
            time.sleep(0.05)


def _read_until(host: Host, size: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while len(host.buf) < size:
        assert time.monotonic() < deadline, f"{len(host.buf)} of {size} bytes"
        host._fill(0.05)
    out = bytes(host.buf)
    host.buf.clear()
    return out


def _answers_status(daemon: Daemon) -> dict:
    """The front's status over the control socket (the front serves it): its loop runs."""
    with connect(control_path(daemon)) as sock:  # (a 10 s timeout)
        return request(sock, {"cmd": "status"})["status"]


def test_a_host_that_never_reads_stops_the_front_reading(make_daemon):
    """600 KB of commands the host never reads the answers of: the front's RSS grows < 5 MB, it answers
    status meanwhile, then every answer comes, in order."""
    daemon = make_daemon(_PATIENT)
    host = daemon.host()
    host.expect(b"\r\nready\r\n")
    host.read_quiet(0.3)  # the rejoin's WIFI lines
    pid = _front_pid(daemon)
    before = _rss_kb(pid)
    pairs = 600_000 // len(_AT + _X)
    writer = _Writer(host, (_AT + _X) * pairs, timeout=120)
    writer.start()
    writer.wait_stalled(quiet=1.5, timeout=60)
    grown = _rss_kb(pid) - before
    assert grown < 5 * 1024, f"the front grew {grown} KiB"
    assert writer.is_alive(), "the front took all the input while its answers piled up"
    # A stalled UART does not stall the front: it serves its control socket meanwhile,
    # and input waits in the port, unread.
    assert _answers_status(daemon)["uart"]["bytes_in"] < writer.written
    out = _read_until(host, len(_ANSWERS) * pairs, timeout=120)
    writer.join(10)
    assert out.count(b"\r\nOK\r\n") == pairs and out.count(b"\r\nERROR\r\n") == pairs
    assert out == _ANSWERS * pairs
    assert host.read_quiet(0.3) == b""
    assert host.command(b"ATE0", b"\r\nOK\r\n") == b"ATE0\r\n\r\nOK\r\n"
    host.close()


def test_passthrough_keeps_moving_while_the_host_reads_late(make_daemon):
    """Passthrough to an echo peer while the host writes 32 MB and reads nothing: everything fills and stalls, the front stays small, then every byte comes back, in order."""
    server = socket.create_server(("127.0.0.1", 0))
    daemon = make_daemon()
    host = daemon.host()
    try:
        host.boot()
        host.command(b'AT+CIPSTART="TCP","127.0.0.1",%d' % server.getsockname()[1])
        conn, _ = server.accept()
        echo = threading.Thread(target=_echo, args=(conn,), daemon=True)
        echo.start()
        host.command(b"AT+CIPMODE=1")
        assert host.command(b"AT+CIPSEND", b">") == b"\r\nOK\r\n\r\n>"
        pid = _front_pid(daemon)
        before = _rss_kb(pid)
        payload = os.urandom(32 << 20)
        writer = _Writer(host, payload, timeout=120, piece=65536)
        writer.start()
        writer.wait_stalled(quiet=1.5, timeout=60)
        grown = _rss_kb(pid) - before
        assert writer.is_alive(), "the peer, the rings and the UART never filled up"
        assert grown < 5 * 1024, f"the front grew {grown} KiB"
        got = _read_until(host, len(payload), timeout=120)
        writer.join(10)
        assert writer.written == len(payload)
        assert got == payload
        time.sleep(1.1)  # +++ wants a second of silence around it
        host.write(b"+++")
        time.sleep(1.1)  # +++ wants a second of silence around it
        assert host.command(b"AT") == b"\r\nOK\r\n"
    finally:
        host.close()
        server.close()


def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            return


def test_input_behind_an_after_action_waits_in_the_port(daemon):
    """Commands behind AT+UART_CUR stay unread while its OK waits for a host that stopped reading; then all are answered."""
    host = daemon.host()
    host.expect(b"\r\nready\r\n")
    host.read_quiet(0.3)
    before, after = 20_000, 150_000
    uart = b"AT+UART_CUR=115200,8,1,0,0\r\n"
    writer = _Writer(host, _AT * before + uart + _AT * after, timeout=120, piece=65536)
    writer.start()
    answer = _AT + b"\r\nOK\r\n"
    # Read up to 40 kB before AT+UART_CUR's echo, then stop: its OK stays queued.
    first = _read_until(host, len(answer) * before - 40_000, timeout=60)
    writer.wait_stalled(quiet=1.5, timeout=60)
    assert writer.is_alive(), "the front read all the input while AT+UART_CUR's OK waited"
    assert writer.written < len(_AT) * before + len(uart) + 200_000
    expected = answer * before + uart + b"\r\nOK\r\n" + answer * after
    rest = _read_until(host, len(expected) - len(first), timeout=120)
    writer.join(10)
    assert first + rest == expected
    host.close()
