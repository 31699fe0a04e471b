"""The MCU's payloads on read batching's ticks over TLS (``links.batching``, "The uplink on
the ticks"): a link worker in this process, a real TLS peer.  The peer's FIN with no
close_notify (as many servers close) fails the worker's TLS session at the read that finds
it, and nothing can be sent after that: the payloads the front put in the ring with no
doorbell must go before that read, or they are lost (as they were not without polling:
their doorbell sent them at once)."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time

import pytest

from bridged.ipc import records
from bridged.ipc.control import send_message
from bridged.ipc.messages import Close, Connect, Connected
from bridged.pki import PkiStore
from tests.integration.test_tls import _issue
from tests.links.control import recv_control
from tests.links.workers import LiveWorker, drive_worker

pytestmark = pytest.mark.timeout(60)

WINDOW = 0.1


class _TlsPeer:
    """Streams 1 KiB every 20 ms over TLS and keeps what it decrypts; on ``fin`` shuts its
    side of the TCP connection (no close_notify) and reads on to the end."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.got = bytearray()
        self.fin = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.settimeout(5)
            conn, _ = self.server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(5)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                self._stream(tls)
        finally:
            self.done.set()

    def _stream(self, tls: ssl.SSLSocket) -> None:
        tls.setblocking(False)
        deadline, next_piece, i, finned = time.monotonic() + 15, time.monotonic(), 0, False
        while time.monotonic() < deadline:
            if self.fin.is_set() and not finned:
                finned = True
                with socket.socket(fileno=os.dup(tls.fileno())) as raw:
                    raw.shutdown(socket.SHUT_WR)  # the TCP FIN, the TLS session left as it is
            if not finned and time.monotonic() >= next_piece:
                try:
                    tls.send(bytes([i % 250]) * 1024)
                except (ssl.SSLWantWriteError, BlockingIOError):
                    pass
                i, next_piece = i + 1, next_piece + 0.020
            try:
                data = tls.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                time.sleep(0.0005)
                continue
            except OSError:
                return  # the worker's alert or reset, once it is done
            if not data:
                return
            self.got += data

    def close(self) -> None:
        self.server.close()
        self.thread.join(20)


def test_the_peers_fin_without_close_notify_while_polling_sends_the_rings_bytes_first(tmp_path):
    """Both ways stream over TLS with a 100 ms window until the worker polls the uplink;
    a payload committed just after a tick (no doorbell), then the peer's FIN with no
    close_notify, long before the next tick: the peer decrypts every byte, in order."""
    leaf, _ = _issue(tmp_path, "leaf", "localhost")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(leaf.cert, leaf.key)
    peer = _TlsPeer(ctx)

    async def script(live: LiveWorker) -> bytes:
        send_message(live.control, Connect(1, "SSL", "127.0.0.1", peer.port, tls_auth=0))
        assert isinstance(await recv_control(live.control), Connected)
        sent, start, k = bytearray(), time.monotonic(), 0
        async with asyncio.timeout(10):
            while not (live.up._index[9] and time.monotonic() > start + 0.5):
                if time.monotonic() >= start + k * 0.05:
                    payload = bytes([k % 255 + 1]) * 2048
                    live.up.stage(0, payload)
                    live.up.commit(len(payload))
                    sent, k = sent + payload, k + 1
                while records.get_record(live.down) is not None:
                    pass
                await asyncio.sleep(0.001)
            while not 0.01 <= time.monotonic() % WINDOW <= 0.03:  # just after a tick
                await asyncio.sleep(0.001)
            last = b"last payload " * 160
            live.up.stage(0, last)
            live.up.commit(len(last))
            sent += last
            peer.fin.set()
            while not peer.done.is_set():
                while records.get_record(live.down) is not None:
                    pass
                await asyncio.sleep(0.002)
        send_message(live.control, Close(1))
        return bytes(sent)

    try:
        sent = drive_worker(script, up_size=65536, down_size=65536, read_window_ms=int(WINDOW * 1000),
                            pki=PkiStore(tmp_path / "state"))
    finally:
        peer.close()
    assert len(peer.got) == len(sent)
    assert bytes(peer.got) == sent
