"""The front's side of the link slots: who is connected where, and the
conversation with each link worker.

A slot is one link id (0 to N-1) with its two rings and the control socket of
its worker.  A connection in a slot is named by ``conn_id`` (a counter of the
front's); replies and EOF records about another conn_id are stale and are
ignored.  Slot states::

    no worker --Hello--> IDLE --connect()--> CONNECTING --Connected--> OPEN
    CONNECTING --ConnectFailed--> IDLE
    OPEN --EOF record / worker died--> IDLE  (CLOSED reported)
    OPEN --close()--> CLOSING --EOF record--> IDLE  (CIPCLOSE reports CLOSED)
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import itertools
import os
import socket
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import structlog

from bridged.at.errors import ExecFail
from bridged.commands.context import ConnectSpec, LinkView
from bridged.ipc import records
from bridged.ipc.control import ControlError, recv_message, send_message
from bridged.ipc.messages import (
    Adopt,
    Close,
    Connect,
    ConnectFailed,
    Connected,
    Ended,
    Discard,
    Hello,
    LinkStats,
    Refused,
    RemoteChanged,
    SetOptions,
    SetRecvWindow,
)
from bridged.net.policy import Refusal
from bridged.ipc.rings import Ring
from bridged.uart.passive import Unread
from bridged.uart.transcript import MarkKind

__all__ = ["SlotState", "Slot", "LinkTable"]

log = structlog.get_logger()

_conn_ids = itertools.count(1)


def _plausible_remote(msg: Connected | RemoteChanged) -> bool:
    try:
        ipaddress.ip_address(msg.remote_ip)
    except ValueError:
        return False
    return 0 <= msg.remote_port <= 65535 and 0 <= getattr(msg, "local_port", 0) <= 65535


class SlotState(enum.Enum):
    NO_WORKER = enum.auto()
    IDLE = enum.auto()
    CONNECTING = enum.auto()
    OPEN = enum.auto()
    CLOSING = enum.auto()


@dataclass
class Slot:
    link_id: int
    uplink: Ring
    downlink: Ring
    control: socket.socket | None = None
    state: SlotState = SlotState.NO_WORKER
    conn_id: int | None = None
    view: LinkView | None = None
    waiter: asyncio.Future | None = None  # connect() or close() in progress
    silent: bool = False  # drop the CLOSED message (AT+RST closes links quietly)
    type: str = ""  # "TCP", "TCPv6" ... as AT+CIPSTART named it
    server: bool = False  # a client of our AT+CIPSERVER (tetype 1), not one we opened
    options: SetOptions = SetOptions()  # AT+CIPTCPOPT, resent to every new worker
    spec: ConnectSpec | None = None  # how the MCU opened it (passthrough reconnects with it)
    last_activity: float = 0.0  # for AT+CIPSTO: data either way resets it
    ended: bool = False  # the worker's socket is gone (its EOF record may still wait)
    # Passive receive mode (AT+CIPRECVTYPE=1): data stays in the downlink ring
    # until AT+CIPRECVDATA, so the worker's receive window covers all of it.
    passive: bool = False
    rx: Unread = field(init=False)  # what passive reads have not taken yet
    ready: asyncio.Future | None = None  # wait_ready(): the restarted worker's Hello
    pid: int = 0  # its worker's, from Hello
    ipd: int = 0  # +IPD frames and notices of this connection (bridged status)

    def __post_init__(self) -> None:
        self.rx = Unread(self.downlink)


class LinkTable:
    """Implements ``commands.context.Links`` for the UART front.

    Args:
        on_data: called with (slot, record) for each DATA record of an open
            connection, in order.
        on_closed: called with (slot, reason) when a connection ends that
            nobody was closing (the peer, an error, a dead worker).
        on_notice: called with (slot, length) when passive-mode data waits
            and no notice is queued or unanswered; ``length()`` says, at the
            moment the notice is written, what it announces (0: nothing).
        on_ended: called with the slot when its socket is gone.
        on_accepted: called with the slot when a server client is ready.
        on_freed: called (soon) with a slot whose connection ended.
        can_deliver: False while the UART output is backed up; records then
            stay in the ring, so the worker stops reading its socket.
    """

    tap = None  # the AT transcript while it is on (bridged.uart.transcript)

    def __init__(
        self,
        slots: list[Slot],
        on_data: Callable[[Slot, records.Record], None],
        on_closed: Callable[[Slot, str], None],
        can_deliver: Callable[[], bool],
        on_notice: Callable[[Slot, Callable[[], int]], None],
        on_ended: Callable[[Slot], None],
        window: int,
        on_accepted: Callable[[Slot], None] = lambda slot: None,
        on_freed: Callable[[Slot], None] = lambda slot: None,
    ) -> None:
        self.slots = slots
        self.count = len(slots)
        self.on_data = on_data
        self.on_closed = on_closed
        self.can_deliver = can_deliver
        self.on_notice = on_notice
        self.on_ended = on_ended
        self.on_accepted = on_accepted
        self.on_freed = on_freed
        self._deferred: set[int] = set()  # slots whose records wait for UART room
        self.window = window
        self.loop = asyncio.get_running_loop()
        self.on_stats: Callable[[Slot, LinkStats], None] = lambda slot, msg: None  # bridged.ops.status

    # -- Links protocol (used by command handlers) --------------------------------

    def view(self, link_id: int) -> LinkView | None:
        slot = self.slots[link_id]
        return slot.view if slot.state is SlotState.OPEN else None

    def is_busy(self, link_id: int) -> bool:
        return self.slots[link_id].state in (SlotState.CONNECTING, SlotState.OPEN, SlotState.CLOSING)

    def is_ready(self, link_id: int) -> bool:
        return self.slots[link_id].state is not SlotState.NO_WORKER

    async def wait_ready(self, link_id: int, timeout: float) -> None:
        """Wait for a worker the supervisor is restarting (after a crash) to say Hello.

        The MCU saw CLOSED and may reopen the link at once; the new worker is
        up within a second, so the command waits for it instead of failing.
        """
        slot = self.slots[link_id]
        if slot.state is not SlotState.NO_WORKER:
            return
        if slot.ready is None or slot.ready.done():
            slot.ready = self.loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(slot.ready)
        except TimeoutError:
            raise ExecFail(f"link {link_id}'s worker did not restart within {timeout:g} s") from None

    def can_send(self, link_id: int) -> bool:
        slot = self.slots[link_id]
        return slot.state is SlotState.OPEN and not slot.ended

    # -- passive receive mode ---------------------------------------------------------

    def set_passive(self, link_id: int, passive: bool) -> None:
        slot = self.slots[link_id]
        slot.passive = passive
        if slot.control is not None:
            self._send(slot, SetRecvWindow(self.window if passive else 0))
        if not passive:
            # Held data goes out as +IPD after the command's OK, not inside it.
            self.loop.call_soon(self._release_held, slot)

    def _release_held(self, slot: Slot) -> None:
        if not slot.passive and slot.control is not None:
            self.drain(slot)

    def _deliver_partial(self, slot: Slot) -> None:
        """Back in active mode: the rest of a record passive reads left in part.

        It obeys the rule of whole records (``_delivers``): after AT+CIPCLOSE
        or AT+RST it is dropped with them, never sent as a stray +IPD.
        """
        rest = slot.rx.take_partial()
        if self._delivers(slot):
            self.on_data(slot, records.Record(records.DATA, rest))

    def _delivers(self, slot: Slot) -> bool:
        """Data records of the slot go out as +IPD (else they are dropped)."""
        return slot.state in (SlotState.OPEN, SlotState.CLOSING) and not (slot.silent or slot.passive)

    def spec(self, link_id: int) -> ConnectSpec | None:
        """How the MCU opened the link (None for a server's client)."""
        slot = self.slots[link_id]
        return slot.spec if slot.state is SlotState.OPEN and not slot.server else None

    def is_passive(self, link_id: int) -> bool:
        return self.slots[link_id].passive

    def _receiving(self, slot: Slot) -> bool:
        """Passive data of an open connection waits in the slot's ring."""
        return slot.passive and slot.state is SlotState.OPEN and slot.control is not None

    def unread(self, link_id: int) -> int:
        """What AT+CIPRECVDATA could take now (no notice, no CLOSED from here:
        they must not precede the answer being made)."""
        slot = self.slots[link_id]
        if self._receiving(slot):
            self._count(slot)
        return slot.rx.total if slot.state is SlotState.OPEN else 0

    def read(self, link_id: int, limit: int) -> bytes:
        """Take up to ``limit`` unread bytes of a passive link (AT+CIPRECVDATA)."""
        slot = self.slots[link_id]
        return slot.rx.read(limit, one_datagram=slot.type.startswith("UDP"))

    def after_read(self, link_id: int) -> None:
        """Right after AT+CIPRECVDATA's answer is queued: announce what is left, or CLOSED."""
        slot = self.slots[link_id]
        if slot.passive and slot.control is not None:
            self._scan(slot)

    def _count(self, slot: Slot) -> None:
        if slot.rx.count():
            slot.last_activity = self.loop.time()

    def _scan(self, slot: Slot) -> None:
        """Count newly published records; queue a notice, or end once all is read."""
        self._count(slot)
        if slot.rx.total:
            token = slot.rx.notice.want(slot.rx.total)
            if token is not None:
                self.on_notice(slot, lambda: self._notice_length(slot, token))
        elif slot.rx.eof_seen:
            slot.rx.eof_seen = False
            self._take_eof(slot, records.get_record(slot.downlink))

    def _notice_length(self, slot: Slot, token: int) -> int:
        """Called as the notice is written: what it announces (0: drop it).

        Only counts: it runs inside the UART output's write, which must not
        queue anything (an EOF found here is taken by the drain it rings).
        """
        receiving = self._receiving(slot)
        if receiving:
            self._count(slot)
        return slot.rx.notice.length(token, slot.rx.total if receiving else 0)

    def _begin(self, slot: Slot, type_: str, server: bool) -> None:
        slot.conn_id = next(_conn_ids)
        slot.state = SlotState.CONNECTING
        slot.silent = slot.ended = False
        slot.ipd = 0
        slot.rx.reset()
        slot.type, slot.server = type_, server
        slot.last_activity = self.loop.time()

    def set_options(self, link_id: int, linger: int, nodelay: int, keep_alive: int) -> None:
        slot = self.slots[link_id]
        slot.options = SetOptions(linger, nodelay, keep_alive)
        if slot.control is not None:
            self._send(slot, slot.options)

    def discard(self, link_id: int, upto: int) -> None:
        """Drop the unsent bytes of a send that timed out (AT+CIPTCPOPT so_sndtimeo)."""
        slot = self.slots[link_id]
        if slot.control is not None and slot.conn_id is not None:
            self._send(slot, Discard(slot.conn_id, upto))

    def refused(self, link_id: int, refusal: Refusal) -> None:
        """A datagram remote refused here ([links] allow/deny): the worker logs and counts it."""
        slot = self.slots[link_id]
        if slot.control is not None and slot.conn_id is not None:
            self._send(slot, Refused(slot.conn_id, refusal.address, refusal.port, refusal.rule))

    def adopt(self, link_id: int, sock: socket.socket, type_: str, ca_enable: int = 0) -> None:
        """Hand a client our server accepted to the slot's worker (SCM_RIGHTS)."""
        slot = self.slots[link_id]
        self._begin(slot, type_, server=True)
        try:
            send_message(slot.control, Adopt(slot.conn_id, type_, ca_enable), [sock.fileno()])
        except OSError as exc:
            log.error("adopt_failed", link_id=link_id, error=str(exc))
            self._end(slot, "worker unreachable")
        finally:
            sock.close()  # the worker has its own copy now

    def server_links(self) -> list[int]:
        return [s.link_id for s in self.slots if s.server and s.state is not SlotState.IDLE
                and s.state is not SlotState.NO_WORKER]

    def free_ids(self) -> list[int]:
        return [s.link_id for s in self.slots if s.state is SlotState.IDLE]

    def expire(self, link_id: int) -> None:
        """Close a link on our own initiative (AT+CIPSTO): CLOSED is reported as for a peer close."""
        slot = self.slots[link_id]
        if slot.state is SlotState.OPEN:
            self._send(slot, Close(slot.conn_id))

    def touch(self, link_id: int) -> None:
        self.slots[link_id].last_activity = self.loop.time()

    async def connect(self, link_id: int, spec: ConnectSpec) -> LinkView:
        slot = self.slots[link_id]
        self._begin(slot, spec.type, server=False)
        slot.spec = spec
        slot.waiter = self.loop.create_future()
        fields = {k: v for k, v in asdict(spec).items() if k != "type"}
        fields["tls_alpn"] = tuple(spec.tls_alpn)
        fields["dns_servers"] = tuple(spec.dns_servers)
        request = Connect(slot.conn_id, spec.type, **fields)
        self._send(slot, request)
        try:
            view = await slot.waiter
        finally:
            slot.waiter = None
        return view

    async def close(self, link_id: int) -> None:
        slot = self.slots[link_id]
        if slot.state is not SlotState.OPEN:
            raise ExecFail(f"link {link_id} is not connected")
        slot.state = SlotState.CLOSING
        slot.waiter = self.loop.create_future()
        self._send(slot, Close(slot.conn_id))
        try:
            await slot.waiter
        finally:
            slot.waiter = None

    def drop_all(self) -> None:
        """Close every connection without CLOSED messages (AT+RST, AT+RESTORE)."""
        for slot in self.slots:
            if slot.state in (SlotState.OPEN, SlotState.CONNECTING):
                slot.silent = True
                self._send(slot, Close(slot.conn_id, flush=False))  # a reset loses what was unsent

    # -- worker attachment ----------------------------------------------------------

    def attach(self, link_id: int, control: socket.socket) -> None:
        """A (re)started worker's control socket; IDLE once it says Hello."""
        slot = self.slots[link_id]
        control.setblocking(False)
        slot.control = control
        self.loop.add_reader(control.fileno(), self._on_control, slot)
        self.loop.add_reader(slot.downlink.data_fd, self.drain, slot)

    def _send(self, slot: Slot, msg: object) -> None:
        if slot.control is None:
            self._worker_died(slot)
            return
        try:
            send_message(slot.control, msg)
        except OSError as exc:
            log.error("control_send_failed", link_id=slot.link_id, error=str(exc))
            self._worker_died(slot)

    def _on_control(self, slot: Slot) -> None:
        try:
            received = recv_message(slot.control)
        except BlockingIOError:
            return
        except ControlError as exc:  # a worker is a process apart: maybe a compromised one
            log.error("control_message_refused", link_id=slot.link_id, error=str(exc))
            return
        except OSError:
            received = None
        if received is None:
            self._worker_died(slot)
            return
        msg, fds = received
        for fd in fds:
            os.close(fd)
        if isinstance(msg, (Connected, RemoteChanged)) and not _plausible_remote(msg):
            # Its address goes into +IPD, +CIPSTATUS ... on the UART: no text but an address.
            log.error("control_message_refused", link_id=slot.link_id, error=f"bad address in {msg!r:.200}")
            return
        if isinstance(msg, Hello):
            log.info("worker_ready", link_id=slot.link_id, pid=msg.pid)
            slot.pid = msg.pid
            if slot.state is SlotState.NO_WORKER:
                slot.state = SlotState.IDLE
            if slot.ready is not None and not slot.ready.done():
                slot.ready.set_result(None)
            if slot.passive:
                self._send(slot, SetRecvWindow(self.window))
            if slot.options != SetOptions():
                self._send(slot, slot.options)
        elif isinstance(msg, RemoteChanged) and msg.conn_id == slot.conn_id and slot.view is not None:
            slot.view = replace(slot.view, remote_ip=msg.remote_ip, remote_port=msg.remote_port)
        elif isinstance(msg, Ended) and msg.conn_id == slot.conn_id:
            slot.ended = True
            self.on_ended(slot)
        elif isinstance(msg, Connected) and msg.conn_id == slot.conn_id:
            self._on_connected(slot, msg)
        elif isinstance(msg, ConnectFailed) and msg.conn_id == slot.conn_id:
            self._end(slot, msg.reason)
        elif isinstance(msg, LinkStats):
            self.on_stats(slot, msg)

    def _on_connected(self, slot: Slot, msg: Connected) -> None:
        if slot.state is not SlotState.CONNECTING:
            return
        slot.view = LinkView(slot.link_id, slot.type, msg.remote_ip, msg.remote_port, msg.local_port, slot.server)
        slot.state = SlotState.OPEN
        if self.tap is not None:
            self.tap.mark(MarkKind.CONNECTED, link=slot.link_id, type=slot.type, remote=msg.remote_ip,
                          port=msg.remote_port, server=slot.server)
        if slot.server:
            if not slot.silent:  # else a restart closed it while the worker took it: never announced
                self.on_accepted(slot)
        elif slot.waiter is not None:
            slot.waiter.set_result(slot.view)

    # -- downlink records -------------------------------------------------------------

    def drain(self, slot: Slot) -> None:
        """Deliver the slot's records while the UART output can take them."""
        slot.downlink.clear_data_doorbell()
        if slot.passive and slot.state is SlotState.OPEN:
            self._scan(slot)
            return
        if slot.rx.offset and self.can_deliver():
            self._deliver_partial(slot)
        slot.rx.forget()
        slot.downlink.hold_doorbells()  # one space doorbell for the whole drain
        try:
            self._deliver(slot)
        finally:
            slot.downlink.release_doorbells()

    def _deliver(self, slot: Slot) -> None:
        while True:
            if not self.can_deliver():
                self._deferred.add(slot.link_id)  # drained again once the UART catches up
                return
            record = records.get_record(slot.downlink)
            if record is None:
                return
            if record.kind == records.EOF:
                self._take_eof(slot, record)
            elif self._delivers(slot):
                slot.last_activity = self.loop.time()
                self.on_data(slot, record)

    def _take_eof(self, slot: Slot, record: records.Record) -> None:
        conn_text, _, reason = record.payload.decode("utf-8", "replace").partition(" ")
        if conn_text.isdigit() and int(conn_text) == slot.conn_id:
            self._end(slot, reason)
        elif slot.passive:
            self._scan(slot)  # a stale EOF: look past it

    def drain_deferred(self) -> None:
        """The UART output caught up: deliver what back-pressure held in the rings."""
        if not self._deferred:
            return  # the usual case, after every write
        deferred, self._deferred = self._deferred, set()
        for link_id in sorted(deferred):
            if self.slots[link_id].control is not None:
                self.drain(self.slots[link_id])

    # -- the end of a connection ------------------------------------------------------

    def _end(self, slot: Slot, reason: str) -> None:
        """The connection of the slot is gone; tell whoever waits, once."""
        state, waiter, silent = slot.state, slot.waiter, slot.silent
        if state in (SlotState.IDLE, SlotState.NO_WORKER):
            return
        slot.state = SlotState.IDLE if slot.control is not None else SlotState.NO_WORKER
        if self.tap is not None:
            failed = state is SlotState.CONNECTING
            self.tap.mark(MarkKind.CONNECT_FAILED if failed else MarkKind.CLOSED, link=slot.link_id, reason=reason)
        slot.conn_id = None
        slot.view = None
        self.loop.call_soon(self.on_freed, slot)
        if waiter is not None and not waiter.done():
            if state is SlotState.CONNECTING:
                waiter.set_exception(ExecFail(f"connect failed: {reason}"))
                return
            if state is SlotState.CLOSING:
                waiter.set_result(None)
                return
        if state in (SlotState.OPEN, SlotState.CLOSING) and not silent:
            self.on_closed(slot, reason)

    def _worker_died(self, slot: Slot) -> None:
        if slot.control is not None:
            log.error("worker_died", link_id=slot.link_id)
            self.loop.remove_reader(slot.control.fileno())
            self.loop.remove_reader(slot.downlink.data_fd)
            slot.control.close()
            slot.control = None
        # What the worker received before it died is still owed to the MCU,
        # as +IPD even in passive mode (no worker, no reads), but only once:
        # of a record that reads took part of, only the rest.
        owed = slot.state is SlotState.OPEN and not slot.silent
        rest = slot.rx.take_partial()
        if rest and owed:
            self.on_data(slot, records.Record(records.DATA, rest))
        while (record := records.get_record(slot.downlink)) is not None:
            if record.kind == records.DATA and owed:
                self.on_data(slot, record)
        self._end(slot, "link worker died")
        slot.state = SlotState.NO_WORKER
