"""The AT+CIPSERVER listener, in the front process.

Theory of operation: one listening socket at most (ESP-AT allows one
server).  An accepted client goes to the lowest free link slot: its socket is
handed to that slot's worker (SCM_RIGHTS) and the MCU hears ``<id>,CONNECT``
once the worker has it.  Like ESP-AT (``at_unlisten_when_reach_conn_max``),
the listener is closed while the server has AT+CIPSERVERMAXCONN clients or
no link slot is free, so further clients are refused at once by the kernel
(connection refused) rather than accepted and dropped; it listens again as
soon as a link frees up.  A client that races in before the listener closes
is reset, and the refusal is logged.

No client reaches the ESP over a station that has lost its AP (a Wi-Fi drop,
AT+CWQAP, not joined yet): while it is down a client arriving over it is
reset and logged, never a CONNECT.  Clients already taken are closed by the
drop itself (``faults.front`` hangs their links up).

AT+CIPSTO: a one-second tick closes server clients idle for that long (data
in either direction resets the clock); client links the MCU opened are not
affected.  The tick runs only while it could close one (a timeout set, a
client taken): an idle server wakes nobody.  Clients AT+CIPSERVER=0 keeps are
still server clients (ESP-AT's timer counts every server-side link): the tick
goes on for them with the timeout last set (AT+CIPSTO=<s> itself needs a
running server, so that value stands until a server runs again or AT+RST).

``[links] allow / deny`` applies to clients too: one from a refused address
(and port) is reset at once, before it takes a link slot, and counted
(bridged.net.fence, which also keeps a flood of them out of the log); the
MCU never hears of it.  The listener binds the station
interface's address (the command handler passes it), not the wildcard.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Callable

import structlog

from bridged.commands.context import SessionState
from bridged.net.fence import Fence
from bridged.net.policy import Policy
from bridged.uart.links import LinkTable

__all__ = ["Server"]

log = structlog.get_logger()

_BACKLOG = 5


class Server:
    def __init__(self, links: LinkTable, policy: Policy | None = None) -> None:
        self.links = links
        self.loop = asyncio.get_running_loop()
        self.fence = Fence(policy or Policy(), self.loop.time)
        self.max_conn = links.count
        self._timeout = 0  # AT+CIPSTO seconds; 0 = never
        self.port = 0
        self.type = ""
        self.ca_enable = 0
        self.netif = 0  # AT+CIPSERVER <netif> (ESP-AT 4.1+): 0 all, 1 station, 2 softAP, 3 Ethernet
        self.bind_ip = ""
        self._listener: socket.socket | None = None
        self._tick: asyncio.TimerHandle | None = None
        self.station: Callable[[], SessionState | None] = lambda: None  # the session's, set by the front

    @property
    def running(self) -> bool:
        return bool(self.type)

    @property
    def timeout(self) -> int:
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: int) -> None:
        self._timeout = seconds
        if not seconds and self._tick is not None:
            self._tick.cancel()  # 0 = never: a later timeout starts a tick of its own
            self._tick = None
        self._arm()

    # -- AT+CIPSERVER ---------------------------------------------------------------

    def start(self, port: int, type_: str, ca_enable: int, bind_ip: str, netif: int = 0) -> None:
        """Create the server. Raises OSError when the port cannot be bound."""
        self.port, self.type, self.ca_enable, self.bind_ip = port, type_, ca_enable, bind_ip
        self.netif = netif
        try:
            self._listen()
        except OSError:
            self.type = ""
            raise
        self._arm()
        log.info("server_started", port=port, type=type_)

    def stop(self) -> None:
        """Delete the server; the tick goes on while kept clients could time out."""
        self._unlisten()
        log.info("server_stopped", port=self.port)
        self.type = ""

    # -- listening -------------------------------------------------------------------

    def _full(self) -> bool:
        return len(self.links.server_links()) >= self.max_conn or not self.links.free_ids()

    def update(self) -> None:
        """Listen when a client could be taken, not otherwise."""
        if not self.running:
            return
        self._arm()  # a client may have been taken
        if self._full():
            self._unlisten()
        elif self._listener is None:
            try:
                self._listen()
            except OSError as exc:
                log.error("server_relisten_failed", port=self.port, error=str(exc))

    def _listen(self) -> None:
        family = socket.AF_INET6 if self.type.endswith("v6") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # For TCP, Linux's SO_REUSEADDR only lets the listener bind while
            # connections of an earlier one on the port sit in TIME_WAIT (the
            # MCU restarts its server at once); it never lets two sockets
            # listen on one port, so no gateway service's port can be taken.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self.bind_ip or ("::" if family == socket.AF_INET6 else "0.0.0.0"), self.port))
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self.loop.add_reader(sock.fileno(), self._on_acceptable)

    def _unlisten(self) -> None:
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None

    def _on_acceptable(self) -> None:
        try:
            conn, addr = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accept_failed", error=str(exc))
            return
        if not self.fence.open and not self.fence.admit(addr, "accept"):
            _reset(conn)
            return
        free = self.links.free_ids()
        if not self._reachable():
            log.warning("server_client_refused", remote=addr[0], port=addr[1], why="the station has no AP")
            _reset(conn)
        elif self._full():
            log.warning("server_client_refused", remote=addr[0], port=addr[1],
                        clients=len(self.links.server_links()), max_conn=self.max_conn, free_links=len(free))
            _reset(conn)
        else:
            log.info("server_client_accepted", remote=addr[0], port=addr[1], link_id=free[0])
            self.links.adopt(free[0], conn, self.type, self.ca_enable)
        self.update()

    def _reachable(self) -> bool:
        """A client could have come over the interfaces the server listens on: not over a
        station without its AP (<netif> 1, or 0 with no softAP beside it)."""
        state = self.station()
        if state is None or state.wifi_connected or self.netif in (2, 3):
            return True
        return self.netif == 0 and state.cwmode in (2, 3)

    # -- AT+CIPSTO ---------------------------------------------------------------------

    def _arm(self) -> None:
        """Tick each second while the tick could close a client."""
        if self._tick is None and self._timeout and self.links.server_links():
            self._tick = self.loop.call_later(1.0, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        if not self._timeout:
            return
        now = self.loop.time()
        for link_id in self.links.server_links():
            slot = self.links.slots[link_id]
            if slot.view is not None and now - slot.last_activity >= self.timeout:
                log.info("server_client_timed_out", link_id=link_id, idle=round(now - slot.last_activity, 1))
                self.links.expire(link_id)
        self._arm()


def _reset(conn: socket.socket) -> None:
    """Close with a reset, not a FIN: the client learns at once it was not taken."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
