"""The emulated chip (re)booting: the answer goes out, silence, then ready.

Theory of operation.  ESP-AT restarts only once its UART has sent the
answer (AT+RST's OK: a timer defers esp_restart, esp-at-behavior.md 1.5),
then it is deaf and mute while the ROM, the bootloader, ESP-IDF and the AT
core start: a few hundred ms on an ESP32.  Only then does it print
``ready``.  Host drivers count on that silence: lwESP re-initialises its
UART on the OK to AT+RST and AT+RESTORE, flushing its input, so a ``ready``
right behind the OK would be flushed with it.

A ``Boot`` is one boot, the same for every restart (AT+RST, AT+RESTORE, a
successful AT+CIUPDATE, a forced restart, the front's start, including
after a crash or a reload):

1. the output queued so far is written and the port has sent it, or what is
   left after 3 s is discarded: ESP-AT waits that long at most
   (``ESP_AT_PORT_TX_WAIT_MS_MAX`` in ``at_restart_before_cb``), and a
   restarting chip's UART loses the rest (an MCU holding CTS low).  A
   command's restart (AT+RST) begins once its answer has left the front's
   queue (an after-action); a forced restart begins at once;
2. ``restart_port()`` gives the port AT+UART_DEF's settings and returns them;
3. with ``[firmware] boot_banner``: the ROM banner as the host's receiver,
   at those settings, decodes it (bridged.uart.banner);
4. ``[firmware] boot_ms`` of silence.  What the MCU sends from the restart
   on is dropped (the chip is not listening yet), counted and logged once;
5. ``on_ready()``: the front writes ready and what follows it.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import structlog

from bridged.commands.context import UartSettings
from bridged.config import FirmwareConfig
from bridged.tasks import Spawn
from bridged.uart.banner import Framing, Reset, as_received, rom_banner
from bridged.uart.output import Output

__all__ = ["Boot", "Reset"]

log = structlog.get_logger()

TX_WAIT_MAX = 3.0  # seconds: ESP_AT_PORT_TX_WAIT_MS_MAX


class Boot:
    """One boot of the emulated chip; ``drop()`` counts the input it does not hear."""

    def __init__(self, config: FirmwareConfig, output: Output, reset: Reset, dropped: int = 0) -> None:
        self.config = config
        self.output = output
        self.reset = reset
        self.dropped = dropped  # input bytes the booting chip did not hear
        self._task: asyncio.Task | None = None

    def start(
        self,
        drain_port: Callable[[float], Awaitable[bool]],
        restart_port: Callable[[], UartSettings],
        on_ready: Callable[[], None],
        on_failed: Callable[[], None],
        spawn: Spawn | None = None,
        settle: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``run()`` as a task made by ``spawn`` (the front's TaskScope; a plain task of the
        running loop without one); ``on_failed()`` if it raises (our bug: without ready the
        MCU would wait for ever, so the front should end and be restarted)."""
        work = self.run(drain_port, restart_port, on_ready, settle)
        self._task = spawn(work) if spawn is not None else asyncio.get_running_loop().create_task(work)

        def ended(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("boot_failed", error=repr(task.exception()))
                on_failed()

        self._task.add_done_callback(ended)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def drop(self, size: int) -> None:
        """Input arrived while the chip boots: it is lost, as on the real one."""
        self.dropped += size

    async def run(
        self,
        drain_port: Callable[[float], Awaitable[bool]],
        restart_port: Callable[[], UartSettings],
        on_ready: Callable[[], None],
        settle: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Boot: steps 1 to 5 above.

        Args:
            drain_port: waits until the port has sent its queue, at most until the
                deadline it is given (the loop's clock); False when it discarded some.
            restart_port: applies AT+UART_DEF's settings, returns them.
            on_ready: writes ready and what follows it.
            settle: waits (bounded) until the old session's links are gone, so that
                a host's first command after ready finds none (a real chip's reboot
                ends them all at once).
        """
        deadline = asyncio.get_running_loop().time() + TX_WAIT_MAX
        lost = 0 if await self._output_written(deadline) else self.output.discard()
        sent = await drain_port(deadline)
        if lost or not sent:
            log.warning("restart_output_discarded", queued_bytes=lost, port_flushed=not sent,
                        hint="not sent within ESP-AT's 3 s: CTS held low, or a host not reading?")
        settings = restart_port()
        noise = b""
        if self.config.boot_banner:
            framing = Framing(settings.baud, settings.data_bits, settings.parity)
            noise = as_received(rom_banner(self.reset), self.config.boot_banner_baud, framing)
            self.output.reply(noise)
        log.info("booting", reset=self.reset.name.lower(), boot_ms=self.config.boot_ms, banner_bytes=len(noise))
        await asyncio.sleep(self.config.boot_ms / 1000)
        if settle is not None:
            await settle()
        if self.dropped:
            log.info("boot_input_dropped", bytes=self.dropped)
        on_ready()

    async def _output_written(self, deadline: float) -> bool:
        written = asyncio.get_running_loop().create_future()
        self.output.when_empty(lambda: written.done() or written.set_result(None))
        try:
            async with asyncio.timeout_at(deadline):
                await written
        except TimeoutError:
            return False
        return True
