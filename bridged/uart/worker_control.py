"""The front's control conversation with each link worker (a part of ``uart.links.LinkTable``).

Theory of operation.  The supervisor hands the front a (re)started worker's
end of its control socketpair (``attach``); the worker's Hello makes its slot
usable (NO_WORKER -> IDLE) and gets the slot's receive window and socket
options again.  What a worker says about a connection (Connected, Ended,
ConnectFailed, RemoteChanged) counts only for the slot's current conn_id:
the rest is stale.  A worker is a process apart, maybe a compromised one: a
message that does not parse, or carries no address where +IPD and
+CIPSTATUS would show one, is refused with a log line.  A control socket
that fails or closes is the worker's death: its connection ends as closed
by the peer, and the slot waits for the restarted worker (NO_WORKER).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
from dataclasses import replace

import structlog

from bridged.commands.context import LinkView
from bridged.ipc.control import ControlError, recv_message, send_message
from bridged.ipc.messages import (ConnectFailed, Connected, Ended, FaultFired, Hello, LinkStats, RemoteChanged,
                                   SetOptions, SetRecvWindow)
from bridged.readgate import ReadGate
from bridged.uart.slots import Slot, SlotState
from bridged.uart.transcript import MarkKind

__all__ = ["WorkerControl"]

log = structlog.get_logger()


def _plausible_remote(msg: Connected | RemoteChanged) -> bool:
    try:
        ipaddress.ip_address(msg.remote_ip)
    except ValueError:
        return False
    return 0 <= msg.remote_port <= 65535 and 0 <= getattr(msg, "local_port", 0) <= 65535


class WorkerControl:
    """Control messages to and from the link workers; a part of ``LinkTable`` (uses its attributes)."""

    def attach(self, link_id: int, control: socket.socket) -> None:
        """A (re)started worker's control socket; IDLE once it says Hello."""
        slot = self.slots[link_id]
        control.setblocking(False)
        slot.control = control
        self.loop.add_reader(control.fileno(), self._on_control, slot)
        if slot.doorbell is None:
            slot.doorbell = ReadGate(self.loop, functools.partial(self.delivery.drain, slot))
        slot.doorbell.open(slot.downlink.data_fd)

    def pause_downlink(self, slot: Slot) -> None:
        """Stop hearing the slot's data doorbell (records gather in its ring) until resume_downlink."""
        if slot.doorbell is not None:
            slot.doorbell.shut(hold=False)

    def resume_downlink(self, slot: Slot) -> None:
        if slot.doorbell is not None and slot.control is not None:
            slot.doorbell.open(slot.downlink.data_fd)

    def tell(self, link_id: int, msg: object) -> bool:
        """Send a control message to a link's worker (FireFault); False when it has none now."""
        slot = self.slots[link_id]
        if slot.control is None:
            return False
        try:
            send_message(slot.control, msg)
        except OSError:
            return False  # a full or dead socket: its reader sees the death
        return True

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
            self.events.link_ended(slot)
        elif isinstance(msg, Connected) and msg.conn_id == slot.conn_id:
            self._on_connected(slot, msg)
        elif isinstance(msg, ConnectFailed) and msg.conn_id == slot.conn_id:
            self._end(slot, msg.reason)
        elif isinstance(msg, LinkStats):
            self.on_stats(slot, msg)
        elif isinstance(msg, FaultFired):
            self.on_fault(slot, msg)

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
                self.events.link_accepted(slot)
        elif slot.waiter is not None:
            slot.unannounced = True  # until connect()'s caller has written CONNECT: `announced`
            slot.waiter.set_result(slot.view)

    def announced(self) -> None:
        """The CONNECT of the links connect() opened is written (or will never be):
        their data may follow now."""
        for slot in self.slots:
            if slot.unannounced:
                self.delivery.announce(slot)

    def _worker_died(self, slot: Slot) -> None:
        if slot.control is not None:
            log.error("worker_died", link_id=slot.link_id)
            self.loop.remove_reader(slot.control.fileno())
            slot.doorbell.shut(hold=False)
            slot.control.close()
            slot.control = None
        self.delivery.owed_at_death(slot)
        self._end(slot, "link worker died")
        slot.state = SlotState.NO_WORKER
