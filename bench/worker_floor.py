"""One link worker at line rate, alone, against the floor of a minimal uvloop program doing its job.

A tool, not a comparison with socat: what a link worker's wake-up costs over
what any uvloop process doing the same moves costs.  In a forked child, one
of:

* ``worker``: the real ``bridged.links.worker.Worker`` (uvloop, as
  ``links.main`` runs it), connected by a ``Connect`` on its control socket;
* ``floor``: a minimal uvloop program doing the same job the lean way: the
  uplink ring's doorbell read with ``os.eventfd_read``, what the ring holds
  sent in one ``send`` of a slice, one consume; a periodic timerfd on the
  read window's grid, one ``recv_into`` the downlink ring, the record
  published with one doorbell write; SO_RCVLOWAT at one +IPD chunk, as read
  batching sets it;

and in this process, one thread standing in for the front and the peer (as
``bench.breakdown``'s ``both`` case for one link): ``CHUNK`` bytes into the
uplink ring every ``CHUNK / RATE`` seconds with a doorbell, the downlink
ring's records consumed on its doorbell, the peer's 1 KiB pieces at ``RATE``.
Every byte is checked both ways.  Measured over ``seconds`` after a second of
warm-up: the child's CPU (schedstat) and voluntary context switches
(wake-ups); runs alternate between the kinds.

Run: ``.venv/bin/python -m bench.worker_floor [seconds] [runs] [kinds]``
(defaults 6, 3, ``floor,worker``).  With ``PYTHONPATH=<dir>`` the child
imports bridged from there (a commit exported with ``git archive``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import signal
import socket
import statistics
import struct
import sys
import time

from bridged.ipc import records
from bridged.ipc.control import send_message, socketpair
from bridged.ipc.messages import Connect
from bridged.ipc.rings import Ring

RATE = 100_000  # bytes/s each way: one of bench.breakdown's five links
CHUNK = 2048  # the front's uplink writes (an AT+CIPSEND's payload)
PIECE = 1024  # the peer's
PERIOD_MS = 20  # [links] read_window_ms
IPD_CHUNK = 2920
RING = 65536
WARM = 1.0
PHASE = 0.005  # the peer's pieces this long after the front's writes


def _usage(pid: int) -> tuple[int, int]:
    """(nanoseconds on CPU, voluntary context switches) of ``pid``'s threads."""
    ns = switches = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
            ns += int(f.read().split()[0])
        with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
            switches += next(int(line.split()[1]) for line in f if line.startswith(b"voluntary_ctxt_switches"))
    return ns, switches


# -- the children ---------------------------------------------------------------------


def _worker_child(control: socket.socket, up: Ring, down: Ring) -> None:
    import structlog
    import uvloop

    from bridged.links.worker import Worker

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())

    async def main() -> None:
        worker = Worker(0, control, up, down, 5000, read_window_ms=PERIOD_MS, ipd_chunk=IPD_CHUNK)
        await worker.run()

    uvloop.run(main())


