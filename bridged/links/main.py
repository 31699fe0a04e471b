"""Entry point of a link worker process (called in the child after fork)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import structlog
import uvloop

from bridged.config import Config
from bridged.ipc.rings import Ring
from bridged.links.worker import Worker
from bridged.liveness import answer_pings
from bridged.net.localaddr import link_policy
from bridged.pki import PkiStore

__all__ = ["run_worker", "FRONT_GONE", "TASK_FAILED"]

log = structlog.get_logger()

FRONT_GONE = 3  # exit status: the front closed the control socket (it died or stopped)
TASK_FAILED = 1  # exit status: a task of the worker failed unexpectedly (as any crash: restarted)
_TERM_GRACE = 1.0  # seconds a SIGTERM'd worker waits for the front to stop first


def run_worker(config: Config, link_id: int, control: socket.socket, uplink: Ring, downlink: Ring,
               state_dir: Path, heartbeat: socket.socket | None = None) -> int:
    async def main() -> int:
        links = config.links
        worker = Worker(link_id, control, uplink, downlink, links.connect_timeout_ms, PkiStore(state_dir),
                        read_window_ms=links.read_window_ms, ipd_chunk=links.chunk,
                        policy=link_policy(links.allow, links.deny, links.local_ports),
                        station=config.wifi.station_interface,
                        faults=config.faults.specs(), fault_seed=config.faults.seed or 0)
        loop = asyncio.get_running_loop()
        supervisor = os.getppid()

        def on_term() -> None:
            # `pkill bridged` or a group's SIGTERM reaches the supervisor too,
            # which stops the front first; we then end with our control
            # socket, so the supervisor never takes our exit for a crash.
            # Alone (the supervisor gone, or only we were signalled), stop.
            if os.getppid() != supervisor:
                worker.stop()
            else:
                loop.call_later(_TERM_GRACE, worker.stop)

        loop.add_signal_handler(signal.SIGTERM, on_term)  # SIGINT: the supervisor's
        if heartbeat is not None:
            answer_pings(loop, heartbeat)  # the supervisor's liveness check (bridged.liveness)
        try:
            await worker.run()
        except ExceptionGroup as failed:  # the worker's TaskGroup: our bug, not the network's
            for exc in _leaves(failed):
                log.error("worker_task_failed", exc_info=exc)
            return TASK_FAILED
        return FRONT_GONE if worker.front_gone else 0

    return uvloop.run(main())


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions of a group, nested groups flattened: each with its own traceback."""
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves
