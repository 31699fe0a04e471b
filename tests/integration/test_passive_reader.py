"""Passive receive mode as a host driver sees it: notices that are never stale,
replies that never wait behind a held notice.

A notice ``+IPD,<id>,<len>`` says how many bytes are unread at the point of
the byte stream where it appears: the reads whose replies came before it are
already taken off.  A driver that trusts it (Zephyr's esp_at reads what the
notice announced) must never get ERROR or a short read.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import threading
import time

import pytest

from tests.harness import Daemon, Host, Timeout

_NOTICE = re.compile(rb"\r\n\+IPD,0,(\d+)\r\n")
_REPLY = re.compile(rb"\+CIPRECVDATA:(\d+),")
_OTHER = {b"\r\nERROR\r\n": "error", b"0,CLOSED\r\n": "closed"}


def _open(daemon: Daemon) -> tuple[Host, socket.socket]:
    """Link 0 in passive mode, connected to a loopback peer."""
    server = socket.create_server(("127.0.0.1", 0))
    host = daemon.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    host.command(b"AT+CIPRECVTYPE=5,1")
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % server.getsockname()[1])
    conn, _ = server.accept()
    server.close()
    return host, conn


def _next_event(host: Host) -> tuple[str, object] | None:
    """One notice, read reply, ERROR or CLOSED from the head of what arrived."""
    buf = host.buf
    if m := _NOTICE.match(buf):
        n = int(m.group(1))  # before the bytearray under the match changes
        del buf[: m.end()]
        return "notice", n
    if m := _REPLY.match(buf):
        n = int(m.group(1))
        end = m.end() + n + len(b"\r\nOK\r\n")
        if len(buf) < end:
            return None
        assert buf[m.end() + n : end] == b"\r\nOK\r\n", bytes(buf[:end])
        data = bytes(buf[m.end() : m.end() + n])
        del buf[:end]
        return "data", data
    for text, kind in _OTHER.items():
        if buf.startswith(text):
            del buf[: len(text)]
            return kind, None
    return None


class _Driver:
    """Reads what the notices announce, ``piece`` bytes per AT+CIPRECVDATA.

    ``avail`` is what the driver knows to be unread: a notice sets it, a
    reply takes its bytes off.  A correct notice is exact where it appears,
    so a notice below ``avail``, a notice of 0, a read shorter than asked
    and an ERROR each mean a notice said more than was there.
    """

    def __init__(self, host: Host, piece: int) -> None:
        self.host = host
        self.piece = piece
        self.avail = 0
        self.asked: int | None = None
        self.got = bytearray()
        self.errors = 0
        self.stale: list[str] = []
        self.notices = 0

    def run(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.asked is None and self.avail > 0:
                self.asked = min(self.piece, self.avail)
                self.host.write(b"AT+CIPRECVDATA=0,%d\r\n" % self.asked)
            event = _next_event(self.host)
            if event is None:
                if time.monotonic() > deadline:
                    raise Timeout(f"{len(self.got)} bytes read; have {bytes(self.host.buf[:200])!r}")
                self.host._fill(0.05)
                continue
            kind, value = event
            if kind == "closed":
                return
            self._take(kind, value)

    def _take(self, kind: str, value) -> None:
        if kind == "notice":
            self.notices += 1
            if value == 0 or value < self.avail:
                self.stale.append(f"notice {value} with {self.avail} known unread")
            self.avail = value
        elif kind == "data":
            if len(value) < self.asked:
                self.stale.append(f"read {len(value)} of {self.asked} asked")
            self.got += value
            self.avail = max(0, self.avail - len(value))
            self.asked = None
        else:  # ERROR: nothing was there
            self.errors += 1
            self.avail = 0
            self.asked = None


def _peer_sends(conn: socket.socket, payload: bytes, seed: int) -> threading.Thread:
    """Bursts of random size, now and then a pause, then close."""

    def send() -> None:
        rng = random.Random(seed)
        i = 0
        while i < len(payload):
            n = rng.randint(1, 4000)
            conn.sendall(payload[i : i + n])
            i += n
            if rng.random() < 0.2:
                time.sleep(rng.random() * 0.004)
        conn.close()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("piece, size", [(64, 96 * 1024), (1024, 512 * 1024)])
def test_a_driver_reading_what_notices_announce_never_errs(make_daemon, piece, size):
    """Reads of 64 and 1024 bytes while the peer streams and closes: no ERROR, no
    stale notice, every byte arrives, then CLOSED."""
    host, conn = _open(make_daemon())
    payload = os.urandom(size)
    sender = _peer_sends(conn, payload, seed=piece)
    driver = _Driver(host, piece)
    driver.run(timeout=60)
    sender.join(10)
    assert (driver.errors, driver.stale) == (0, [])
    assert hashlib.sha256(driver.got).digest() == hashlib.sha256(payload).digest()
    assert driver.notices > 0
    assert host.read_quiet(0.2) == b""
    host.close()


def test_no_notice_after_a_read_that_took_everything(make_daemon):
    """A read that empties the link while a notice is held for the gap: the held
    notice is not written (it would announce bytes already read)."""
    # A gap no scheduling delay reaches: the second read surely comes inside it.
    host, conn = _open(make_daemon("[uart]\nurc_gap_ms = 300\n"))
    conn.sendall(b"x" * 100)
    host.expect(b"\r\n+IPD,0,100\r\n")
    assert host.ask(b"AT+CIPRECVDATA=0,40") == b"+CIPRECVDATA:40," + b"x" * 40 + b"\r\nOK\r\n"
    # What is left is announced after the gap; the driver reads it before that.
    assert host.ask(b"AT+CIPRECVDATA=0,1024") == b"+CIPRECVDATA:60," + b"x" * 60 + b"\r\nOK\r\n"
    assert host.read_quiet(0.6) == b""
    assert host.ask(b"AT+CIPRECVLEN?") == b"+CIPRECVLEN:0,0,0,0,0\r\n\r\nOK\r\n"
    conn.close()
    host.close()


def test_a_reply_overtakes_a_held_notice(make_daemon):
    """Commands sent while a notice is held for the gap are answered at once; the
    notice follows them, counted when it is written, and still waits the gap."""
    gap = 0.3
    host, conn = _open(make_daemon(f"[uart]\nurc_gap_ms = {gap * 1000:g}\n"))
    conn.sendall(b"y" * 100)
    host.expect(b"\r\n+IPD,0,100\r\n")
    assert host.ask(b"AT+CIPRECVDATA=0,10") == b"+CIPRECVDATA:10," + b"y" * 10 + b"\r\nOK\r\n"
    # "+IPD,0,90" is held now; a driver sends its next commands at once.
    sent = time.monotonic()
    host.write(b"AT+CIPRECVDATA=0,10\r\nAT+CIPRECVLEN?\r\n")
    answers = host.expect(b"+CIPRECVLEN:", timeout=5) + host.expect(b"\r\nOK\r\n")
    # Both replies come before any notice (a held notice never delays a reply).
    assert answers == (b"+CIPRECVDATA:10," + b"y" * 10 + b"\r\nOK\r\n"
                       + b"+CIPRECVLEN:80,0,0,0,0\r\n\r\nOK\r\n")
    # The notice says what is unread when it is written, a gap after the last OK.
    assert host.expect(b"\r\n+IPD,0,80\r\n", timeout=5) == b"\r\n+IPD,0,80\r\n"
    # Arrival is never before the write: a bound load cannot break (less the
    # event loop clock's 1 ms tick, as in tests/uart/test_output.py).
    waited = time.monotonic() - sent
    assert waited >= gap - 0.002, f"the notice came {waited * 1000:.1f} ms after the commands"
    assert host.read_quiet(0.5) == b""
    conn.close()
    host.close()
