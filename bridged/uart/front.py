"""The UART front: the only process touching the serial port.

Theory of operation.  Bytes from the port go into the sans-I/O parser; its
events drive the session:

* command lines are echoed (ATE1), dispatched to their handler, and answered
  through ``Output`` (whole items only, so answers and unsolicited messages
  never interleave inside a line);
* a handler that returns a coroutine (it waits on the network) makes the
  session *busy*: input that arrives meanwhile is discarded with one
  ``busy p...`` per chunk, as ESP-AT does;
* after a ``>`` prompt the parser's data machine hands out payload
  (``uart.sending.Send`` gathers AT+CIPSEND/CIPSENDEX, streams AT+CIPSENDL
  and passthrough into the link's uplink ring); when the ring is full the
  front stops reading the port (the tty buffer fills, RTS drops).  ``SEND OK``
  is sent once every byte of the send is admitted into the ring (the ring and
  the socket buffer are the "protocol stack" ESP-AT's SEND OK refers to); the
  worker's space doorbell is asked for only while a send waits for room.

Downlink records from the workers become ``+IPD`` frames (or raw bytes in
passthrough, or passive-mode notices); while the UART output is backed up
the front leaves them in the rings, so the workers stop reading their
sockets.  Commands stop being read too while the output is backlogged (ESP-AT's
AT task blocks on a full UART), and while an answer's after-action waits: a
host that writes and never reads fills the tty buffer, not our memory.  Data
phases are not held: their payload makes no output, and their peer's bytes
wait in the rings.

A serial device that hangs up (EOF or EIO on a read, a failed write) is
waited for and reopened (``uart.replug``); meanwhile the session stands
still, output held as when the UART is backed up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import signal
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable

import structlog

from bridged.at import format as fmt
from bridged.at.errors import AtError
from bridged.at.parser import (
    NEED_DATA,
    BadLine,
    CommandLine,
    DataChunk,
    DataComplete,
    DataEscaped,
    LineTooLong,
    Parser,
)
from bridged.at.datamode import DataKind
from bridged.commands import registry
from bridged.commands.context import ConnectSpec, Context, SessionState, UartSettings
from bridged.commands.dns import lookup_servers
from bridged.commands.sntp import tls_time
from bridged.commands.registry import Reply, SendRequest
from bridged.commands.passthrough import saved_link
from bridged.commands.tcpip import connected_message
from bridged.commands.wifi import autoconnect_messages
from bridged.config import Config
from bridged.ipc import records
from bridged.ipc.control import ControlError, recv_message, send_message, socket_from_fd
from bridged.ipc.messages import FrontReady, Ping, PortFailed, Pong, Shutdown, WorkerStarted
from bridged.net.localaddr import link_policy
from bridged.net.mdns import Advertiser
from bridged.net.sntp_client import SntpClient
from bridged.ops.status import UartCounters
from bridged.readgate import ReadGate
from bridged.store import Store
from bridged.uart.boot import Boot, Reset
from bridged.uart.links import LinkTable, Slot
from bridged.uart.output import Output
from bridged.uart.port import FLOW_NAMES, PARITY_NAMES, SerialPort, drain
from bridged.uart.replug import Replug
from bridged.uart.sending import Send
from bridged.uart.server import Server
from bridged.uart.transcript import MarkKind, Transcript

__all__ = ["Front", "factory_uart"]

log = structlog.get_logger()

_OUTPUT_HIGH = 32768  # stop delivering +IPD above this many queued bytes
_READ_SIZE = 65536
_FORCE_RESTART = b"AT+RST\r\n"
_COALESCE = 0.004  # seconds between reads of a data phase streaming at UART speed
_COALESCE_MIN = 512  # bytes: smaller reads are interactive
_COALESCE_RATE = 2_000_000  # bytes/s: faster input is read at once
_COALESCE_FULL = 3072  # bytes: a read this big (a tty buffer is 4 KiB) is not paused after
_ROOM_POLL = 0.05  # seconds between looks at a full uplink ring while a send waits for room
_RECORD_ROOM = 32  # bytes of uplink room too few to resume for (a datagram's record header)
_RECV_LINGER = 0.002  # seconds "Recv <n> bytes" may wait to share a write with its SEND OK
_BACKLOG = "output backlog"  # read-gate holds: the UART output is above its high-water mark
_AFTER = "after-action"  # ... an answer's after-action waits for the output to drain
_GONE = (errno.EIO, errno.ENXIO, errno.ENODEV)  # a read saying the device went away


def factory_uart(config: Config) -> UartSettings:
    u = config.uart
    stop = {1: 1, 2: 3}[u.stop_bits]
    return UartSettings(u.baud, u.data_bits, stop, PARITY_NAMES[u.parity], FLOW_NAMES[u.flow_control])


@dataclass
class _Passthrough:
    link_id: int
    spec: ConnectSpec | None  # to reconnect a client link
    server: bool  # a server's client: wait for the next one instead
    reconnecting: asyncio.Task | None = None


class Front:
    tap: Transcript | None = None  # set while the AT transcript is on

    def __init__(
        self,
        config: Config,
        fd: int,
        port_name: str,
        store: Store,
        slots: list[Slot],
        supervisor: socket.socket | None,
        apply_port=None,
        serial: SerialPort | None = None,  # a real port (not a pty): reopened when it returns
    ) -> None:
        self.config = config
        self.fd = fd
        self.port_name = port_name
        self.store = store
        self.supervisor = supervisor
        self._apply_port = apply_port
        self.loop = asyncio.get_running_loop()
        self.parser = Parser(config.uart.max_line)
        self.output = Output(fd, config.uart.urc_gap_ms / 1000, self._on_output_drained,
                             on_eased=self._on_output_eased,
                             on_failed=self._on_write_failed if serial is not None else None)
        self._serial = serial
        self._replug = Replug(serial, self._port_back) if serial is not None else None
        self.links = LinkTable(
            slots, self._on_link_data, self._on_link_closed, self._can_deliver,
            self._on_link_notice, self._on_link_ended, config.links.recv_window,
            on_accepted=self._on_link_accepted, on_freed=lambda slot: self.server.update(),
        )
        links = config.links
        self.server = Server(self.links, link_policy(links.allow, links.deny, links.local_ports))
        self.mdns = Advertiser()
        self.sntp = SntpClient()  # its device clock is the ESP's RTC: kept across AT+RST
        self.uart = self._boot_uart()
        self.ctx = self._new_context()
        self.boot: Boot | None = None  # the chip is (re)booting: input is dropped, nothing is said
        self.busy = False  # a command waits on the network: input gets busy p...
        self.holding = False  # an answer's after-action is pending: input waits
        self.sending: Send | None = None
        self._room_slot: Slot | None = None  # the link whose uplink ring the send waits room in
        self._room_poll: asyncio.TimerHandle | None = None
        self.passthrough: _Passthrough | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # its deadline (for a past one uvloop returns a Handle without when())
        self._timer_fired_at = 0.0  # the deadline of the data-phase timer that last fired
        self._command: asyncio.Task | None = None  # a handler waiting on the network
        # The port, paused often (coalescing, back-pressure); holding it drives RTS (flow control rts).
        self._gate = ReadGate(self.loop, self._on_readable, serial.hold_input if serial is not None else None)
        self._last_read = 0.0
        self._stopped = self.loop.create_future()
        self.port_lost: str | None = None  # why the port went away while we served
        self.transcript = Transcript(config.log, holders=(self, self.output, self.links))
        self.counters = UartCounters()  # for `bridged status` (bridged.ops.status)
        self.on_ping: Callable[[Ping], str] = lambda msg: ""  # the summary for the supervisor's Pong

    # -- lifetime ----------------------------------------------------------------------

    async def run(self) -> None:
        self.loop.add_signal_handler(signal.SIGTERM, self.stop)  # SIGINT: the supervisor's
        if self.supervisor is not None:
            self.supervisor.setblocking(False)
            self.loop.add_reader(self.supervisor.fileno(), self._on_supervisor)
        await self._wait_workers(timeout=10.0)
        for slot in self.links.slots:
            slot.uplink.want_space_doorbell(False)  # asked for only while a send waits for room
        self._start_boot(Reset.POWER_ON)
        self._resume_reading()
        try:
            await self._stopped
        finally:
            if self._replug is not None:
                self._replug.close()
            self.sntp.stop()
            if self.boot is not None:
                self.boot.cancel()
            await self.mdns.close()  # goodbye packets before the process ends
            self._gate.close()
            self.output.close()
            self.transcript.close()

    def stop(self) -> None:
        if not self._stopped.done():
            log.info("front_stopping")
            self._stopped.set_result(None)

    async def _wait_workers(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not all(self.links.is_ready(i) for i in range(self.links.count)):
                await asyncio.sleep(0.005)

    def _tell_supervisor(self, msg: object) -> None:
        if self.supervisor is None:
            return
        try:
            send_message(self.supervisor, msg)
        except (BlockingIOError, OSError) as exc:
            log.warning("supervisor_unreachable", error=str(exc))

    def _on_supervisor(self) -> None:
        try:
            received = recv_message(self.supervisor)
        except BlockingIOError:
            return
        except ControlError as exc:
            log.error("control_message_refused", error=str(exc))
            return
        if received is None:
            log.error("supervisor_gone")
            self.stop()
            return
        msg, fds = received
        if isinstance(msg, WorkerStarted) and len(fds) == 1 and 0 <= msg.link_id < self.links.count:
            try:  # the front end of the new worker's control socketpair
                control = socket_from_fd(fds[0], (socket.AF_UNIX,), socket.SOCK_SEQPACKET)
            except ControlError as exc:
                log.error("control_message_refused", link_id=msg.link_id, error=str(exc))
                return
            self.links.attach(msg.link_id, control)
        elif isinstance(msg, Ping):  # bridged.liveness: we answer, so we are not stuck
            self._tell_supervisor(Pong(msg.seq, self.on_ping(msg)))
        elif isinstance(msg, Shutdown):
            self.stop()
        else:
            for fd in fds:
                os.close(fd)

    # -- boot and restart (AT+RST, AT+RESTORE) ----------------------------------------------

    def _boot_uart(self) -> UartSettings:
        stored = self.store.get("uart_def")
        return UartSettings(*stored) if stored else factory_uart(self.config)

    def _new_context(self) -> Context:
        state = SessionState()
        state.load_persisted(self.store)
        ctx = Context(self.config, state, self.store, self.links, self.output.urc,
                      self._restart, self._apply_uart, self.uart, self.server,
                      mdns=self.mdns, sntp=self.sntp, answer_part=self.output.reply)
        ctx.extra["uart_factory"] = factory_uart(self.config)
        for link_id in range(self.links.count):
            linger, nodelay, _sndtimeo, keep_alive = state.tcpopts[link_id]
            self.links.set_options(link_id, linger, nodelay, keep_alive)
        return ctx

    def _start_boot(self, reset: Reset, dropped: int = 0) -> None:
        """Silence for [firmware] boot_ms after what is queued has gone out, then ready."""
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
        )

    def _restart_port(self) -> UartSettings:
        """The chip comes back with AT+UART_DEF's settings (AT+UART_CUR's are lost)."""
        new_uart = self._boot_uart()
        if new_uart != self.uart:
            self._apply_uart(new_uart)
        return self.uart

    def _ready(self) -> None:
        self.boot = None
        self.output.reply(fmt.READY)
        log.info("ready", port=self.port_name)
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
        state.tcpopts[0][3] = keep_alive
        self.links.set_options(0, state.tcpopts[0][0], state.tcpopts[0][1], keep_alive)
        log.info("passthrough_at_boot", type=spec.type, host=spec.host, port=spec.port)
        self.output.reply(fmt.BOOT_PROMPT)
        self._start_send(SendRequest(0, 0, kind=DataKind.PASSTHROUGH))
        self.passthrough.spec = spec
        self.passthrough.reconnecting = self.loop.create_task(self._reconnect(self.passthrough, first_delay=0.0))

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
        if self.server.running:
            self.server.stop()
        self.server.max_conn, self.server.timeout = self.links.count, 0
        self.mdns.stop_soon()  # its goodbyes go out while the ESP "reboots"
        self.sntp.stop()  # AT+CIPSNTPCFG was RAM; the clock stays
        self.links.drop_all()
        for link_id in range(self.links.count):
            self.links.set_passive(link_id, False)
        if factory:
            self.store.clear()
        self.ctx = self._new_context()
        dropped += self.parser.buffered  # what came behind AT+RST is lost with the session
        self.parser = Parser(self.config.uart.max_line)
        self.sending = None
        self._stop_waiting_room()
        self.passthrough = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._start_boot(Reset.SOFTWARE, dropped)
        self._resume_reading()  # to drop what comes during the boot

    def _apply_uart(self, settings: UartSettings) -> None:
        self.uart = settings
        self.ctx.uart = settings
        if self._apply_port is not None:
            self._apply_port(settings)
        log.info("uart_configured", settings=settings.fields())

    # -- reading the port -----------------------------------------------------------------

    def _resume_reading(self) -> None:
        if self._replug is not None and self._replug.away:
            return  # the device is gone: reading resumes when it is back
        self._gate.open(self.fd)

    def _pause_reading(self) -> None:
        self._gate.shut()

    def _on_readable(self) -> None:
        if self.holding:
            # Left in the port until the after-action ran: held behind output the MCU
            # does not read, input would pile up here without bound.
            self._pause_reading()
            return
        if self._backlogged():
            return
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in _GONE and self._replug is not None:
                self._hung_up(exc.strerror)
                return
            log.error("uart_read_failed", error=str(exc))
            self._pause_reading()
            self.loop.call_later(0.5, self._resume_reading)
            return
        if not data:
            self._hung_up("hung up (unplugged?)")
            return
        if self._serial is not None:
            self._serial.after_read(len(data))
        if self.tap is not None:
            self.tap.received(data)
        if self.boot is not None:
            self.boot.drop(len(data))
            return
        self.counters.rx_bytes += len(data)
        if self.busy:
            self._refuse_busy(data)
            return
        now = self.loop.time()
        self.parser.receive_bytes(data, now)
        self._process()
        self._coalesce(len(data), now)

    def _hung_up(self, why: str) -> None:
        """The device went away (a read gave EOF, as a tty does only once hung
        up, or EIO; a write EIO): stop reading and writing, keep the session,
        and reopen the device when it returns (bridged.uart.replug)."""
        self._pause_reading()  # it stays readable: EOF again and again
        if self._replug is not None:
            self.output.suspend()
            self._replug.lost(why)
            return
        # The pty's master never hangs up (we hold its slave): if it did, a new front makes a new one.
        self.port_lost = f"{self.port_name} {why}; plug the device in or choose another --port"
        self._tell_supervisor(PortFailed(self.port_lost))
        self.stop()

    def _on_write_failed(self, exc: OSError) -> None:
        # EIO, as a hung-up tty says; anything else too leaves a port we
        # cannot write to: reopened, it gets a fresh start.
        self._hung_up(exc.strerror or str(exc))

    def _port_back(self, fd: int) -> None:
        """The device is back, reopened with the settings in force: carry on."""
        self.fd = fd
        self.output.resume(fd)
        self._resume_reading()
        self._process()

    def _coalesce(self, size: int, now: float) -> None:
        """While the MCU streams a data phase at UART speed, read every few ms.

        At 0.5 MB/s (5 Mbaud) an MCU writing 1 KiB pieces would wake us 500
        times a second; the kernel can gather a few ms of them instead.  Only
        for a steady stream at UART rates: commands, +++ and interactive bytes
        (small reads) and faster bulk input (a pty, or catching up) are read
        at once.  A byte's arrival time may read up to _COALESCE late, so +++
        after streamed data may need up to 24 ms of silence instead of 20.
        """
        interval, self._last_read = now - self._last_read, now
        uart_rate = interval > 0 and size / interval < _COALESCE_RATE
        # A read that nearly filled the tty buffer means the MCU is waiting on us.
        if (_COALESCE_MIN <= size < _COALESCE_FULL and interval < 2 * _COALESCE and uart_rate
                and self._gate.is_open and self.parser.data is not None):
            self._gate.shut(hold=False)  # a pause, not back-pressure: RTS stays up
            self.loop.call_later(_COALESCE, self._resume_reading)

    def _refuse_busy(self, data: bytes) -> None:
        """Input while a command runs is discarded, one busy p... per chunk."""
        if _FORCE_RESTART in data:
            self.output.reply(fmt.FORCE_RESTART)
            self.busy = False
            rest = len(data) - data.index(_FORCE_RESTART) - len(_FORCE_RESTART)
            self._restart(False, dropped=rest)
            return
        log.info("busy_refused", bytes=len(data))
        if self.ctx.state.syslog:
            self.output.reply(fmt.err_code(0x010B0000))
        self.output.reply(fmt.BUSY)

    # -- the session -------------------------------------------------------------------------

    def _process(self) -> None:
        """Handle parser events until it needs data, or the session is busy."""
        while not (self.busy or self.holding):
            if self.parser.in_data_mode:
                if not self._process_data():
                    return
                continue
            if self._backlogged():
                return  # the rest waits in the parser: at most one read
            event = self.parser.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, CommandLine):
                self._echo(event.raw)
                self._execute(event)
            elif isinstance(event, BadLine):
                self._echo(event.raw)
                structlog.contextvars.bind_contextvars(command=event.name)
                self._log_error("bad_line", event.name, event.error)
                self._error(event.error)
            elif isinstance(event, LineTooLong):
                log.info("line_too_long", length=event.length, limit=self.config.uart.max_line)
                self._error(AtError(f"command line longer than {self.config.uart.max_line} bytes"))

    def _echo(self, raw: bytes) -> None:
        if self.ctx.state.echo:
            self.output.reply(raw)

    def _error(self, error: AtError) -> None:
        if error.body:
            self.output.reply(error.body)
        if self.ctx.state.syslog:
            self.output.reply(fmt.err_code(error.code))
        self.output.reply(fmt.ERROR)

    def _execute(self, line: CommandLine) -> None:
        structlog.contextvars.bind_contextvars(command=line.name)
        if self.tap is not None:
            self.tap.mark(MarkKind.COMMAND, name="AT" + line.name, kind=line.kind.name.lower())
        try:
            result = registry.dispatch(self.ctx, line)
        except AtError as error:
            self._log_error("command_error", line.name, error)
            self._error(error)
            return
        if isinstance(result, Reply):
            self._answer(result)
            return
        self.busy = True
        if self.parser.buffered:
            self._refuse_busy(self.parser.discard_pending())
            if self.boot is not None:  # an AT+RST behind it forced a restart: the command goes too
                if asyncio.iscoroutine(result):
                    result.close()
                return
        self._command = self.loop.create_task(self._await_reply(result, line.name))

    @staticmethod
    def _log_error(event: str, name: str, error: AtError) -> None:
        """Why a line failed; the offending parameter only if it cannot be a secret."""
        if error.value and not registry.carries_secret(name):
            log.info(event, why=error.why, value=error.value)
        else:
            log.info(event, why=error.why)

    async def _await_reply(self, pending: Awaitable[Reply], name: str) -> None:
        try:
            reply = await pending
        except AtError as error:
            self._log_error("command_error", name, error)
            self._error(error)
            reply = None
        except Exception:
            # Our bug, not the host's: answer ERROR so the MCU never hangs.
            log.exception("command_crashed")
            self._error(AtError("internal error"))
            reply = None
        self._command = None
        self.busy = False
        if reply is not None:
            self._answer(reply)
        self._process()

    def _answer(self, reply: Reply) -> None:
        self.output.reply(reply.body)
        self.output.reply(reply.final)
        if reply.then is not None:
            reply.then()
        if reply.send is not None:
            self._start_send(reply.send)
        if reply.after is not None:
            # Input that comes meanwhile is held (not read), not refused: the action
            # is immediate, only ordered after the answer (a baud change, a restart).
            self.holding = True
            self._gate.hold(_AFTER)
            self.output.when_empty(lambda: self._run_after(reply.after))

    def _run_after(self, action) -> None:
        self.holding = False
        self._gate.release(_AFTER)
        action()
        self._resume_reading()
        self._process()

    # -- data phases: AT+CIPSEND, CIPSENDEX, CIPSENDL, passthrough ---------------------------

    def _start_send(self, request: SendRequest) -> None:
        slot = self.links.slots[request.link_id]
        self.links.touch(request.link_id)
        state = self.ctx.state
        report, transmit = state.sendl_cfg
        self.sending = Send(slot, request.kind, request.length, request.remote, report)
        if self.tap is not None:
            self.tap.mark(MarkKind.DATA_START, link=request.link_id, length=request.length,
                          kind=request.kind.name.lower())
        chunk = transmit if request.kind is DataKind.SENDL else self.config.links.chunk
        self.parser.start_data(request.kind, request.length, self.loop.time(), chunk, state.transintvl / 1000)
        if request.kind is DataKind.PASSTHROUGH:
            self.passthrough = _Passthrough(request.link_id, slot.spec, slot.server)

    def _process_data(self) -> bool:
        """Move payload towards the uplink ring; False when we must wait."""
        send = self.sending
        room = send.room()
        # uvloop's clock ticks in whole ms: when the timer fires the clock may
        # read a hair before its deadline, which would re-arm it at once.
        now = max(self.loop.time(), self._timer_fired_at)
        event = self.parser.next_event(limit=room, now=now)
        if isinstance(event, DataChunk):
            send.take(event.data)
            self._report_progress()
        elif isinstance(event, DataComplete):
            self._payload_complete(event.length)
        elif isinstance(event, DataEscaped):
            self._payload_escaped()
        else:  # NEED_DATA
            if room == 0:
                self._wait_room(send.slot)  # reading resumes when the worker makes room
            self._arm_timer()
            return False
        return True

    def _arm_timer(self) -> None:
        """One timer for the data phase: the +++ guard time and AT+TRANSINTVL."""
        deadline = self.parser.deadline()
        if self._timer is not None:
            if deadline is not None and self._timer_at == deadline:
                return  # already set for that time
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer_fired_at = self._timer_at
        self._timer = None
        self._process()

    def _payload_complete(self, length: int) -> None:
        if self.parser.buffered:  # more than <length> bytes: ESP-AT says busy
            self._refuse_busy(self.parser.discard_pending())
            if self.boot is not None:  # ... and an AT+RST among them restarted the chip
                return
        send = self.sending
        if self.tap is not None:
            self.tap.mark(MarkKind.DATA_END, link=send.slot.link_id, length=length)
        if send.kind is not DataKind.SENDL:
            # Its SEND OK usually follows within a fraction of a ms: one write for both.
            self.output.reply(fmt.recv_bytes(length), linger=_RECV_LINGER)
        send.payload_done()
        self.busy = True
        self._check_send()
        timeout_ms = self.ctx.state.tcpopts[send.slot.link_id][2]
        if timeout_ms and self.sending is send:
            # AT+CIPTCPOPT so_sndtimeo: a send the ring cannot admit ends within it.
            self.loop.call_later(timeout_ms / 1000, self._send_timed_out, send)

    def _payload_escaped(self) -> None:
        send, self.sending = self.sending, None
        if self.tap is not None:
            self.tap.mark(MarkKind.DATA_END, link=send.slot.link_id, escaped=True)
        self._stop_waiting_room()
        if send.kind is DataKind.PASSTHROUGH:
            log.info("passthrough_left", link_id=send.slot.link_id)
            self.passthrough = None
            if self.ctx.state.sysmsg & 1:
                self.output.reply(fmt.QUITT)
            return
        log.info("send_cancelled", link_id=send.slot.link_id)
        self.output.reply(fmt.SEND_CANCELLED if send.kind is DataKind.SENDL else fmt.SEND_CANCELED)

    def _send_timed_out(self, send: Send) -> None:
        if self.sending is not send:
            return
        log.info("send_timed_out", link_id=send.slot.link_id)
        if send.queued:  # the part admitted is dropped with it: SEND FAIL sent nothing
            self.links.discard(send.slot.link_id, send.start + send.queued)
        self._finish_send(fmt.SEND_FAIL)

    def _wait_room(self, slot: Slot) -> None:
        """The send waits for room in ``slot``'s uplink ring: stop reading, hear the worker.

        The worker rings the space doorbell only while we ask for it (the
        ring's quiet flag), so it costs nothing when nobody waits.  The flag
        and the read index are plain stores in two processes: after asking,
        look again, and keep looking on a timer while waiting (as the worker
        does for its downlink).
        """
        self.counters.flow_pauses += 1
        self._pause_reading()
        if self._room_slot is slot:
            return
        self._stop_waiting_room()
        self._room_slot = slot
        slot.uplink.want_space_doorbell(True)
        slot.uplink.clear_space_doorbell()
        self.loop.add_reader(slot.uplink.space_fd, self._on_room)
        self._poll_room()

    def _poll_room(self) -> None:
        self._room_poll = None
        if self._room_slot is None:
            return
        if self._room_slot.uplink.free() > _RECORD_ROOM:
            self.loop.call_soon(self._on_room)
        else:
            self._room_poll = self.loop.call_later(_ROOM_POLL, self._poll_room)

    def _stop_waiting_room(self) -> None:
        slot, self._room_slot = self._room_slot, None
        if slot is None:
            return
        self.loop.remove_reader(slot.uplink.space_fd)
        slot.uplink.want_space_doorbell(False)
        if self._room_poll is not None:
            self._room_poll.cancel()
            self._room_poll = None

    def _on_room(self) -> None:
        slot = self._room_slot
        if slot is None:
            return
        slot.uplink.clear_space_doorbell()
        if slot.uplink.free() <= _RECORD_ROOM and self._send_waits_on(slot):
            return  # a doorbell for a sliver of room: wait for more
        self._stop_waiting_room()
        send = self.sending
        if send is None or send.slot is not slot:
            self._resume_reading()
            return
        if send.complete:
            self._check_send()
        else:
            self._resume_reading()
            self._process()

    def _send_waits_on(self, slot: Slot) -> bool:
        send = self.sending
        return send is not None and send.slot is slot and send.alive()

    def _report_progress(self) -> None:
        send = self.sending
        if send is not None and send.kind is DataKind.SENDL:
            data = self.parser.data
            self.output.reply(send.progress(data.received if data is not None else send.length))

    def _check_send(self) -> None:
        """Settle a complete send: SEND OK once all of it is admitted, SEND FAIL if its link went first."""
        send = self.sending
        if send is None or not send.complete:
            return
        send.pump()
        self._report_progress()
        result = send.result()
        if result is not None:
            self._finish_send(result)
        elif send.waiting:
            self._wait_room(send.slot)

    def _finish_send(self, result: bytes) -> None:
        self.sending = None
        self._stop_waiting_room()
        self.output.reply(result)
        self.busy = False
        self._resume_reading()
        self._process()

    # -- passthrough: a dropped link comes back --------------------------------------------------

    def _passthrough_lost(self, slot: Slot) -> None:
        """As a client, ESP-AT stays in passthrough and reconnects every AT+CIPRECONNINTV."""
        pt = self.passthrough
        if pt is None or pt.link_id != slot.link_id or pt.spec is None or pt.server:
            return
        if pt.reconnecting is None:
            pt.reconnecting = self.loop.create_task(self._reconnect(pt))

    async def _reconnect(self, pt: "_Passthrough", first_delay: float | None = None) -> None:
        delay = self.ctx.state.reconnintv / 10 if first_delay is None else first_delay
        while self.passthrough is pt:
            await asyncio.sleep(delay)
            delay = self.ctx.state.reconnintv / 10
            if self.passthrough is not pt or self.links.is_busy(pt.link_id):
                break
            # Each attempt resolves again, through the servers AT+CIPDNS holds now.
            spec = dataclasses.replace(pt.spec, dns_servers=lookup_servers(self.ctx),
                                       tls_time=tls_time(self.ctx) if pt.spec.tls_time is not None else None)
            try:
                await self.links.connect(pt.link_id, spec)
            except AtError as exc:
                log.info("passthrough_reconnect_failed", link_id=pt.link_id, why=exc.why)
                continue
            log.info("passthrough_reconnected", link_id=pt.link_id)
            self._passthrough_resume(self.links.slots[pt.link_id])
            break
        pt.reconnecting = None

    def _passthrough_resume(self, slot: Slot) -> None:
        """The passthrough link is back (reconnected, or a new server client)."""
        if self.sending is not None and self.sending.kind is DataKind.PASSTHROUGH:
            self.sending = Send(slot, DataKind.PASSTHROUGH, 0)
            if self.ctx.state.sysmsg & 4:
                self.output.urc(connected_message(self.ctx, slot.view))
            self._resume_reading()
            self._process()

    # -- downlink ---------------------------------------------------------------------------------

    def _can_deliver(self) -> bool:
        return self.output.buffered < _OUTPUT_HIGH

    def _on_output_drained(self) -> None:
        self.links.drain_deferred()

    def _backlogged(self) -> bool:
        """Hold commands while the output is backlogged; a data phase goes on."""
        if self.output.backlogged and not self.parser.in_data_mode:
            self._gate.hold(_BACKLOG)
            return True
        return False

    def _on_output_eased(self) -> None:
        self._gate.release(_BACKLOG)
        self._process()

    def _in_passthrough(self) -> bool:
        return self.sending is not None and self.sending.kind is DataKind.PASSTHROUGH

    def _status_shown(self) -> bool:
        """CONNECT/CLOSED during passthrough only with AT+SYSMSG bit 2."""
        return not self._in_passthrough() or bool(self.ctx.state.sysmsg & 4)

    def _on_link_data(self, slot: Slot, record: records.Record) -> None:
        if self.ctx.state.cipmode == 1:
            # Passthrough (receiving) mode: the peer's bytes go out raw, no +IPD.
            self.output.urc(record.payload)
            return
        # A reply can only come after the send it answers was handed to the
        # socket: settle a finished send first so SEND OK precedes its +IPD.
        self._check_send()
        remote = None
        if self.ctx.state.cipdinfo and slot.view is not None:
            remote = record.addr or (slot.view.remote_ip, slot.view.remote_port)
        link = self.ctx.link_arg(slot.link_id)
        payload = record.payload
        # At most <chunk> bytes per +IPD (2920 on ESP-AT); a datagram stays whole.
        step = len(payload) if record.addr is not None else self.config.links.chunk
        for i in range(0, len(payload), step or 1):
            piece = payload[i : i + step]
            if self.tap is not None:
                self.tap.mark(MarkKind.IPD, link=slot.link_id, length=len(piece))
            self.output.urc(fmt.ipd_active(link, len(piece), remote) + piece)
            slot.ipd += 1

    def _on_link_accepted(self, slot: Slot) -> None:
        self.ctx.state.had_link = True
        pt = self.passthrough
        if pt is not None and pt.server:
            pt.link_id = slot.link_id
            self._passthrough_resume(slot)
        elif self._status_shown():
            self.output.urc(connected_message(self.ctx, slot.view))

    def _on_link_notice(self, slot: Slot, length: Callable[[], int]) -> None:
        # SEND OK before the notice of data that may answer it, as for +IPD.
        self._check_send()
        link = self.ctx.link_arg(slot.link_id)
        slot.ipd += 1

        def notice() -> bytes:
            # Made when written, with what is unread then; nothing if nothing is.
            n = length()
            if not n:
                return b""
            if self.tap is not None:
                self.tap.mark(MarkKind.IPD, link=slot.link_id, length=n, passive=True)
            return fmt.ipd_passive(link, n)

        self.output.urc(notice)

    def _on_link_ended(self, slot: Slot) -> None:
        if self.sending is not None and self.sending.slot is slot:
            self._on_link_closed_send(slot)

    def _on_link_closed_send(self, slot: Slot) -> None:
        if self.sending.complete:
            self._check_send()
        else:
            self._stop_waiting_room()
            self._resume_reading()  # the rest of the payload is read and dropped

    def _on_link_closed(self, slot: Slot, reason: str) -> None:
        log.info("link_lost", link_id=slot.link_id, reason=reason)
        # A send in progress on this link ends first (SEND FAIL), then CLOSED.
        if self.sending is not None and self.sending.slot is slot:
            self._on_link_closed_send(slot)
        if self._status_shown():
            self.output.urc(fmt.closed(self.ctx.link_arg(slot.link_id)))
        if self._in_passthrough():
            self._passthrough_lost(slot)
