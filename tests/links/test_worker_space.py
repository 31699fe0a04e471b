"""A link worker in this process with real rings and a real TCP peer: when the
front's space doorbell is lost (the race the ring cannot fence against), the
worker still resumes, from its own look at the free space."""

from __future__ import annotations

import asyncio
import socket
import threading

from bridged.ipc import records
from bridged.ipc.control import send_message
from bridged.ipc.messages import Close, Connect, Connected
from bridged.links import downlink as downlink_module
from tests.links.control import recv_control as _recv
from tests.links.workers import LiveWorker, drive_worker

PAYLOAD = bytes(range(256)) * 1024  # 256 KiB: many times the 8 KiB downlink ring


async def _until(predicate, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)


def test_a_lost_space_doorbell_costs_one_poll_interval_not_the_link():
    """The front drains the ring but swallows the space doorbell: the worker still resumes within a poll interval and all 256 KiB arrive."""
    server = socket.create_server(("127.0.0.1", 0))
    peer_done = threading.Event()

    def peer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(PAYLOAD)
            peer_done.wait(20)

    threading.Thread(target=peer, daemon=True).start()

    async def script(live: LiveWorker) -> bytes:
        ours, down = live.control, live.down
        send_message(ours, Connect(1, "TCP", "127.0.0.1", server.getsockname()[1]))
        assert isinstance(await _recv(ours), Connected)
        got = bytearray()
        loop = asyncio.get_running_loop()
        lost = 0
        async with asyncio.timeout(20):
            while len(got) < len(PAYLOAD):
                # Wait until the worker stopped for room (the ring is full).
                await _until(lambda: down.free() < 64 or len(got) + down.available() >= len(PAYLOAD),
                             5.0, "a full ring")
                await asyncio.sleep(0.01)
                # Act as the front, but lose the doorbell: take every record,
                # then swallow the space doorbell before the worker's loop sees it.
                while (record := records.get_record(down)) is not None:
                    got += record.payload
                if down.clear_space_doorbell():
                    lost += 1
                t0 = loop.time()
                if len(got) < len(PAYLOAD):
                    await _until(lambda: down.available() > 0, 2.0, "the worker to resume")
                    assert loop.time() - t0 <= downlink_module._SPACE_POLL + 0.1
        send_message(ours, Close(1))
        peer_done.set()
        await live.stop()
        assert lost > 0, "no doorbell was lost: the test did not exercise the fallback"
        return bytes(got)

    try:
        assert drive_worker(script, up_size=4096, down_size=8192) == PAYLOAD
    finally:
        peer_done.set()
        server.close()
