"""On an unpaced pty (a line of memory) the front takes up to 128 KiB of +IPD into its output
while a busy command stream holds it for the URC gap (uart.downlink's _OUTPUT_HIGH_PTY): one
gap's release may carry more than the 32 KiB a UART's output holds, so the gap does not
throttle a pty's downlink to 32 KiB per 5 ms.  Driven as a host that sends its next command
the instant OK arrives; every byte hashed."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from tests.integration.test_passive import server  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(120)

_TOTAL = 1 << 20
_UART_MARK = 32768 + 2920 + 16  # a UART's high mark, passed by one record (its head counted)


class _Wire:
    """The host's view, in wire order: replies and +IPD frames (CIPMUX=0) parsed by length."""

    def __init__(self, host) -> None:
        self.host = host
        self.buf = bytearray()
        self.data = hashlib.sha256()
        self.got = 0

    def until_ok(self, deadline: float) -> int:
        """+IPD payload bytes read before the next OK."""
        before = self.got
        while True:
            ok, ipd = self.buf.find(b"\r\nOK\r\n"), self.buf.find(b"+IPD,")
            if ok >= 0 and (ipd < 0 or ok < ipd):
                del self.buf[: ok + 6]
                return self.got - before
            colon = self.buf.find(b":", ipd) if ipd >= 0 else -1
            if colon > 0:
                length = int(self.buf[ipd + 5 : colon])
                end = colon + 1 + length
                if len(self.buf) >= end:
                    assert not self.buf[:ipd].strip(b"\r\n"), bytes(self.buf[:ipd])
                    self.data.update(self.buf[colon + 1 : end])
                    self.got += length
                    del self.buf[:end]
                    continue
            assert time.monotonic() < deadline, f"{self.got} of {_TOTAL} bytes; no OK"
            try:
                self.buf += os.read(self.host.fd, 1 << 16)
            except BlockingIOError:
                time.sleep(0.0002)


def test_one_gap_releases_more_than_a_uarts_mark_on_a_pty(host, server):  # noqa: F811
    host.command(b'AT+CIPSTART="TCP","127.0.0.1",%d' % server.getsockname()[1])
    conn, _ = server.accept()
    payload = os.urandom(_TOTAL)
    peer = threading.Thread(target=conn.sendall, args=(payload,), daemon=True)
    peer.start()
    wire = _Wire(host)
    host.buf.clear()
    most = 0
    deadline = time.monotonic() + 60
    for _ in range(100_000):  # bounded by the count and the deadline
        if wire.got >= _TOTAL:
            break
        host.write(b"AT\r\n")  # the next command the instant OK arrives: finals every few 100 us
        most = max(most, wire.until_ok(deadline))
    peer.join(10)
    assert wire.got == _TOTAL and wire.data.digest() == hashlib.sha256(payload).digest()
    assert most > _UART_MARK, f"at most {most} bytes of +IPD between two replies"
    conn.close()
