"""A link worker in this process with real rings and a real TCP peer, its read-batching
ticker's timerfd_settime failing (as under a seccomp filter that refuses it): read
batching turns off with a warning instead of stranding bytes below a raised low-water
mark, and the link still ends (Ended, its EOF record) when the host closes it."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time

import pytest
from structlog.testing import capture_logs

from bridged.ipc import records
from bridged.ipc.control import send_message
from bridged.ipc.messages import Close, Connect, Connected, Ended
from bridged.links import ticker as ticker_module
from tests.links.control import recv_control, recv_until
from tests.links.workers import LiveWorker, drive_worker

pytestmark = pytest.mark.timeout(60)

WINDOW_MS = 20
PIECES = 30  # 700 bytes, 8 ms apart: two within a window start read batching
TAIL = b"t" * 100  # below the raised low-water mark (one +IPD chunk)


def _refusing(when: str):
    """A timerfd whose settime fails with EPERM when arming ("arm") or disarming ("disarm")."""
    real = ticker_module._timerfd

    class Refusing:
        def __init__(self) -> None:
            self._real = real()

        def create(self) -> int:
            return self._real.create()

        def settime(self, fd: int, first: float, interval: float) -> None:
            if (first > 0) == (when == "arm"):
                raise OSError(errno.EPERM, "Operation not permitted")
            self._real.settime(fd, first, interval)

    return Refusing


class _Streamer:
    """Accepts one connection; sends PIECES 700-byte pieces 8 ms apart, then TAIL, then waits."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sent = bytearray()
        self.tail_at = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.server.settimeout(5)
        conn, _ = self.server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            for i in range(PIECES):
                piece = bytes([i + 1]) * 700
                conn.sendall(piece)
                self.sent += piece
                time.sleep(0.008)
            conn.sendall(TAIL)
            self.sent += TAIL
            self.tail_at = time.monotonic()
            self.stop.wait(10)

    def close(self) -> None:
        self.stop.set()
        self.server.close()
        self.thread.join(5)


def _stream_then_close(monkeypatch, when: str):
    """(bytes the ring got, seconds from the tail to the last of them, the socket's
    SO_RCVLOWAT then, whether the host's Close got Ended and the EOF record, loop errors, logs)."""
    monkeypatch.setattr(ticker_module, "_timerfd", _refusing(when))
    peer = _Streamer()

    async def main(live: LiveWorker):
        errors: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        send_message(live.control, Connect(1, "TCP", "127.0.0.1", peer.port, tls_auth=0))
        assert isinstance(await recv_control(live.control), Connected)
        got = bytearray()
        done_at = 0.0
        async with asyncio.timeout(10):
            while len(got) < PIECES * 700 + len(TAIL):
                while (record := records.get_record(live.down)) is not None:
                    got += record.payload
                    done_at = time.monotonic()
                if peer.tail_at and time.monotonic() - peer.tail_at > 1.0:
                    break  # stranded
                await asyncio.sleep(0.001)
        await asyncio.sleep(3 * WINDOW_MS / 1000)  # a quiet spell: batching, if on, ends
        lowat = live.worker.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        send_message(live.control, Close(1))
        ended = eof = False
        try:
            ended = isinstance(await recv_until(live.control, Ended), Ended)
            async with asyncio.timeout(2):
                while not eof:
                    record = records.get_record(live.down)
                    eof = record is not None and record.kind == records.EOF
                    await asyncio.sleep(0.005)
        except TimeoutError:
            pass
        return bytes(got), done_at - peer.tail_at, lowat, ended and eof, errors

    try:
        with capture_logs() as logs:
            got, tail_hold, lowat, ended, errors = drive_worker(
                main, up_size=65536, down_size=65536, read_window_ms=WINDOW_MS)
    finally:
        peer.close()
    return got, peer.sent, tail_hold, lowat, ended, errors, logs


@pytest.mark.parametrize("when", ["arm", "disarm"])
def test_a_failing_timerfd_turns_read_batching_off_and_strands_nothing(monkeypatch, when):
    """timerfd_settime refused when read batching arms its ticker, or when it disarms it: a
    read_window_unavailable warning, the stream's 100-byte tail reaches the ring within a
    window (not stranded below the low-water mark), SO_RCVLOWAT is back at 1, no callback
    fails, and the host's Close still gets Ended and the EOF record."""
    got, sent, tail_hold, lowat, ended, errors, logs = _stream_then_close(monkeypatch, when)
    assert got == bytes(sent)
    assert tail_hold < 0.5, tail_hold
    assert lowat == 1
    assert not errors, [e.get("message") or repr(e.get("exception")) for e in errors]
    assert ended
    assert [e for e in logs if e["event"] == "read_window_unavailable"], logs
