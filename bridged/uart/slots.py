"""The link slots of the UART front and the events they give it.

A slot is one link id (0 to N-1) with its two rings and the control socket of
its worker.  A connection in a slot is named by ``conn_id`` (a counter of the
front's); replies and EOF records about another conn_id are stale and are
ignored.  Slot states::

    no worker --Hello--> IDLE --connect()--> CONNECTING --Connected--> OPEN
    CONNECTING --ConnectFailed--> IDLE
    OPEN --EOF record / worker died--> IDLE  (CLOSED reported)
    OPEN --close()--> CLOSING --EOF record--> IDLE  (CIPCLOSE reports CLOSED)

``uart.links.LinkTable`` keeps the states and talks to the workers
(``uart.worker_control``); ``uart.delivery.Delivery`` hands their downlink
records to the front.  The front hears of both through one ``LinkEvents``
implementation.
"""

from __future__ import annotations

import asyncio
import enum
import socket
from dataclasses import dataclass, field
from typing import Callable, Protocol

from bridged.commands.context import ConnectSpec, LinkView
from bridged.ipc import records
from bridged.ipc.messages import SetOptions
from bridged.ipc.rings import Ring
from bridged.readgate import ReadGate
from bridged.uart.passive import Unread

__all__ = ["SlotState", "Slot", "LinkEvents"]


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
    worker_pid: int = 0  # its worker's, from the supervisor's WorkerStarted (Hello's may lie)
    ipd: int = 0  # +IPD frames and notices of this connection (bridged status)
    # Connected, but the CONNECT that announces it is not written yet: its data
    # waits in the ring (a peer that speaks first must not get +IPD ahead of it).
    unannounced: bool = False
    # The front's watch on the downlink's data doorbell (LinkTable.attach): paused
    # for a few ms while a passthrough stream gathers in the ring.
    doorbell: ReadGate | None = None

    def __post_init__(self) -> None:
        self.rx = Unread(self.downlink)


class LinkEvents(Protocol):
    """What the link table and the delivery tell the front."""

    def link_data(self, slot: Slot, record: records.Record) -> None:
        """A DATA record of an open connection, in order."""

    def link_notice(self, slot: Slot, length: Callable[[], int]) -> None:
        """Passive-mode data waits and no notice is queued or unanswered;
        ``length()`` says, when the notice is written, what it announces (0: nothing)."""

    def link_closed(self, slot: Slot, reason: str) -> None:
        """A connection ended that nobody was closing (the peer, an error, a dead worker)."""

    def link_ended(self, slot: Slot) -> None:
        """The slot's socket is gone (its EOF record may still wait in the ring)."""

    def link_accepted(self, slot: Slot) -> None:
        """A client of our server is ready."""

    def link_freed(self, slot: Slot) -> None:
        """(Soon after) a slot's connection ended."""

    def delivery_room(self) -> int:
        """Bytes of records the UART output takes now; <= 0 while it is backed
        up: records stay in the ring, so the worker stops reading its socket."""
