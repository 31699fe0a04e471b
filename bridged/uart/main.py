"""Entry point of the UART front process (called in the child after fork).

A serial port that cannot be opened is no crash: the front sends the reason
(`PortFailed`, one line naming the cause and the remedy) to the supervisor and
exits with `PORT_FAILED`; the supervisor ends the daemon or, for a port that
served (a front restarted while its USB adapter re-plugs), retries it with its
backoff.  A port that hangs up while the front serves is waited for and
reopened by the front itself, the session going on (bridged.uart.replug).
"""

from __future__ import annotations

import socket
import termios
from pathlib import Path

import structlog
import uvloop

from bridged.config import Config
from bridged.ipc.control import send_message
from bridged.ipc.messages import PortFailed
from bridged.ipc.rings import Ring
from bridged.ops.status import StatusService
from bridged.store import Store
from bridged.uart.front import Front
from bridged.uart.links import Slot
from bridged.uart.port import PortError, Pty, apply_termios, open_serial
from bridged.uart.restart import factory_uart
from bridged.commands.context import UartSettings

__all__ = ["run_front", "PORT_FAILED"]

log = structlog.get_logger()

PORT_FAILED = 4  # exit status: the serial port cannot be opened (PortFailed said why)


def run_front(
    config: Config,
    device: str,
    pty: Pty | None,
    state_dir: Path,
    rings: list[tuple[Ring, Ring]],
    supervisor: socket.socket,
    listener: socket.socket | None = None,
) -> int:
    store = Store(state_dir / "nvs.json")
    stored = store.get("uart_def")
    settings = UartSettings(*stored) if stored else factory_uart(config)
    if device:
        try:
            port = open_serial(device, settings)
        except PortError as exc:
            try:
                send_message(supervisor, PortFailed(str(exc)))
            except OSError:
                pass  # the supervisor is gone: nobody is left to tell
            return PORT_FAILED
        fd, name, apply = port.fd, device, port.apply
    else:
        port = None
        assert pty is not None
        fd, name = pty.master, pty.link or pty.path

        def apply(new: UartSettings) -> None:
            try:
                apply_termios(pty.slave, new)
            except ValueError as exc:  # an odd speed: the pty keeps its last one
                log.warning("uart_speed_not_applied", error=str(exc))
            except termios.error as exc:
                # Linux's pty refuses some changes (CS8 to CS7 with CRTSCTS off
                # both times: EINVAL); a pty has no wires, the session's settings
                # are what count, so it keeps its last ones.
                log.warning("uart_settings_not_applied", error=str(exc), settings=new.fields())

        apply(settings)

    async def main() -> int:
        slots = [Slot(i, up, down) for i, (up, down) in enumerate(rings)]
        front = Front(config, fd, name, store, slots, supervisor, apply, serial=port)
        service = StatusService(front, listener, "serial" if device else "pty")  # bridged status
        await service.start()
        try:
            await front.run()
        finally:
            await service.close()
        return PORT_FAILED if front.port_lost else 0

    return uvloop.run(main())
