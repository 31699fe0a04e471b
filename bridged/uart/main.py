"""Entry point of the UART front process (called in the child after fork)."""

from __future__ import annotations

import socket
from pathlib import Path

import structlog
import uvloop

from bridged.config import Config
from bridged.ipc.rings import Ring
from bridged.store import Store
from bridged.uart.front import Front, factory_uart
from bridged.uart.links import Slot
from bridged.uart.port import Pty, apply_termios, open_serial
from bridged.commands.context import UartSettings

__all__ = ["run_front"]

log = structlog.get_logger()


def run_front(
    config: Config,
    device: str,
    pty: Pty | None,
    state_dir: Path,
    rings: list[tuple[Ring, Ring]],
    supervisor: socket.socket,
) -> int:
    store = Store(state_dir / "nvs.json")
    stored = store.get("uart_def")
    settings = UartSettings(*stored) if stored else factory_uart(config)
    if device:
        port = open_serial(device, settings)
        fd, name, apply = port.fd, device, port.apply
    else:
        assert pty is not None
        fd, name = pty.master, pty.link or pty.path

        def apply(new: UartSettings) -> None:
            try:
                apply_termios(pty.slave, new)
            except ValueError as exc:  # an odd speed: the pty keeps its last one
                log.warning("uart_speed_not_applied", error=str(exc))

        apply(settings)

    async def main() -> None:
        slots = [Slot(i, up, down) for i, (up, down) in enumerate(rings)]
        front = Front(config, fd, name, store, slots, supervisor, apply)
        await front.run()

    uvloop.run(main())
    return 0
