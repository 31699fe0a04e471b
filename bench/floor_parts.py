"""The stand-in daemon of ``bench.five_floor``: bridged's design for five links at full
speed with nothing but what the protocol and the design need.

Run as ``python -m bench.floor_rings MODE LINK`` (the entry point is there): a pty
made as bridged makes it (``bridged.uart.port.open_pty``, the slave's path
symlinked at LINK), and

* MODE ``one``: one uvloop process, the five TCP sockets in it;
* MODE ``split``: the same front, each link's socket in a worker process forked
  before the loop starts, bytes through bridged's own ``Ring`` (one uplink and
  one downlink ring per link, eventfd doorbells watched with ``add_reader``,
  downlink records as ``bridged.ipc.records`` writes and takes them).

The front answers exactly what bench.five_links's client sends: ``AT``,
``ATE0``, ``AT+CWJAP=...`` and ``AT+CIPMUX=1`` with ``OK``,
``AT+CIPSTART=<id>,"TCP","127.0.0.1",<port>`` with ``<id>,CONNECT`` and ``OK``,
``AT+CIPSEND=<id>,<n>`` with the prompt, then ``n`` payload bytes read, then
``Recv <n> bytes`` and ``SEND OK`` (once the socket took the bytes in ``one``,
once they are in the uplink ring in ``split``: DESIGN.md's rule); anything else
gets ``ERROR``, which the client's exact checks turn into a failure.  Whatever a
link's socket brings goes out as ``+IPD,<id>,<len>:`` frames of at most
[links] chunk bytes.  All output goes through one queue in the order it was
made (so SEND OK precedes any +IPD read after it), written once per loop
turn; there is no gap timer.  Above HIGH bytes queued no more downlink is taken
until they are down to LOW (back-pressure: the socket, or the worker's full ring,
waits).
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import sys

from bridged.config.schema import LinksConfig

LINKS = 5
IPD_CHUNK = LinksConfig().chunk  # 2920: bridged's default +IPD frame
RING = LinksConfig().ring_size  # 65536
RECORD = RING // 4  # a downlink record, as bridged's workers take them
HIGH = 65536  # bytes queued for the pty above which the downlink waits until LOW (bridged's Output)
LOW = HIGH // 2
TTY_FULL = 3968  # a pty read this big emptied a full n_tty buffer: more waits behind (uart.reading)
OVERHEAD = 16  # an +IPD head's bytes, for take_records' budget
RECHECK = 0.05  # s: a wait for ring room looks again this often (the index stores have no fence)
PROMPT = b"\r\nOK\r\n\r\n>"
OK = b"\r\nOK\r\n"
ERROR = b"\r\nERROR\r\n"
PLAIN = (b"AT", b"ATE0", b"AT+CIPMUX=1")


class Gate:
    """A reader paused and resumed with one epoll_ctl (bridged.readgate's idea, bare)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, callback) -> None:
        self.epoll = select.epoll(1)
        self.fd = fd
        self.epoll.register(fd, select.EPOLLIN)
        self.open = True
        loop.add_reader(self.epoll.fileno(), callback)

    def set(self, open_: bool) -> None:
        if open_ != self.open:
            self.epoll.modify(self.fd, select.EPOLLIN if open_ else 0)
            self.open = open_


class Front:
    """The UART side: AT lines, payloads, replies and +IPD frames on the pty master."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop, self.fd = loop, fd
        self.links: list = []
        self.inbuf = bytearray()
        self.out = bytearray()
        self.flush_due = self.writing = self.backlogged = False
        self.pending: dict = {}  # links whose downlink waits for the output (in order)
        self.send: list | None = None  # [link, length, bytes read] while a payload comes
        loop.add_reader(fd, self.on_read)

    # -- output
    def budget(self) -> int:
        """Downlink bytes to take now: none while backlogged (above HIGH, not yet down to LOW)."""
        return 0 if self.backlogged else HIGH - len(self.out)

    def emit(self, data: bytes) -> None:
        self.out += data
        if not (self.flush_due or self.writing):
            self.flush_due = True
            self.loop.call_soon(self.flush)  # one write for everything made in this loop turn

    def frame(self, link: int, data: bytes | memoryview) -> None:
        out, view, n = self.out, memoryview(data), len(data)
        for off in range(0, n, IPD_CHUNK):  # bounded by the record's length
            k = min(IPD_CHUNK, n - off)
            out += b"\r\n+IPD,%d,%d:" % (link, k)
            out += view[off:off + k]
        if len(out) >= HIGH:
            self.backlogged = True
        if n and not (self.flush_due or self.writing):
            self.flush_due = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_due = False
        try:
            n = os.write(self.fd, self.out)
        except BlockingIOError:
            n = 0
        del self.out[:n]
        if self.out and not self.writing:
            self.loop.add_writer(self.fd, self.flush)
            self.writing = True
        elif not self.out and self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False
        if self.backlogged and len(self.out) <= LOW:
            self.backlogged = False
        for link in list(self.pending):  # bounded: five links
            if self.budget() <= 0:
                break
            del self.pending[link]
            link.resume()

    # -- input
    def on_read(self) -> None:
        if self.send is not None:
            self.read_payload()
            return
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self.loop.remove_reader(self.fd)
            return
        self.inbuf += data
        buf = self.inbuf
        for _ in range(1000):  # bounded: each turn takes a line
            i = buf.find(b"\r\n")
            if i < 0 or self.send is not None:
                break
            line = bytes(buf[:i])
            del buf[:i + 2]
            try:
                self.command(line)
            except (ValueError, IndexError):  # a malformed parameter: ERROR, which fails the client
                sys.stderr.write(f"floor: malformed command {line[:60]!r}\n")
                self.send = None
                self.emit(ERROR)
        if self.send is not None and buf:
            sys.stderr.write(f"floor: payload bytes before the prompt: {bytes(buf[:60])!r}\n")
            buf.clear()
            self.send = None
            self.emit(ERROR)

    def command(self, line: bytes) -> None:
        if line.startswith(b"AT+CIPSEND="):
            i, n = (int(x) for x in line[11:].split(b","))
            if not 0 < n <= 8192:
                self.emit(ERROR)
                return
            self.send = [self.links[i], n, 0]
            self.emit(PROMPT)
        elif line.startswith(b"AT+CIPSTART="):
            parts = line[12:].split(b",")
            i, host, port = int(parts[0]), parts[2].strip(b'"'), int(parts[3])
            if host != b"127.0.0.1" or parts[1] != b'"TCP"':
                self.emit(ERROR)
                return
            self.links[i].connect("127.0.0.1", port)
            self.emit(b"%d,CONNECT\r\n\r\nOK\r\n" % i)
        elif line in PLAIN or line.startswith(b"AT+CWJAP="):
            self.emit(OK)
        elif line:
            sys.stderr.write(f"floor: unknown command {line[:60]!r}\n")
            self.emit(ERROR)

    def read_payload(self) -> None:
        link, length, got = self.send
        for _ in range(4):  # bounded: a read-on only after a full tty buffer
            views = link.payload_views(got, length - got)
            if views is None:  # no room in the uplink ring: the port waits for it
                self.loop.remove_reader(self.fd)
                link.wait_room(length, self.room)
                break
            try:
                n = os.readv(self.fd, views)
            except BlockingIOError:
                break
            got += n
            if not n or got == length or n < TTY_FULL:
                break
        self.send[2] = got
        if got == length:
            self.send = None
            link.complete(length)

    def room(self) -> None:
        self.loop.add_reader(self.fd, self.on_read)
        self.read_payload()

    def sent(self, n: int) -> None:
        self.emit(b"\r\nRecv %d bytes\r\n\r\nSEND OK\r\n" % n)


class SockLink:
    """Floor (a): one link's socket in the front itself."""

    def __init__(self, front: Front, i: int) -> None:
        self.front, self.i = front, i
        self.buf = memoryview(bytearray(8192))
        self.rbuf = memoryview(bytearray(HIGH))
        self.rest: memoryview | None = None
        self.total = 0
        self.writing = False

    def connect(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.gate = Gate(self.front.loop, self.sock.fileno(), self.on_readable)

    def payload_views(self, got: int, left: int) -> list[memoryview]:
        return [self.buf[got:got + left]]

    def complete(self, n: int) -> None:
        self.rest, self.total = self.buf[:n], n
        self.push()

    def push(self) -> None:
        try:
            sent = self.sock.send(self.rest)
        except BlockingIOError:
            sent = 0
        self.rest = self.rest[sent:]
        if self.rest:  # SEND OK once the socket took it all: wait until it is writable
            if not self.writing:
                self.front.loop.add_writer(self.sock.fileno(), self.push)
                self.writing = True
            return
        if self.writing:
            self.front.loop.remove_writer(self.sock.fileno())
            self.writing = False
        self.front.sent(self.total)

    def on_readable(self) -> None:
        budget = self.front.budget()
        if budget <= 0:
            self.gate.set(False)
            self.front.pending[self] = True
            return
        try:
            n = self.sock.recv_into(self.rbuf[:budget])
        except BlockingIOError:
            return
        if not n:
            self.gate.set(False)  # the peer's end: nothing more comes
            return
        self.front.frame(self.i, self.rbuf[:n])

    def resume(self) -> None:
        self.gate.set(True)
        self.on_readable()
