"""A link worker in this process with real rings and real TCP peers: the read
timing of a connection (read batching's "a stream is under way") does not
carry over to the next connection the worker opens."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from bridged.ipc import records
from bridged.ipc.control import send_message
from bridged.ipc.messages import Close, Connect, Connected
from tests.links.control import recv_until
from tests.links.workers import LiveWorker, drive_worker

WINDOW = 0.1  # read_window_ms 100
PIECE = 1024


class _Server:
    """One TCP client accepted in a thread and handed to ``script(conn, server)``,
    which logs the monotonic time of each piece it sends in ``sent_at``."""

    def __init__(self, script) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent_at: list[float] = []
        self.stop = threading.Event()
        self.script = script
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(5)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            try:
                self.script(conn, self)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the worker closed the link under the script

    def send(self, conn: socket.socket, piece: bytes) -> None:
        conn.sendall(piece)
        self.sent_at.append(time.monotonic())

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(5)


def _streamer(conn: socket.socket, server: _Server) -> None:
    """1 KiB pieces every 10 ms until stopped (at most 5 s)."""
    for _ in range(500):
        if server.stop.is_set():
            return
        server.send(conn, b"1" * PIECE)
        time.sleep(0.01)


def _two_pieces(conn: socket.socket, server: _Server) -> None:
    """Piece A at once, piece B 60 ms later, then stay open."""
    server.send(conn, b"A" * PIECE)
    time.sleep(0.06)
    server.send(conn, b"B" * PIECE)
    server.stop.wait(5)


class _Records:
    """The downlink ring's records: data before the first EOF is connection 1's, after it 2's."""

    def __init__(self, live: LiveWorker) -> None:
        self.live = live
        self.first, self.second = bytearray(), bytearray()
        self.eofs: list[bytes] = []
        self.arrivals: list[tuple[int, float]] = []  # (connection 2's bytes so far, when)

    def drain(self) -> None:
        now = time.monotonic()
        while (record := records.get_record(self.live.down)) is not None:
            if record.kind == records.EOF:
                self.eofs.append(bytes(record.payload))
            elif self.eofs:
                self.second += record.payload
                self.arrivals.append((len(self.second), now))
            else:
                self.first += record.payload

    async def until(self, test, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not test():
                await asyncio.sleep(0.0005)
                self.drain()


async def _switch(live: LiveWorker, port1: int, port2: int, log: _Records) -> bool:
    """Stream on connection 1 for 300 ms, then Close(1) and Connect(2) at once; whether
    read batching was on when connection 1 closed."""
    loop = asyncio.get_running_loop()
    send_message(live.control, Connect(1, "TCP", "127.0.0.1", port1))
    assert isinstance(await recv_until(live.control, Connected), Connected)
    started = loop.time()
    await log.until(lambda: loop.time() - started >= 0.3)
    # Switch half-way between two of the read window's ticks (they fall on one
    # grid of the loop's clock): a piece held for a tick then waits >= 40 ms.
    await log.until(lambda: 0.04 <= loop.time() % WINDOW < 0.05, timeout=1.0)
    batching = live.worker._batch_tick is not None
    send_message(live.control, Close(1))
    send_message(live.control, Connect(2, "TCP", "127.0.0.1", port2))
    assert isinstance(await recv_until(live.control, Connected), Connected)
    await log.until(lambda: len(log.second) >= 2 * PIECE, timeout=2.0)
    return batching


def test_a_new_connection_does_not_inherit_read_batching():
    """A connection opened right after one whose peer streamed (read batching on)
    reads its peer's second bulk piece at once, not on the next tick, and holds
    none of the first connection's bytes."""
    peer1, peer2 = _Server(_streamer), _Server(_two_pieces)
    log: list[_Records] = []

    async def main(live: LiveWorker) -> bool:
        log.append(_Records(live))
        return await _switch(live, peer1.port, peer2.port, log[0])

    try:
        batching = drive_worker(main, up_size=65536, down_size=65536, read_window_ms=100)
    finally:
        peer1.close()
        peer2.close()
    got = log[0]
    assert batching, "connection 1's stream should have started read batching"
    assert got.eofs[:1] == [b"1 closed by host"], got.eofs
    assert set(got.first) == {ord("1")}, "connection 1 got bytes not its peer's"
    assert bytes(got.second) == b"A" * PIECE + b"B" * PIECE, "connection 2's records are not its peer's pieces"
    b_sent = peer2.sent_at[1]
    b_in = next(when for size, when in got.arrivals if size >= 2 * PIECE)
    print("piece B held %.1f ms" % ((b_in - b_sent) * 1e3))
    assert b_in - b_sent < 0.035, f"piece B waited {(b_in - b_sent) * 1e3:.1f} ms for a read batching tick"
