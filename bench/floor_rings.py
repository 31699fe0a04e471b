"""Floor (b)'s rings and link workers, and the stand-in daemon's entry point (``bench.five_floor``).

Run as ``python -m bench.floor_rings MODE LINK`` (MODE ``one`` or ``split``; see
``bench.floor_parts`` for what the stand-in answers).  In ``split`` the process
makes one uplink and one downlink ``Ring`` per link (65536 bytes, bridged's
default) and forks a worker per link before its loop starts, as bridged's
supervisor does; a worker waits on its control socket for the address, connects,
says so, then moves bytes: the uplink ring's published bytes to the socket on its
doorbell (SEND OK went out when the front committed them), the socket's bytes
into the downlink ring as records (``Ring.recv_behind``, one doorbell per
wake-up).  Neither side asks for the other's space doorbell except while it waits
for room; that wait looks again every RECHECK seconds too (the index stores have
no fence: ``Ring.want_space_doorbell``).  A worker ends when the front does (its
control socket's end).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import traceback

import uvloop

from bridged.ipc import records
from bridged.ipc.rings import Ring
from bridged.uart.port import Pty, open_pty

from .floor_parts import HIGH, LINKS, OVERHEAD, RECHECK, RECORD, RING, Front, Gate, SockLink

RESUME = RING // 4  # free bytes a worker waits for before it reads its socket again


class RingLink:
    """Floor (b), the front's side of one link: its two rings and its worker's control socket."""

    def __init__(self, front: Front, i: int, up: Ring, down: Ring, ctl: socket.socket) -> None:
        self.front, self.i, self.up, self.down, self.ctl = front, i, up, down, ctl
        self.need = 0
        self.on_room = None
        self.timer: asyncio.TimerHandle | None = None
        up.want_space_doorbell(False)  # asked for only while a payload waits for room
        front.loop.add_reader(down.data_fd, self.on_data)
        front.loop.add_reader(up.space_fd, self.on_space)

    def connect(self, host: str, port: int) -> None:
        self.ctl.settimeout(15.0)  # the set-up only, before anything is measured
        self.ctl.sendall(b"%s %d\n" % (host.encode(), port))
        if self.ctl.recv(16) != b"C":
            raise RuntimeError(f"floor: link {self.i}'s worker did not connect")

    # -- uplink
    def payload_views(self, got: int, left: int) -> list[memoryview] | None:
        view = self.up.reserve(got, left)
        if view is not None and len(view) == left:
            return [view]
        views = self.up.writable_views(left, got)  # the free area wraps: both pieces
        return views if sum(len(v) for v in views) == left else None

    def complete(self, n: int) -> None:
        self.up.commit(n)  # published at once, one doorbell for the worker
        self.front.sent(n)  # SEND OK on admission to the ring (DESIGN.md)

    def wait_room(self, need: int, callback) -> None:
        self.need, self.on_room = need, callback
        self.up.want_space_doorbell(True)
        self.on_space()  # the worker may have made room already

    def on_space(self) -> None:
        try:
            os.eventfd_read(self.up.space_fd)
        except BlockingIOError:
            pass
        if self.on_room is None:
            return
        if self.up.free() < self.need:
            if self.timer is None:
                self.timer = self.front.loop.call_later(RECHECK, self._recheck)
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.up.want_space_doorbell(False)
        callback, self.on_room = self.on_room, None
        callback()

    def _recheck(self) -> None:
        self.timer = None
        self.on_space()

    # -- downlink
    def on_data(self) -> None:
        try:
            os.eventfd_read(self.down.data_fd)
        except BlockingIOError:
            return
        if len(self.front.out) >= HIGH:
            self.front.pending[self] = True  # taken when the output has room
            return
        self.resume()

    def resume(self) -> None:
        recs, more = records.take_records(self.down, HIGH - len(self.front.out), OVERHEAD)
        for kind, payload, _addr in recs:
            if kind == records.DATA:
                self.front.frame(self.i, payload)
        if more:
            self.front.pending[self] = True


class Worker:
    """Floor (b)'s link worker: the uplink ring to the socket, the socket into the downlink ring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, up: Ring, down: Ring) -> None:
        self.loop, self.sock, self.up, self.down = loop, sock, up, down
        self.mask = up.capacity - 1
        self.writing = False
        self.timer: asyncio.TimerHandle | None = None
        down.want_space_doorbell(False)  # asked for only while the ring is full
        loop.add_reader(up.data_fd, self.on_up)
        loop.add_reader(down.space_fd, self.on_space)
        self.gate = Gate(loop, sock.fileno(), self.on_sock)

    def on_up(self) -> None:
        try:
            os.eventfd_read(self.up.data_fd)
        except BlockingIOError:
            pass
        if not self.writing:
            self.push()

    def push(self) -> None:
        up = self.up
        for _ in range(3):  # bounded: a wrapped ring's two pieces, and what came meanwhile
            data, read, used = up.published()
            if not used:
                break
            slot = read & self.mask
            try:
                sent = self.sock.send(data[slot:slot + min(used, len(data) - slot)])
            except BlockingIOError:
                sent = 0
            if not sent:  # the socket is full: go on when it is writable
                if not self.writing:
                    self.loop.add_writer(self.sock.fileno(), self.push)
                    self.writing = True
                return
            up.consume(sent)
        if self.writing:
            self.loop.remove_writer(self.sock.fileno())
            self.writing = False

    def on_sock(self) -> None:
        down = self.down
        down.hold_doorbells()  # one doorbell for this wake-up's records
        try:
            for _ in range(4):  # bounded; a TCP read takes all there is, so one read is the rule
                try:
                    n = down.recv_behind(self.sock, RECORD, *records.STREAM_DATA)
                    if n == -1:  # the head or the room wraps: the general path
                        n = records.recv_record(down, self.sock, RECORD, datagram=False)
                except BlockingIOError:
                    break
                if n == -1:
                    self.gate.set(False)  # full: wait for the front to take records
                    down.want_space_doorbell(True)
                    self.on_space()
                    break
                if n == 0:
                    self.gate.set(False)  # the peer's end: nothing more comes
                    break
                if n < RECORD:
                    break
        finally:
            down.release_doorbells()

    def on_space(self) -> None:
        try:
            os.eventfd_read(self.down.space_fd)
        except BlockingIOError:
            pass
        if self.gate.open:
            return
        if self.down.free() < RESUME:
            if self.timer is None:
                self.timer = self.loop.call_later(RECHECK, self._recheck)
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.down.want_space_doorbell(False)
        self.gate.set(True)

    def _recheck(self) -> None:
        self.timer = None
        self.on_space()


