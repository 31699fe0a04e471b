"""The UART front: the only process touching the serial port.

Theory of operation.  The AT session's state is ``bridged.at.session``'s
machine (booting, command, busy, holding output, data phase, awaiting SEND
OK, passthrough); the front wires it to the event loop, in parts:

* ``uart.reading``: the port, read through a gate; what is done with the
  bytes is the session's ``Input`` for its state;
* ``uart.dispatch``: command lines to handlers, answers through ``Output``
  (whole items only, so answers and unsolicited messages never interleave
  inside a line);
* ``uart.dataphase``: payload into the links' uplink rings; SEND OK once a
  send is admitted into its ring;
* ``uart.roomwait``: a send waiting for room in its ring, the space doorbell
  asked for only meanwhile; so_sndtimeo;
* ``uart.leftovers``: what a +++ left of a stream, into its ring as room comes;
* ``uart.direct``: a plain AT+CIPSEND's payload read straight into its ring;
* ``uart.downlink``: +IPD, passive notices, CONNECT/CLOSED, passthrough
  reconnects;
* ``uart.restart``: boot and restart (AT+RST, AT+RESTORE), AT+UART_CUR applied;
* here: lifetime, the supervisor's messages (what a full channel cannot take
  waits in ``uart.sup_outbox``).

Commands stop being read while the output is backlogged (ESP-AT's AT task
blocks on a full UART), and while an answer's after-action waits: a host
that writes and never reads fills the tty buffer, not our memory.  Data
phases are not held: their payload makes no output, and their peer's bytes
wait in the rings.

A serial device that hangs up (EOF or EIO on a read, a failed write) is
waited for and reopened (``uart.replug``); meanwhile the session stands
still, output held as when the UART is backed up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import Callable

import structlog

from bridged.at.parser import Parser
from bridged.at.session import Session
from bridged.config import Config
from bridged.faults.front import FrontFaults
from bridged.ipc.control import ControlError, recv_message, socket_from_fd
from bridged.ipc.messages import Ping, Pong, Shutdown, WorkerRefused, WorkerStarted
from bridged.net.localaddr import link_policy
from bridged.net.mdns import Advertiser
from bridged.net.sntp_client import SntpClient
from bridged.ops.status import UartCounters
from bridged.readgate import ReadGate
from bridged.store import Store
from bridged.tasks import TaskScope
from bridged.uart.boot import Boot, Reset
from bridged.uart.dataphase import DataPhases
from bridged.uart.direct import SPARE, DirectPayload
from bridged.uart.dispatch import CommandDispatch
from bridged.uart.downlink import Downlink, Passthrough
from bridged.uart.leftovers import Leftovers
from bridged.uart.links import LinkTable, Slot
from bridged.uart.output import Output
from bridged.uart.pacer import Pacer
from bridged.uart.pacing import PacedInput, line_of, wanted
from bridged.uart.port import SerialPort
from bridged.uart.reading import PortReading
from bridged.uart.replug import Replug
from bridged.uart.restart import BootAndRestart
from bridged.uart.roomwait import RoomWait
from bridged.uart.sending import Leftover, Send
from bridged.uart.server import Server
from bridged.uart.sup_outbox import SupervisorOutbox
from bridged.uart.transcript import Transcript

__all__ = ["Front"]

log = structlog.get_logger()


class Front(PortReading, CommandDispatch, DataPhases, RoomWait, Leftovers, DirectPayload, Downlink,
            BootAndRestart):
    tap: Transcript | None = None  # set while the AT transcript is on
    rx_fault = None  # injected input overruns (bridged.faults.uart), only while enabled
    _ticking = False  # the coalescing tick reads the port itself, its pause still held (uart.reading)

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
        self.to_supervisor = SupervisorOutbox(asyncio.get_running_loop(), supervisor)
        self._apply_port = apply_port
        self.loop = asyncio.get_running_loop()
        # Every task the front runs is made in it; run() enters it (bridged.tasks).
        self.tasks = TaskScope()
        self.parser = Parser(config.uart.max_line)
        self.links = LinkTable(slots, self, config.links.recv_window)  # self: its LinkEvents
        self.links.delivery.on_refused = lambda slot, pid: self._tell_supervisor(WorkerRefused(slot.link_id, pid))
        # After every write: deliver what back-pressure held in the rings (straight to it: no hops).
        self.output = Output(fd, config.uart.urc_gap_ms / 1000, self.links.delivery.drain_deferred,
                             on_eased=self._on_output_eased,
                             on_failed=self._on_write_failed if serial is not None else None)
        self._serial = serial
        self._replug = Replug(serial, self._port_back, self.tasks.spawn) if serial is not None else None
        links = config.links
        self.server = Server(self.links, link_policy(links.allow, links.deny, links.local_ports))
        self.server.station = lambda: self.ctx.state  # the Wi-Fi state of the session now
        self.mdns = Advertiser(self.tasks.spawn)
        self.sntp = SntpClient(spawn=self.tasks.spawn)  # its device clock is the ESP's RTC: kept across AT+RST
        self.uart = self._boot_uart()
        self.faults = FrontFaults(self)  # [faults] and `bridged fault` (bridged.faults.front)
        self.ctx = self._new_context()
        self.session = Session()  # the AT session's state (bridged.at.session)
        self.boot: Boot | None = None  # the chip's (re)boot while the session is BOOTING
        self._said_ready = False  # FrontReady went to the supervisor (once per front process)
        self._dropped: asyncio.Future | None = None  # the boot waits for a restart's links to end
        self._init_data_phase()
        self._command: asyncio.Task | None = None  # a handler waiting on the network
        # The port, paused often (coalescing, back-pressure); holding it drives RTS (flow control rts).
        self._gate = ReadGate(self.loop, self._on_readable, serial.hold_input if serial is not None else None)
        self._paced: PacedInput | None = None  # [uart] pace: reads at the line rate (a pty only)
        if wanted(config.uart.pace, port_name, fd, serial is not None):
            self.output.pacer = Pacer(*line_of(self.uart), self.loop.time())
            self._paced = PacedInput(self.loop, self._gate, self.uart)
        self._last_read = 0.0
        self._tick: asyncio.TimerHandle | None = None  # ends the coalescing pauses (uart.reading)
        self._port_paused = False  # the port is paused by coalescing until the tick
        self._down_paused: list[Slot] = []  # ... and these downlinks (uart.downlink)
        self._last_down = 0.0  # when the passthrough downlink last delivered
        self._stopped = self.loop.create_future()
        self.port_lost: str | None = None  # why the port went away while we served
        self.transcript = Transcript(config.log, holders=(self, self.output, self.links))
        self.counters = UartCounters()  # for `bridged status` (bridged.ops.status)
        self.on_ping: Callable[[Ping], str] = lambda msg: ""  # the summary for the supervisor's Pong

    def _init_data_phase(self) -> None:
        """The data phase's state (bridged.uart.dataphase, roomwait, leftovers), none under way."""
        self.sending: Send | None = None  # the data phase's way into its uplink ring
        self._room_slot: Slot | None = None  # the link whose uplink ring the send waits room in
        self._room_poll: asyncio.TimerHandle | None = None
        self._room_timer: asyncio.TimerHandle | None = None  # so_sndtimeo, while a stream waits for room
        self._room_need = 1  # free bytes the waiting send can use
        self.passthrough: Passthrough | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # its deadline (for a past one uvloop returns a Handle without when())
        self._timer_fired_at = 0.0  # the deadline of the data-phase timer that last fired
        self._leftovers: dict[int, Leftover] = {}  # link id -> what a +++ left of its stream (uart.leftovers)
        self._leftover_poll: asyncio.TimerHandle | None = None
        self._leftover_wait = 0.0  # its current wait (uart.leftovers backs it off)
        self._listening = False  # the port is read for +++ while a stream's ring is full (uart.reading)
        self._listen_timer: asyncio.TimerHandle | None = None
        self._side_full = False  # ... and the bytes it may hold meanwhile are all taken
        self._side_base = 0  # ... beyond those it held when it began (uart.reading._listen)
        self._spare = bytearray(SPARE)  # what a payload's read brings behind it (uart.direct)

    # -- lifetime ----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until stopped; a task of ours that raised ends it with that error (an ExceptionGroup)."""
        async with self.tasks:  # leaving it cancels and awaits what is left
            self.loop.add_signal_handler(signal.SIGTERM, self.stop)  # SIGINT: the supervisor's
            if self.supervisor is not None:
                self.supervisor.setblocking(False)
                self.loop.add_reader(self.supervisor.fileno(), self._on_supervisor)
            await self._wait_workers(timeout=10.0)
            for slot in self.links.slots:
                slot.uplink.want_space_doorbell(False)  # asked for only while a send waits for room
            self._start_boot(Reset.POWER_ON)
            self._resume_reading()
            self.faults.start()
            try:
                await self._stopped
            finally:
                await self._close()

    async def _close(self) -> None:
        try:
            self.faults.close()
            if self._replug is not None:
                self._replug.close()
            self.sntp.stop()
            if self.boot is not None:
                self.boot.cancel()
            await self.mdns.close()  # goodbye packets before the process ends
            await self.tasks.cancel_all()  # none may run on once the port and the output are closed
        finally:
            if self._paced is not None:
                self._paced.close()
            self._gate.close()
            self.to_supervisor.close()
            self.output.close()
            self.transcript.close()

    def stop(self) -> None:
        if not self._stopped.done():
            log.info("front_stopping")
            self._stopped.set_result(None)

    async def _wait_workers(self, timeout: float) -> None:
        # Woken by the Hello of the worker waited for, not polled: a boot wakes
        # the front once per worker at most.
        async with asyncio.timeout(timeout):
            while missing := [i for i in range(self.links.count) if not self.links.is_ready(i)]:
                await self.links.wait_ready(missing[0], None)

    def _tell_supervisor(self, msg: object) -> None:
        self.to_supervisor.send(msg)  # now, or once the channel has room (uart.sup_outbox)

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
            self.links.slots[msg.link_id].worker_pid = msg.pid
            self.links.attach(msg.link_id, control)
        elif isinstance(msg, Ping):  # bridged.liveness: we answer, so we are not stuck
            self._tell_supervisor(Pong(msg.seq, self.on_ping(msg)))
        elif isinstance(msg, Shutdown):
            self.stop()
        else:
            for fd in fds:
                os.close(fd)
