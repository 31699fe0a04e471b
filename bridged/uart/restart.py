"""The emulated chip's (re)boot, as the front sees it (a part of ``Front``).

Theory of operation.  AT+RST, AT+RESTORE (factory), an update and a forced
restart reset the session (``_restart``): the running command and what it
left running are cancelled, the links closed unheard (no CLOSED: the chip
restarts), the parser, a data phase and what +++ left dropped.  Then the
boot (``uart.boot``): silence, the port back at AT+UART_DEF's settings
(AT+UART_CUR's are lost), the restart's links ended (within _DROP_WAIT),
and ready, with what a chip says after it (Wi-Fi autoconnect, the
AT+SAVETRANSLINK passthrough).  The front's first boot takes the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses

import structlog

from bridged.at import format as fmt
from bridged.at.datamode import DataKind
from bridged.at.parser import Parser
from bridged.at.session import Ready, Restart
from bridged.commands.context import ConnectSpec, Context, SessionState, UartSettings
from bridged.commands.passthrough import saved_link
from bridged.commands.registry import SendRequest
from bridged.commands.wifi import autoconnect_messages
from bridged.config import Config
from bridged.ipc.messages import FrontReady
from bridged.uart.boot import Boot, Reset
from bridged.uart.dispatch import forget_command
from bridged.uart.pacing import line_of
from bridged.uart.port import FLOW_NAMES, PARITY_NAMES, drain
from bridged.uart.transcript import MarkKind

__all__ = ["BootAndRestart", "factory_uart"]

_DROP_WAIT = 2.0  # seconds a restart's boot waits for its links' workers to end them

log = structlog.get_logger()


def factory_uart(config: Config) -> UartSettings:
    u = config.uart
    stop = {1: 1, 2: 3}[u.stop_bits]
    return UartSettings(u.baud, u.data_bits, stop, PARITY_NAMES[u.parity], FLOW_NAMES[u.flow_control])


class BootAndRestart:
    """Boot, ready and restart; a part of ``bridged.uart.front.Front``."""

    def _boot_uart(self) -> UartSettings:
        stored = self.store.get("uart_def")
        return UartSettings(*stored) if stored else factory_uart(self.config)

    def _new_context(self) -> Context:
        state = SessionState()
        state.load_persisted(self.store)
        ctx = Context(self.config, state, self.store, self.links, self.output.urc,
                      self._restart, self._apply_uart, self.uart, factory_uart(self.config), self.tasks.spawn,
                      self.server,
                      mdns=self.mdns, sntp=self.sntp, answer_part=self.output.reply)
        ctx.faults = self.faults
        ctx.silence_links = self._silence_links
        ctx.before_close = self._before_close
        for link_id in range(self.links.count):
            opts = state.tcpopts[link_id]
            self.links.set_options(link_id, opts.so_linger, opts.tcp_nodelay, opts.keep_alive)
        return ctx

    def _start_boot(self, reset: Reset, dropped: int = 0) -> None:
        """Silence for [firmware] boot_ms after what is queued has gone out, then ready."""
        self.session.handle(Restart(), self.loop.time())
        if self.tap is not None:
            self.tap.mark(MarkKind.BOOT)
        if self.boot is not None:  # not today (a booting chip hears no AT+RST), but one boot at a time
            self.boot.cancel()
            dropped += self.boot.dropped
        self.boot = Boot(self.config.firmware, self.output, reset, dropped)
        self.boot.start(
            drain_port=lambda deadline: drain(self.fd, deadline),
            restart_port=self._restart_port,
            on_ready=self._ready,
            on_failed=self.stop,
            spawn=self.tasks.spawn,
            settle=self._links_dropped,
        )

    async def _links_dropped(self) -> None:
        """Before ready: the restart's links are ended (a host's AT+CIPMUX=1 or AT+CIPSTART
        right after ready must not find one still closing), within _DROP_WAIT."""
        try:
            async with asyncio.timeout(_DROP_WAIT):
                while self.links.dropping():
                    self._dropped = self.loop.create_future()
                    await self._dropped
        except TimeoutError:
            log.warning("restart_links_slow", hint="a link worker did not end its connection in time")
        finally:
            self._dropped = None

    def _restart_port(self) -> UartSettings:
        """The chip comes back with AT+UART_DEF's settings (AT+UART_CUR's are lost)."""
        new_uart = self._boot_uart()
        if new_uart != self.uart:
            self._apply_uart(new_uart)
        return self.uart

    def _ready(self) -> None:
        self.boot = None
        self.session.handle(Ready(), self.loop.time())
        self.output.reply(fmt.READY)
        log.info("ready", port=self.port_name)
        if not self._said_ready:
            # The supervisor needs it once per front (READY=1, the failure count): an AT+RST's boot is no news.
            self._said_ready = True
            self._tell_supervisor(FrontReady(self.port_name))
        messages = autoconnect_messages(self.ctx)
        if messages:
            self.output.urc(messages)
        saved = saved_link(self.ctx)
        if saved is not None:
            self._boot_passthrough(*saved)

    def _boot_passthrough(self, spec: ConnectSpec, keep_alive: int) -> None:
        """AT+SAVETRANSLINK: connect by ourselves and enter passthrough."""
        state = self.ctx.state
        state.cipmode, state.cipmux = 1, 0
        opts = state.tcpopts[0] = dataclasses.replace(state.tcpopts[0], keep_alive=keep_alive)
        self.links.set_options(0, opts.so_linger, opts.tcp_nodelay, opts.keep_alive)
        log.info("passthrough_at_boot", type=spec.type, host=spec.host, port=spec.port)
        self.output.reply(fmt.BOOT_PROMPT)
        self._start_send(SendRequest(0, 0, kind=DataKind.PASSTHROUGH))
        # A client's passthrough, whatever the slot held before the reset (a server's client).
        self.passthrough.spec, self.passthrough.server = spec, False
        self.passthrough.reconnecting = self.tasks.spawn(self._reconnect(self.passthrough, first_delay=0.0))

    def _restart(self, factory: bool, dropped: int = 0) -> None:
        """AT+RST, AT+RESTORE (factory), an update, a forced restart: reset the session and boot.

        ``dropped``: input bytes already read that the restarting chip will not hear.
        """
        log.info("restart", factory=factory)
        if self.tap is not None:
            self.tap.mark(MarkKind.RESTART, factory=factory)
        if self._command is not None:
            self._command.cancel()  # a restart abandons the running command
            self._command = None
        for task in self.ctx.background:
            task.cancel()  # ... and what a command left running (a nonblocking AT+CIUPDATE)
        self.server.max_conn, self.server.timeout = self.links.count, 0
        self.mdns.stop_soon()  # its goodbyes go out while the ESP "reboots"
        self.sntp.stop()  # AT+CIPSNTPCFG was RAM; the clock stays
        self._silence_links()
        for link_id in range(self.links.count):
            self.links.set_passive(link_id, False)
        if factory:
            self.store.clear()
        self.ctx = self._new_context()
        dropped += self.parser.buffered  # what came behind AT+RST is lost with the session
        self.parser = Parser(self.config.uart.max_line)
        self._drop_leftovers()
        self.sending = None
        self._stop_waiting_room()
        self._leave_passthrough()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        forget_command()  # the boot and what follows are the new session's, not the command's
        self._start_boot(Reset.SOFTWARE, dropped)
        self._resume_reading()  # to drop what comes during the boot

    def _silence_links(self) -> None:
        """The chip restarts: its links close with no CLOSED, their data and new clients
        are never heard. From a restart's answer on (it waits to be written, the peers
        do not): nothing of the old links may come between OK and ready."""
        if self.server.running:
            self.server.stop()
        self.links.drop_all()

    def _apply_uart(self, settings: UartSettings) -> None:
        self.uart = settings
        self.ctx.uart = settings
        if self._apply_port is not None:
            self._apply_port(settings)
        if self._paced is not None:
            self.output.pacer.set_line(*line_of(settings), self.loop.time())
            self._paced.set_line(settings)
        log.info("uart_configured", settings=settings.fields())
