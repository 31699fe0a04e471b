"""The front's slot table: who is connected where, what the command handlers
ask of the links (``commands.context.Links``) and how a connection ends (the
slot states are ``uart.slots``'; the messages to and from each link worker
``uart.worker_control``'s; downlink records go through ``uart.delivery``).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from dataclasses import asdict
from typing import Callable

import structlog

from bridged.at.errors import ExecFail
from bridged.commands.context import ConnectSpec, LinkView
from bridged.ipc.control import send_message
from bridged.ipc.messages import Adopt, Close, Connect, FaultFired, LinkStats, Refused, SetOptions, SetRecvWindow
from bridged.net.policy import Refusal
from bridged.net.resolver import ResolveError, draw_faults
from bridged.uart.delivery import Delivery
from bridged.uart.slots import LinkEvents, Slot, SlotState
from bridged.uart.transcript import MarkKind
from bridged.uart.worker_control import WorkerControl

__all__ = ["SlotState", "Slot", "LinkTable", "LinkEvents"]

log = structlog.get_logger()

_conn_ids = itertools.count(1)


class LinkTable(WorkerControl):
    """Implements ``commands.context.Links`` for the UART front, which hears
    of the links through ``events`` (``uart.slots.LinkEvents``).

    ``window``: the passive-mode receive window the workers keep.
    """

    tap = None  # the AT transcript while it is on (bridged.uart.transcript)

    def __init__(self, slots: list[Slot], events: LinkEvents, window: int) -> None:
        self.slots = slots
        self.count = len(slots)
        self.events = events
        self.delivery = Delivery(events, self._end, self._worker_died)
        self.window = window
        self.loop = asyncio.get_running_loop()
        self.on_stats: Callable[[Slot, LinkStats], None] = lambda slot, msg: None  # bridged.ops.status
        self.on_fault: Callable[[Slot, FaultFired], None] = lambda slot, msg: None  # bridged.faults.front

    # -- Links protocol (used by command handlers) --------------------------------

    def view(self, link_id: int) -> LinkView | None:
        slot = self.slots[link_id]
        return slot.view if slot.state is SlotState.OPEN else None

    def is_busy(self, link_id: int) -> bool:
        return self.slots[link_id].state in (SlotState.CONNECTING, SlotState.OPEN, SlotState.CLOSING)

    def is_ready(self, link_id: int) -> bool:
        return self.slots[link_id].state is not SlotState.NO_WORKER

    async def wait_ready(self, link_id: int, timeout: float | None) -> None:
        """Wait for a worker the supervisor is (re)starting to say Hello.

        The MCU saw CLOSED and may reopen the link at once; the new worker is
        up within a second, so the command waits for it instead of failing.
        ``timeout`` None: no deadline of its own (the caller's).
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
            self.delivery.drain(slot)

    def spec(self, link_id: int) -> ConnectSpec | None:
        """How the MCU opened the link (None for a server's client)."""
        slot = self.slots[link_id]
        return slot.spec if slot.state is SlotState.OPEN and not slot.server else None

    def is_passive(self, link_id: int) -> bool:
        return self.slots[link_id].passive

    def unread(self, link_id: int) -> int:
        """What AT+CIPRECVDATA could take now."""
        return self.delivery.unread(self.slots[link_id])

    def read(self, link_id: int, limit: int) -> bytes:
        """Take up to ``limit`` unread bytes of a passive link (AT+CIPRECVDATA)."""
        return self.delivery.read(self.slots[link_id], limit)

    def after_read(self, link_id: int) -> None:
        """Right after AT+CIPRECVDATA's answer is queued: announce what is left, or CLOSED."""
        slot = self.slots[link_id]
        if slot.passive and slot.control is not None:
            self.delivery.scan(slot)

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
        """AT+CIPSTO's expiry: a hang-up reported as a peer close, not AT+CIPCLOSE (which drops unread data)."""
        self.hang_up(link_id)

    def touch(self, link_id: int) -> None:
        self.slots[link_id].last_activity = self.loop.time()

    async def connect(self, link_id: int, spec: ConnectSpec) -> LinkView:
        try:  # the worker resolves the host: the front's injected DNS faults are drawn here
            await draw_faults(spec.host, (spec.timeout_ms or 10_000) / 1000)
        except ResolveError as exc:
            raise ExecFail(f"connect failed: {exc}") from None
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
        except asyncio.CancelledError:
            self._drop(slot)  # abandoned (a restart, passthrough left): it must not open unheard
            raise
        finally:
            slot.waiter = None
        return view

    def hang_up(self, link_id: int) -> None:
        """Close an open link for our own reasons (the AP went away, AT+CIPSTO): nothing more
        is admitted (a send under way fails), what was admitted goes out first, and
        CLOSED is reported when the worker is done.

        A passive link is taken away as by its peer: it stays OPEN with nothing more
        admitted (``ended``), so what is unread stays readable and CLOSED waits until
        AT+CIPRECVDATA has drained it (esp-at-behavior.md 2.3), or AT+CIPCLOSE drops it."""
        slot = self.slots[link_id]
        if slot.state is SlotState.OPEN:
            if slot.passive:
                slot.ended = True
            else:
                slot.state = SlotState.CLOSING
            self._send(slot, Close(slot.conn_id))

    async def close(self, link_id: int) -> None:
        slot = self.slots[link_id]
        if slot.state is not SlotState.OPEN:
            raise ExecFail(f"link {link_id} is not connected")
        slot.state = SlotState.CLOSING
        if slot.unannounced:
            # Closed before its CONNECT was written (a connect the Wi-Fi drop failed): nothing
            # of it is shown, and its EOF, which waits behind `announced`, must get through.
            slot.unannounced, slot.silent = False, True
        slot.waiter = self.loop.create_future()
        self._send(slot, Close(slot.conn_id))
        try:
            await slot.waiter
        finally:
            slot.waiter = None

    def drop_all(self) -> None:
        """Close every connection without CLOSED messages (AT+RST, AT+RESTORE)."""
        for slot in self.slots:
            self._drop(slot)

    def dropping(self) -> bool:
        """Connections drop_all() closed unheard are not ended yet (their workers are on it)."""
        return any(s.silent and s.state in (SlotState.OPEN, SlotState.CONNECTING, SlotState.CLOSING)
                   for s in self.slots)

    def _drop(self, slot: Slot) -> None:
        """Close the slot's connection, if any, unheard: no CLOSED, its data dropped."""
        slot.unannounced = False  # nothing will announce it now; the EOF must get through
        # CLOSING too (hung up by a Wi-Fi drop or AT+CIPSTO, or an AT+CIPCLOSE a forced
        # restart abandoned): its worker may still be flushing, and its CLOSED would follow ready.
        if slot.state in (SlotState.OPEN, SlotState.CONNECTING, SlotState.CLOSING) and not slot.silent:  # (once)
            slot.silent = True
            self._send(slot, Close(slot.conn_id, flush=False))  # a reset loses what was unsent

    # -- the end of a connection ------------------------------------------------------

    def _end(self, slot: Slot, reason: str) -> None:
        """The connection of the slot is gone; tell whoever waits, once."""
        state, waiter, silent = slot.state, slot.waiter, slot.silent
        if state in (SlotState.IDLE, SlotState.NO_WORKER):
            return
        slot.state = SlotState.IDLE if slot.control is not None else SlotState.NO_WORKER
        slot.unannounced = False
        if self.tap is not None:
            failed = state is SlotState.CONNECTING
            self.tap.mark(MarkKind.CONNECT_FAILED if failed else MarkKind.CLOSED, link=slot.link_id, reason=reason)
        slot.conn_id = None
        slot.view = None
        self.loop.call_soon(self.events.link_freed, slot)
        if waiter is not None and not waiter.done():
            if state is SlotState.CONNECTING:
                waiter.set_exception(ExecFail(f"connect failed: {reason}"))
                return
            if state is SlotState.CLOSING:
                waiter.set_result(None)
                return
        if state in (SlotState.OPEN, SlotState.CLOSING) and not silent:
            self.events.link_closed(slot, reason)
