"""Floor (b)'s rings and link workers, and the stand-in daemon's entry point (``bench.five_floor``).

Run as ``python -m bench.floor_rings MODE LINK`` (MODE ``one``, ``split`` or ``polled``; see
``bench.floor_parts`` for what the stand-in answers).  In ``split`` the process
makes one uplink and one downlink ``Ring`` per link (65536 bytes, bridged's
default) and forks a worker per link before its loop starts, as bridged's
supervisor does; a worker waits on its control socket for the address, connects,
says so, then moves bytes: the uplink ring's published bytes to the socket on its
doorbell (SEND OK went out when the front committed them), the socket's bytes
into the downlink ring as records (``Ring.recv_behind``, one doorbell per
wake-up).  Neither side asks for the other's space doorbell except while it waits
for room; that wait looks again every RECHECK seconds too (the index stores have
no fence: ``Ring.want_space_doorbell``).  ``polled``: ``split`` with the uplink
ring polled during the bulk upload as bridged's workers poll it (``Worker``).  A
worker ends when the front does (its control socket's end).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import traceback

import uvloop

from bridged.ipc import records
from bridged.ipc.rings import Ring
from bridged.links.ticker import Ticker
from bridged.uart.port import Pty, open_pty

from .floor_parts import LINKS, OVERHEAD, RECHECK, RECORD, RING, Front, Gate, SockLink

RESUME = RING // 4  # free bytes a worker waits for before it reads its socket again
BULK_TICK = 0.004  # s: bridged's bulk tick (links.bulkpoll._BULK_TICK)


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
        self.resume()

    def resume(self) -> None:
        budget = self.front.budget()
        if budget <= 0:
            self.front.pending[self] = True  # taken when the output has room
            return
        recs, more = records.take_records(self.down, budget, OVERHEAD)
        for kind, payload, _addr in recs:
            if kind == records.DATA:
                self.front.frame(self.i, payload)
        if more:
            self.front.pending[self] = True


class Worker:
    """Floor (b)'s link worker: the uplink ring to the socket, the socket into the downlink ring.

    ``polled``: the uplink ring polled as bridged's bulk upload polls it (``links.bulkpoll``):
    the front's commits ring only past half a ring or after a quiet tick, and a one-shot tick
    BULK_TICK after the last send takes what came unrung (armed again while commits come)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, up: Ring, down: Ring,
                 polled: bool = False) -> None:
        self.loop, self.sock, self.up, self.down = loop, sock, up, down
        self.mask = up.capacity - 1
        self.writing = False
        self.timer: asyncio.TimerHandle | None = None
        self.ticker: Ticker | None = None
        self.due = 0.0  # when the armed tick fires (0: none armed)
        self.idle = 0  # ticks running that found nothing, the last commit a tick old
        down.want_space_doorbell(False)  # asked for only while the ring is full
        loop.add_reader(up.data_fd, self.on_up)
        loop.add_reader(down.space_fd, self.on_space)
        self.gate = Gate(loop, sock.fileno(), self.on_sock)
        if polled:
            self.ticker = Ticker(loop, self.on_tick)
            up.poll_on_tick(BULK_TICK)

    def arm(self) -> None:
        self.due = time.monotonic() + BULK_TICK
        self.ticker.arm(self.due, 0)

    def on_tick(self) -> None:
        self.due = 0.0
        if self.push() or time.monotonic_ns() - self.up.last_commit() < BULK_TICK * 1e9:
            self.idle = 0
        else:
            self.idle += 1  # two quiet ticks: the next commit comes after quiet, and rings
        if not self.due and self.idle < 2:
            self.arm()

    def on_up(self) -> None:
        try:
            os.eventfd_read(self.up.data_fd)
        except BlockingIOError:
            pass
        if not self.writing:
            self.push()

    def push(self) -> int:
        """Send what the uplink ring holds; return the bytes sent."""
        up, total = self.up, 0
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
                return total
            up.consume(sent)
            total += sent
        if self.writing:
            self.loop.remove_writer(self.sock.fileno())
            self.writing = False
        if total and self.ticker is not None and self.due - time.monotonic() < 0.5 * BULK_TICK:
            self.arm()  # a tick at most BULK_TICK after this send, re-armed every other wake-up
        return total

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


def _worker(up: Ring, down: Ring, ctl: socket.socket, polled: bool) -> None:
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
        Worker(loop, sock, up, down, polled)

        def on_ctl() -> None:
            try:
                if not ctl.recv(16) and not done.done():
                    done.set_result(None)  # the front is gone
            except BlockingIOError:
                pass

        loop.add_reader(ctl.fileno(), on_ctl)
        await done

    uvloop.run(work())


def start_workers(pty: Pty, polled: bool) -> tuple[list[tuple[Ring, Ring]], list[socket.socket]]:
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
                _worker(up, down, theirs, polled)
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
    if len(argv) != 2 or argv[0] not in ("one", "split", "polled"):
        raise SystemExit("usage: python -m bench.floor_rings one|split|polled LINK")
    mode, link = argv
    pty = open_pty(link)
    pairs, ctls = start_workers(pty, mode == "polled") if mode != "one" else ([], [])
    uvloop.run(_front(mode, pty.master, pairs, ctls))


if __name__ == "__main__":
    main(sys.argv[1:])
