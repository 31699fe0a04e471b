"""A small SNTP server for tests: answers what the test tells it to, on port 123.

Each test gives its own loopback address (127.0.0.N) so tests running at the
same time do not share a server.  ``answer`` decides what goes back for each
request: ``reply_at(t)`` a well-formed server reply saying Unix time ``t``;
``kiss(code)`` a kiss-o'-death; any other callable gets the request and
returns the datagram bytes, or None to stay silent.  ``reply_from_other_port``
sends the answer from a second socket (another source port); with
``pass_send`` the answer also gets a function sending more datagrams to
the client first (a flood).  Every request
is recorded with the monotonic time it came.  ``serving`` skips the test with
the reason when port 123 cannot be bound (tests run as root here and in CI);
port=0 takes any free port (for clients that can be told the port).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Iterator

import pytest

__all__ = ["SntpServer", "serving", "reply_at", "kiss", "ntp", "silent"]

_NTP_UNIX = 2_208_988_800

Answer = Callable[[bytes], "bytes | None"]


def ntp(unix: float) -> int:
    """A 64-bit NTP timestamp (era-relative, as on the wire)."""
    seconds = int(unix)
    return ((seconds + _NTP_UNIX) % (1 << 32)) << 32 | int((unix - seconds) * (1 << 32))


def _packet(flags: int, stratum: int, refid: bytes, originate: int, receive: int, transmit: int) -> bytes:
    return struct.pack("!BBbbII4sQQQQ", flags, stratum, 6, -20, 0, 0, refid, transmit, originate, receive, transmit)


def reply_at(unix: float | Callable[[], float], *, version: int = 4, mode: int = 4, stratum: int = 2,
             leap: int = 0, originate: int | None = None, transmit: int | None = None) -> Answer:
    """Answer each request with time ``unix`` (a number, or a function called per request)."""

    def answer(request: bytes) -> bytes:
        now = unix() if callable(unix) else unix
        cookie = struct.unpack_from("!Q", request, 40)[0]
        sent = ntp(now) if transmit is None else transmit
        return _packet(leap << 6 | version << 3 | mode, stratum, b"GPS\0",
                       cookie if originate is None else originate, ntp(now), sent)

    return answer


def kiss(code: bytes) -> Answer:
    """A kiss-o'-death (stratum 0) with a four-letter code such as b"RATE", answering the request."""

    def answer(request: bytes) -> bytes:
        cookie = struct.unpack_from("!Q", request, 40)[0]
        return _packet(3 << 6 | 4 << 3 | 4, 0, code, cookie, 0, 0)

    return answer


def silent(request: bytes) -> None:
    return None


@contextlib.contextmanager
def serving(address: str, answer: Answer, reply_from_other_port: bool = False,
            port: int = 123) -> Iterator["SntpServer"]:
    """An SntpServer for the with-block; the test is skipped if it cannot bind."""
    server = SntpServer.start(address, answer, reply_from_other_port, port)
    if isinstance(server, str):
        pytest.skip(server)
    try:
        yield server
    finally:
        server.close()


class SntpServer:
    def __init__(self, sock: socket.socket, answer: Answer, other: socket.socket | None,
                 pass_send: bool = False) -> None:
        self.sock = sock
        self.pass_send = pass_send
        self.address, self.port = sock.getsockname()[:2]
        self.answer = answer
        self.other = other
        self.requests: list[tuple[float, bytes]] = []  # (monotonic time, datagram)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, address: str, answer: Answer, reply_from_other_port: bool = False,
              port: int = 123, pass_send: bool = False) -> "SntpServer | str":
        """A running server on ``address`` (port 0: any free one), or the reason there is none."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:  # another test's server: a clash to fix, not a skip
                raise AssertionError(f"{address}:{port} is taken: each test needs its own address ({exc})") from None
            return f"cannot bind {address}:{port} for the test SNTP server: {exc}"
        sock.settimeout(0.1)
        other = None
        if reply_from_other_port:
            other = socket.socket(family, socket.SOCK_DGRAM)
            other.bind((address, 0))
        return cls(sock, answer, other, pass_send)

    def wait_requests(self, count: int, timeout: float) -> list[tuple[float, bytes]]:
        """The first ``count`` requests, waiting up to ``timeout`` seconds for them."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.requests)} of {count} SNTP requests within {timeout} s")
            time.sleep(0.02)
        return self.requests[:count]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        if self.other is not None:
            self.other.close()

    def _serve(self) -> None:
        while not self._stop:
            try:
                request, peer = self.sock.recvfrom(2048)
            except (TimeoutError, OSError):
                continue
            self.requests.append((time.monotonic(), request))
            if self.pass_send:
                reply = self.answer(request, lambda data, peer=peer: self.sock.sendto(data, peer))
            else:
                reply = self.answer(request)
            if reply is not None:
                (self.other or self.sock).sendto(reply, peer)
