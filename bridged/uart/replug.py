"""A serial device that vanishes and returns: a USB-UART adapter unplugged and
plugged in again, a UART whose driver was reset.

Theory of operation.  The front notices the hang-up (a read gives EOF, EIO or
ENXIO, a write EIO), stops reading and writing, and calls ``lost``.  Nothing
else changes: an ESP32 does not reset when its host's wiring hiccups, so the
session keeps its AT state, its links and its data phase, and says nothing
(no ``ready``).  Output for the MCU stays queued (``Output.suspend``) up to
the front's high-water mark; then the downlink rings fill, the workers stop
reading their sockets and the peers' TCP windows close.  What the kernel had
taken for the old device is lost with it, as bytes on a cut wire are.

The device's path (a /dev/serial/by-id link comes and goes with the adapter)
is looked at every ``POLL`` seconds -- simpler than inotify on its folder,
and cheap -- and reopened with the settings in force (AT+UART_CUR's, not only
the config's) as soon as it opens; then the front resumes.  A device that
never returns keeps the daemon waiting, with a reminder in the log every
``REMIND`` seconds: never a restart loop.  One log event per transition:
``port_lost`` (the path and why) and ``port_back`` (the path and the seconds
it was away).
"""

from __future__ import annotations

import asyncio
import os
from typing import Callable

import structlog

from bridged.tasks import Spawn
from bridged.uart.port import PortError, SerialPort

__all__ = ["Replug", "POLL", "REMIND"]

log = structlog.get_logger()

POLL = 0.25  # seconds between looks at the device's path
REMIND = 60.0  # seconds between reminders that the device is still away


class Replug:
    def __init__(self, port: SerialPort, on_back: Callable[[int], None], spawn: Spawn) -> None:
        self.port = port
        self.on_back = on_back  # called with the reopened port's fd
        self._spawn = spawn
        self.loop = asyncio.get_running_loop()
        self._task: asyncio.Task | None = None
        self._since = 0.0

    @property
    def away(self) -> bool:
        return self._task is not None

    def lost(self, why: str) -> None:
        """The device hung up (``why``: what said so); wait for it. Once per loss."""
        if self._task is not None:
            return
        self._since = self.loop.time()
        self.port.release()
        log.error("port_lost", device=self.port.device, error=why,
                  remedy="waiting for it to return; plug the device in again")
        self._task = self._spawn(self._wait())

    async def _wait(self) -> None:
        remind_at = self._since + REMIND
        why = "does not exist"
        while True:
            await asyncio.sleep(POLL)
            now = self.loop.time()
            if now >= remind_at:
                log.warning("port_still_away", device=self.port.device, away_s=round(now - self._since),
                            error=why)
                remind_at += REMIND
            if not os.path.exists(self.port.device):
                why = "does not exist"
                continue
            try:
                fd = self.port.reopen()
            except (PortError, OSError) as exc:  # there, but not usable yet (udev still at it, locked)
                why = str(exc)
                continue
            break
        self._task = None
        log.info("port_back", device=self.port.device, away_s=round(self.loop.time() - self._since, 3))
        self.on_back(fd)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