def _floor_child(control: socket.socket, up: Ring, down: Ring, port: int, merged: bool) -> None:
    import uvloop

    from bridged.links.ticker import Ticker

    head = struct.Struct("<IHBB")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, IPD_CHUNK)
        done = loop.create_future()
        up_fd, down_fd = up.data_fd, down.data_fd
        data = up._data
        mask = len(data) - 1

        def on_up() -> None:
            os.eventfd_read(up_fd)
            _, read, used = up.published()
            slot = read & mask
            n = min(used, len(data) - slot)
            if n:
                up.consume(sock.send(data[slot:slot + n]))

        def on_tick() -> None:
            if merged:
                _, read, used = up.published()
                slot = read & mask
                n = min(used, len(data) - slot)
                if n:
                    up.consume(sock.send(data[slot:slot + n]))
            span = down.reserve(records.HEADER_SIZE, RING // 4)
            try:
                n = sock.recv_into(span)
            except BlockingIOError:
                return
            if n:
                down.publish(head.pack(n, 0, records.DATA, 0), n)

        def on_control() -> None:
            if not control.recv(100):
                loop.remove_reader(control.fileno())
                done.set_result(None)

        ticker = Ticker(loop, on_tick)
        period = PERIOD_MS / 1000
        ticker.arm((time.monotonic() // period + 1) * period, period)
        if not merged:
            loop.add_reader(up_fd, on_up)
        control.setblocking(False)
        loop.add_reader(control.fileno(), on_control)
        await done
        del down_fd

    uvloop.run(main())


# -- this process: the front and the peer ------------------------------------------------


class _Driver:
    """The front's uplink writes and downlink reads, and the peer, on one select loop."""

    def __init__(self, up: Ring, down: Ring, peer: socket.socket, total: int) -> None:
        self.up, self.down, self.peer = up, down, peer
        self.total = total
        self.up_data = os.urandom(total)
        self.down_data = os.urandom(total)
        self.up_at = self.down_at = 0  # bytes sent each way
        self.got_up = hashlib.sha256()
        self.got_down = hashlib.sha256()
        self.n_up = self.n_down = 0
        self.start = 0.0

    def run(self, timeout: float) -> None:
        """Until ``total`` bytes arrived each way, on the schedule of the first call."""
        start = self.start = self.start or time.monotonic()
        deadline = time.monotonic() + timeout
        fds = [self.down.data_fd, self.peer.fileno()]
        while self.n_up < self.total or self.n_down < self.total:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"up {self.n_up}, down {self.n_down} of {self.total}")
            if self.up_at < self.total and now >= start + self.up_at / RATE:
                piece = self.up_data[self.up_at:self.up_at + CHUNK]
                while self.up.free() < len(piece):
                    time.sleep(0.001)
                self.up.stage(0, piece)
                self.up.commit(len(piece))
                self.up_at += len(piece)
            # The peer's pieces between the front's writes, as unrelated streams fall.
            if self.down_at < self.total and now >= start + PHASE + self.down_at / RATE:
                piece = self.down_data[self.down_at:self.down_at + PIECE]
                self.peer.sendall(piece)
                self.down_at += len(piece)
            due = min(start + self.up_at / RATE, start + PHASE + self.down_at / RATE)
            ready, _, _ = select.select(fds, [], [], max(0.0, min(due - time.monotonic(), 0.05)))
            if self.down.data_fd in ready:
                os.eventfd_read(self.down.data_fd)
                while (record := records.get_record(self.down)) is not None:
                    self.got_down.update(record.payload)
                    self.n_down += len(record.payload)
            if self.peer.fileno() in ready:
                data = self.peer.recv(65536)
                self.got_up.update(data)
                self.n_up += len(data)

    def check(self) -> None:
        if self.got_up.digest() != hashlib.sha256(self.up_data).digest():
            raise AssertionError("uplink bytes differ")
        if self.got_down.digest() != hashlib.sha256(self.down_data).digest():
            raise AssertionError("downlink bytes differ")


def run_once(kind: str, seconds: float) -> tuple[float, float]:
    """(CPU us per wake-up, wake-ups per s) of one child of ``kind``."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    ours, theirs = socketpair()
    up, down = Ring.create(RING, "floor-up"), Ring.create(RING, "floor-down")
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            server.close()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            if kind == "worker":
                _worker_child(theirs, up, down)
            else:
                _floor_child(theirs, up, down, port, kind == "merged")
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(0)
    theirs.close()
    print(f"{kind}: child {pid}", file=sys.stderr, flush=True)  # for strace -p, perf -p
    try:
        if kind == "worker":
            send_message(ours, Connect(1, "TCP", "127.0.0.1", port))
        server.settimeout(10)
        peer, _ = server.accept()
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up.want_space_doorbell(False)  # as the front: only while it waits for room
        total = int(RATE * (seconds + WARM))
        driver = _Driver(up, down, peer, total)
        time.sleep(0.3)
        warm = int(RATE * WARM)
        driver.total = warm
        driver.run(WARM * 3 + 5)
        before, t0 = _usage(pid), time.monotonic()
        driver.total = total
        driver.run(seconds * 3 + 5)
        after, elapsed = _usage(pid), time.monotonic() - t0
        driver.check()
        peer.close()
    finally:
        ours.close()
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        server.close()
        up.close()
        down.close()
    wakes = after[1] - before[1]
    return (after[0] - before[0]) / 1000 / max(wakes, 1), wakes / elapsed


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 6.0
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    kinds = sys.argv[3].split(",") if len(sys.argv) > 3 else ["floor", "worker"]
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for _ in range(runs):
        for kind in kinds:
            results[kind].append(run_once(kind, seconds))
    for kind, got in results.items():
        us = [r[0] for r in got]
        rate = [r[1] for r in got]
        print(f"{kind:8s} {statistics.median(us):6.1f} us CPU per wake-up at {statistics.median(rate):5.0f} "
              f"wake-ups/s ({statistics.median(us) * statistics.median(rate) / 1000:5.2f} ms CPU/s; "
              f"runs: {', '.join(f'{u:.1f}' for u in us)})")


if __name__ == "__main__":
    main()
