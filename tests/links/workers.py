"""A link worker in this process for tests: fresh rings, a control socketpair, run
in uvloop past its Hello, then stopped and its sockets closed whatever the test did."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import uvloop

from bridged.ipc.control import socketpair
from bridged.ipc.messages import Hello
from bridged.ipc.rings import Ring
from bridged.links.worker import Worker
from tests.links.control import recv_control
from tests.ringtools import new_ring

T = TypeVar("T")


@dataclass(frozen=True)
class LiveWorker:
    """A worker running in the test's loop; `control` is the front's (non-blocking) end."""

    worker: Worker
    running: asyncio.Task
    control: socket.socket
    up: Ring
    down: Ring

    async def stop(self) -> None:
        """stop(), and run() must return within 5 s."""
        self.worker.stop()
        await asyncio.wait_for(self.running, 5.0)


def drive_worker(script: Callable[[LiveWorker], Awaitable[T]], *, link_id: int = 0,
                 up_size: int = 4096, down_size: int = 4096, **options: Any) -> T:
    """`await script(live)` with a Worker(link_id, ..., 5000, **options) that said Hello; its result."""
    ours, theirs = socketpair()

    async def main() -> T:
        ours.setblocking(False)
        with new_ring(up_size) as up, new_ring(down_size) as down:
            worker = Worker(link_id, theirs, up, down, 5000, **options)
            live = LiveWorker(worker, asyncio.create_task(worker.run()), ours, up, down)
            assert isinstance(await recv_control(ours), Hello)
            try:
                return await script(live)
            finally:
                await live.stop()

    try:
        return uvloop.run(main())
    finally:
        ours.close()
        theirs.close()