def _worker(up: Ring, down: Ring, ctl: socket.socket) -> None:
    ctl.settimeout(120.0)
    request = ctl.recv(64)
    if not request:
        return
    host, port = request.split()
    sock = socket.create_connection((host.decode(), int(port)), timeout=10)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ctl.sendall(b"C")
    ctl.setblocking(False)

    async def work() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        Worker(loop, sock, up, down)

        def on_ctl() -> None:
            try:
                if not ctl.recv(16) and not done.done():
                    done.set_result(None)  # the front is gone
            except BlockingIOError:
                pass

        loop.add_reader(ctl.fileno(), on_ctl)
        await done

    uvloop.run(work())


def start_workers(pty: Pty) -> tuple[list[tuple[Ring, Ring]], list[socket.socket]]:
    """The rings, and a worker forked per link (before any loop runs); the front's control sockets."""
    pairs = [(Ring.create(RING, f"floor{i}-up"), Ring.create(RING, f"floor{i}-down")) for i in range(LINKS)]
    ctls: list[socket.socket] = []
    for up, down in pairs:
        mine, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for s in [mine, *ctls]:  # the front's ends: a worker sees the front go
                    s.close()
                os.close(pty.master)
                os.close(pty.slave)
                _worker(up, down, theirs)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        ctls.append(mine)
    return pairs, ctls


async def _front(mode: str, master: int, pairs: list, ctls: list) -> None:
    loop = asyncio.get_running_loop()
    front = Front(loop, master)
    if mode == "one":
        front.links = [SockLink(front, i) for i in range(LINKS)]
    else:
        front.links = [RingLink(front, i, up, down, ctl) for i, ((up, down), ctl) in enumerate(zip(pairs, ctls))]
    await loop.create_future()  # until SIGTERM


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ("one", "split"):
        raise SystemExit("usage: python -m bench.floor_rings one|split LINK")
    mode, link = argv
    pty = open_pty(link)
    pairs, ctls = start_workers(pty) if mode == "split" else ([], [])
    uvloop.run(_front(mode, pty.master, pairs, ctls))


if __name__ == "__main__":
    main(sys.argv[1:])
