"""A link worker: one process per link slot, moving bytes between its rings
and its socket.

Theory of operation.  The worker has three inputs, each an fd in its event
loop: the control socket (``Connect`` / ``Adopt`` / ``Close`` and settings
from the front), the uplink ring's data doorbell (payload the MCU sent) and
the socket.  It has two outputs: the downlink ring (received data, then one
EOF record when the connection ends) and control replies (``Connected`` /
``ConnectFailed`` / ``Ended``).  It is built in parts, each with its own
theory of operation:

* here: the control conversation and a connection's lifetime (opened,
  closed by the host or the peer, finished, its socket dropped);
* ``links.connecting``: ``Connect`` and ``Adopt``, what may wait doing so;
* ``links.uplink``: ring -> socket, and the closing flush of a host's Close;
* ``links.downlink``: socket -> ring, the passive receive window, read
  batching (``links.batching``), EOF records.

Back-pressure, both ways, without a queue of our own: the uplink leaves the
ring only as fast as the socket takes it, and the downlink stops reading the
socket while the ring (or the passive receive window) is full.

One TaskGroup (``run``) holds every task of the worker (a connect, a TLS
adoption), each started by ``_spawn``: a task that fails unexpectedly fails
the group, and ``run`` raises it (the process exits non-zero and the
supervisor restarts it, as any dead worker).  From that failure on nothing
more is read off the control socket (the front learns of the end from its
EOF), and a connect the ending group refuses or cancels is answered
ConnectFailed: no control message taken is dropped unanswered.  The worker ends when its control socket reaches EOF: the front
is gone.

Every remote it uses passes ``[links] allow / deny`` after name resolution
(``bridged.net.fence``): each address a connect tries, each datagram's
destination and sender.  A refused connect fails as an unreachable host
would; a refused datagram is dropped.

Faults (``[faults]``, ``bridged fault``): connects and TLS handshakes ask
``self.faults`` (bridged.links.faults); a connection with a data-path fault
(latency, a bandwidth cap, UDP loss or reordering, a TCP reset) gets a
``Shaper`` (bridged.links.shaping) that takes over its reads and meters its
sends (and delays them, through its ``Outbox``, under latency).  Without
one, the paths are exactly as without faults.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
from collections.abc import Coroutine, Sequence
from typing import Any

import structlog

from bridged.faults import FaultSpec
from bridged.faults.seed import schedule_start
from bridged.faults.spec import FaultError
from bridged.ipc.control import ControlError, recv_message, send_message, socket_from_fd
from bridged.ipc.messages import (
    Adopt,
    Close,
    Connect,
    ConnectFailed,
    Connected,
    Ended,
    FaultFired,
    FireFault,
    Hello,
    LinkStats,
    Refused,
    SetOptions,
    SetRecvWindow,
    StatsRequest,
)
from bridged.ipc.rings import Ring
from bridged.links.connecting import Connecting, connected_socket
from bridged.links.downlink import Downlink
from bridged.links.faults import Batches, LinkFaults
from bridged.links.shaping import Shaper
from bridged.links.tcp import apply_options
from bridged.links.udp import loopback_source
from bridged.links.uplink import Uplink
from bridged.net.fence import Fence
from bridged.net.policy import Policy, Refusal
from bridged.ops import events
from bridged.pki import PkiStore
from bridged.readgate import ReadGate

__all__ = ["Worker"]

log = structlog.get_logger()


class Worker(Connecting, Uplink, Downlink):
    def __init__(
        self,
        link_id: int,
        control: socket.socket,
        uplink: Ring,
        downlink: Ring,
        connect_timeout_ms: int,
        pki: PkiStore | None = None,
        read_window_ms: int = 0,
        ipd_chunk: int = 2920,
        policy: Policy | None = None,
        station: str = "",
        faults: Sequence[FaultSpec] = (),
        fault_seed: int = 0,
    ) -> None:
        self.link_id = link_id
        self.control = control
        self.uplink = uplink
        self.downlink = downlink
        self.connect_timeout_ms = connect_timeout_ms
        self.pki = pki
        self.loop = asyncio.get_running_loop()
        self.fence = Fence(policy or Policy(), self.loop.time)
        self.station = station  # wifi.station_interface: UDP links bind its address
        self.sock: socket.socket | None = None
        self.conn_id: int | None = None
        self.connecting: asyncio.Task | None = None
        self._tasks: asyncio.TaskGroup | None = None  # run()'s: every task of the worker (_spawn)
        self._failed = False  # a task failed: the TaskGroup is ending the worker
        self.stats = {"up": 0, "down": 0}
        self.options = SetOptions()
        # UDP: datagrams keep their boundaries both ways; the remote may move
        # (AT+CIPSTART <mode> 1: once, 2: to every sender).
        self.datagram = False
        self.remote: tuple | None = None
        self.udp_mode = 0
        self.retargeted = False
        self.loopback_source: str | None = None  # a UDP link sending from 127.0.0.1 (udp.loopback_source)
        self.front_gone = False  # ended because the front's end of the control socket closed
        self._init_uplink()
        self._init_downlink(read_window_ms, ipd_chunk)
        # [faults] (bridged.links.faults): the connect and TLS hooks ask it; a
        # connection with a data-path fault gets a Shaper (None: the paths run as they are).
        self._fault_reports = Batches(self.loop, self._fault_fired)
        self.faults = LinkFaults(faults, fault_seed, link_id, schedule_start(self.loop.time())[0],
                                 self._fault_reports.fired)
        self.shaper: Shaper | None = None
        self._done = self.loop.create_future()

    # -- lifetime ------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the front until its control socket closes or ``stop()``.

        Raises:
            ExceptionGroup: a task of the worker failed unexpectedly (our bug).
        """
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            self._start()
            try:
                await self._done  # cancelled by the TaskGroup when a task fails
            finally:
                self._end()

    def _start(self) -> None:
        """Inputs on, and Hello to the front."""
        self.control.setblocking(False)
        # Bytes a dead predecessor left in the uplink ring stay until the next
        # Connect discards them: consuming them now would look like SEND OK.
        self.loop.add_reader(self.control.fileno(), self._on_control)
        self.loop.add_reader(self.uplink.data_fd, self._on_uplink)
        self.uplink.poll_on_tick(0)  # a dead predecessor's flag: the front rings again
        self._gate = ReadGate(self.loop, self._on_readable)
        self._start_ticker()
        # The front frees downlink space all the time; we only care while waiting for it.
        self.downlink.want_space_doorbell(False)
        # A worker restarted while the daemon stops may find the front gone:
        # that is the front's EOF to read next, not a crash.
        self._reply(Hello(self.link_id, os.getpid()))

    def _end(self) -> None:
        """Inputs off and the socket dropped, before the TaskGroup waits for its tasks."""
        self.loop.remove_reader(self.control.fileno())
        self.loop.remove_reader(self.uplink.data_fd)
        if self.connecting is not None:
            self.connecting.cancel()
        self._drop_socket()
        self._gate.close()
        if self._ticker is not None:
            self._ticker.close()
        self._fault_reports.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], conn_id: int) -> asyncio.Task | None:
        """A task of connection ``conn_id`` in the worker's TaskGroup, or None (the coroutine
        closed) once a task failed: the group is ending the worker then (3.12+ refuses new tasks)."""
        if self._failed:
            coro.close()
            return None
        try:
            task = self._tasks.create_task(coro)
        except RuntimeError:  # 3.12+: the group is shutting down
            coro.close()
            return None
        task.add_done_callback(functools.partial(self._task_done, conn_id))
        return task

    def _task_done(self, conn_id: int, task: asyncio.Task) -> None:
        """A task that failed ends the worker (the TaskGroup cancels the others, run raises):
        nothing more is taken off the control channel (the front learns of the end from its
        EOF), and a connect the end cancelled is answered, not left for the front to wait on."""
        if task.cancelled():
            if self._failed:
                self._reply(ConnectFailed(conn_id, "the link worker is ending"))
            return
        if task.exception() is None:
            return
        self._failed = True
        self.loop.remove_reader(self.control.fileno())

    def stop(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    # -- control -------------------------------------------------------------------

    def _on_control(self) -> None:
        try:
            received = recv_message(self.control)
        except BlockingIOError:
            return
        except ControlError as exc:
            log.error("control_message_refused", error=str(exc))
            return
        except OSError:  # a reset is as final as EOF: the front is gone
            received = None
        if received is None:
            log.info("front_gone")
            self.front_gone = True
            self.stop()
            return
        msg, fds = received
        if isinstance(msg, Adopt) and len(fds) == 1:
            self._on_adopt(msg, fds[0])
            return
        for fd in fds:
            os.close(fd)  # only Adopt carries a socket
        if isinstance(msg, Adopt):  # with no socket, or several: answered, or the front waits on
            log.error("adopt_refused", conn_id=msg.conn_id, error=f"{len(fds)} fds, not one")
            self._reply(ConnectFailed(msg.conn_id, f"Adopt came with {len(fds)} fds, not one"))
        elif isinstance(msg, Connect):
            self._start_connect(msg)
        elif isinstance(msg, Close):
            self._close(msg.conn_id, "closed by host", msg.flush)
        else:
            self._on_setting(msg)

    def _on_adopt(self, msg: Adopt, fd: int) -> None:
        try:  # a TCP client of the front's server, nothing else
            sock = connected_socket(socket_from_fd(fd, (socket.AF_INET, socket.AF_INET6), socket.SOCK_STREAM))
        except ControlError as exc:
            log.error("adopt_refused", conn_id=msg.conn_id, error=str(exc))
            self._reply(ConnectFailed(msg.conn_id, f"not a TCP socket: {exc}"))
            return
        self._adopt(msg, sock)

    def _on_setting(self, msg: object) -> None:
        """The control messages that neither open nor close a connection."""
        if isinstance(msg, SetOptions):
            self.options = msg
            self._apply_options()
        elif isinstance(msg, SetRecvWindow):
            self.recv_window = msg.window
            self._resume_reading()
        elif isinstance(msg, Refused):
            # The front refused AT+CIPSEND's remote before its prompt; the count is ours.
            self.fence.note(Refusal(msg.address, msg.port, msg.rule), "send")
        elif isinstance(msg, StatsRequest):
            self._reply(self._statistics(msg.seq))
        elif isinstance(msg, FireFault):
            self._fire(msg)
        else:
            log.error("unexpected_control_message", message=repr(msg))

    def _statistics(self, seq: int) -> LinkStats:
        """For `bridged status`: this connection's bytes, the warnings we logged."""
        up, down = (self.stats["up"], self.stats["down"]) if self.conn_id is not None else (0, 0)
        return LinkStats(seq, os.getpid(), -1 if self.conn_id is None else self.conn_id, up, down,
                         events.count(), events.recent(5))

    def _fire(self, msg: FireFault) -> None:
        """``bridged fault`` for one of our kinds; the front checked it, but it may be compromised."""
        try:
            demand = self.faults.demand(msg, self.loop.time())
        except (FaultError, KeyError) as exc:
            log.error("fault_refused", name=msg.name, error=str(exc).strip("'\""))
            return
        if demand is None:
            return  # aimed at another link
        log.info("fault_armed", name=demand.name, params=dict(demand.params), count=demand.count,
                 seconds=demand.for_)
        if self.sock is not None and self.faults.shapes(self.datagram):
            if self.shaper is None:
                self._stop_batching()  # a batch's tick reads past the Shaper
                self._end_bulk()  # and the Shaper meters every send as it comes
                self.shaper = Shaper(self, self.faults)
            self.shaper.armed(demand.name)

    def _fault_fired(self, name: str, details: dict[str, Any], hits: int) -> None:
        """Injected faults (`hits` of them, the last one's `details`): logged here, counted and marked by the front."""
        log.info("fault_injected", name=name, link=self.link_id, details=details, hits=hits)
        self._reply(FaultFired(name, -1 if self.conn_id is None else self.conn_id, json.dumps(details), hits))

    def _reply(self, msg: object) -> None:
        try:
            send_message(self.control, msg)
        except OSError as exc:  # the front is gone; we stop once its EOF is read
            log.info("front_unreachable", error=str(exc))

    # -- a connection's lifetime ---------------------------------------------------

    def _opened(self, conn_id: int, link_type: str, sock: socket.socket, remote: tuple,
                datagram: bool, udp_mode: int) -> None:
        """A connect or an adoption succeeded: the socket is the link's from now on."""
        self.sock = sock
        self._fresh_timing()
        self.datagram, self.remote, self.udp_mode, self.retargeted = datagram, remote, udp_mode, False
        self.loopback_source = loopback_source(sock) if datagram else None
        self.stats = {"up": 0, "down": 0, "since": self.loop.time()}
        self.shaper = Shaper(self, self.faults) if self.faults.shapes(datagram) else None
        self._apply_options()
        local = sock.getsockname()
        log.info("link_opened", type=link_type, remote=remote[0], port=remote[1], local_port=local[1])
        self._reply(Connected(conn_id, remote[0], remote[1], local[0], local[1]))
        self._resume_reading()
        self._on_uplink()

    def _apply_options(self) -> None:
        if self.sock is None or self.datagram:
            return
        try:
            applied = apply_options(self.sock, self.options)
        except OSError as exc:
            log.warning("socket_options_failed", error=str(exc))
            return
        log.info("socket_options", **applied)
        if self._bulk:
            self._bulk_nodelay(True)  # polled: Nagle off until polling ends (links.bulkpoll)

    def _close(self, conn_id: int, reason: str, flush: bool = False) -> None:
        if conn_id != self.conn_id:
            # Not ours (already ended): answer anyway so the front never waits.
            self._put_eof(conn_id, "not open")
            return
        if self.connecting is not None:
            self.connecting.cancel()
        elif flush and self._closing is None and self._must_flush():
            self._flush_then_finish(reason)
            return
        elif self._closing is not None and flush:
            return  # already closing; a reset's Close (no flush: AT+RST) cuts the flush short
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        """The connection ended (host, peer, error): Ended to the front, then its EOF record."""
        self._end_flush()
        conn_id = self.conn_id
        if conn_id is None:
            return
        stats = self.stats
        self._drop_socket()
        self.conn_id = None
        seconds = round(self.loop.time() - stats["since"], 3) if "since" in stats else 0.0
        log.info("link_closed", reason=reason, bytes_up=stats["up"], bytes_down=stats["down"], seconds=seconds)
        self._reply(Ended(conn_id, reason))
        self._put_eof(conn_id, reason)

    def _drop_socket(self) -> None:
        if self.sock is None:
            return
        self._stop_reading()
        self._stop_sending()
        if self.shaper is not None:
            self.shaper.close()
            self.shaper = None
        self.sock.close()
        self.sock = None
        self.datagram = False
