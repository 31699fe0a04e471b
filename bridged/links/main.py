"""Entry point of a link worker process (called in the child after fork)."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import uvloop

from bridged.config import Config
from bridged.ipc.rings import Ring
from bridged.links.worker import Worker
from bridged.pki import PkiStore

__all__ = ["run_worker", "FRONT_GONE"]

FRONT_GONE = 3  # exit status: the front closed the control socket (it died or stopped)


def run_worker(config: Config, link_id: int, control: socket.socket, uplink: Ring, downlink: Ring,
               state_dir: Path) -> int:
    async def main() -> int:
        worker = Worker(link_id, control, uplink, downlink, config.links.connect_timeout_ms, PkiStore(state_dir),
                        read_window_ms=config.links.read_window_ms, ipd_chunk=config.links.chunk)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, worker.stop)  # SIGINT: the supervisor's
        await worker.run()
        return FRONT_GONE if worker.front_gone else 0

    return uvloop.run(main())
