"""A link worker: one process per link slot, moving bytes between its rings
and its socket.

Theory of operation.  The worker has three inputs, each an fd in its event
loop: the control socket (``Connect`` / ``Close`` from the front), the uplink
ring's data doorbell (payload the MCU sent) and the socket.  It has two
outputs: the downlink ring (received data, then one EOF record when the
connection ends) and control replies (``Connected`` / ``ConnectFailed``).

Back-pressure, both ways, without a queue of our own:

* uplink: bytes leave the ring only as fast as ``sock.send`` accepts them.
  The ring and the socket buffer are the "protocol stack" of the front's SEND
  OK (given once a send is in the ring), so a host's Close first hands the
  socket what the ring still holds (``_CLOSE_FLUSH``).  When the socket is
  full we wait for it to be writable and the ring fills up behind it.
* downlink: ``recv`` goes straight into the ring; when the ring is full we
  stop reading the socket (the peer's TCP window closes) and wait for the
  front's space doorbell.

The worker exits when its control socket reaches EOF: the front is gone.

Every remote it uses passes ``[links] allow / deny`` after name resolution
(``bridged.net.fence``): each address a connect tries, each datagram's
destination and sender.  A refused connect fails as an unreachable host
would; a refused datagram is dropped.

Faults (``[faults]``, ``bridged fault``): connects and TLS handshakes ask
``self.faults`` (bridged.links.faults); a connection with a data-path fault
(latency, a bandwidth cap, UDP loss or reordering, a TCP reset) gets a
``Shaper`` (bridged.links.shaping) that takes over its reads and meters its
sends.  Without one, the paths below are exactly as without faults.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import ssl
from collections.abc import Sequence
from typing import Any, Callable

import structlog

from bridged.faults import FaultSpec
from bridged.faults.seed import schedule_start
from bridged.faults.spec import FaultError
from bridged.ipc import records
from bridged.ipc.control import ControlError, recv_message, send_message, socket_from_fd
from bridged.ipc.messages import (
    Adopt,
    Close,
    Connect,
    ConnectFailed,
    Connected,
    Discard,
    Ended,
    FaultFired,
    FireFault,
    Hello,
    LinkStats,
    Refused,
    RemoteChanged,
    SetOptions,
    SetRecvWindow,
    StatsRequest,
)
from bridged.ipc.rings import Ring
from bridged.net.fence import Fence
from bridged.links.faults import Batches, LinkFaults
from bridged.links.shaping import Shaper
from bridged.links.tcp import apply_options, open_tcp
from bridged.links import tls
from bridged.links.udp import loopback_source, open_udp
from bridged.net.interfaces import own_address, station_interface
from bridged.net.policy import LocalPortRefused, Policy, Refusal
from bridged.ops import events
from bridged.pki import PkiStore
from bridged.readgate import ReadGate

__all__ = ["Worker"]

log = structlog.get_logger()

_RECORDS_PER_WAKEUP = 16  # bound one wake-up's work so other fds get their turn
_MAX_DATAGRAM = 65536
_TLS_WRITE = 16384  # one TLS record per write; a retry must repeat the same length
_TLS_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_HANDSHAKE_TIMEOUT = 10.0  # a server-side handshake (the spec's per-packet 10 s)
# Reads closer together than this are a stream: read until the kernel says
# EAGAIN, and (outside a read window) read again only after this pause, so
# the kernel gathers what arrives meanwhile: a link busy both ways wakes its
# worker and the front for several segments at a time, and an answer waits
# at most this long.
_STREAMING = 0.004
# A read window opens only for pieces at least this big (bulk, not keystrokes)...
_WINDOW_PIECE = 512
# ... and only once the MCU has sent nothing for this many windows (the peer
# may be answering it: an answer is read at once, and a link busy both ways
# would open and close its window all the time).
_WINDOW_QUIET = 4
# A read window's next tick is at least this far off: uvloop's clock ticks
# in whole milliseconds, and a timer due sooner would fire at once.
_TICK_MARGIN = 0.001
_SPACE_POLL = 0.05  # seconds between looks at the downlink's free space while waiting for it
# A host's close hands the socket what the front admitted (SEND OK said it was
# sent) before closing, as lwIP's close sends its buffer; a peer that never
# reads it gets the close after this many seconds anyway.
_CLOSE_FLUSH = 5.0


class Worker:
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
        # Records may be larger than one +IPD: the front cuts them into <chunk>
        # frames, so each wake-up moves more bytes for the same overhead.
        self.chunk = downlink.capacity // 4
        self.connect_timeout_ms = connect_timeout_ms
        self.pki = pki
        self.read_window = read_window_ms / 1000  # 0: read every piece as it arrives
        self.ipd_chunk = ipd_chunk
        self._tls_retry = 0  # length of a TLS write to repeat after WANT_WRITE
        self.loop = asyncio.get_running_loop()
        self.fence = Fence(policy or Policy(), self.loop.time)
        self.station = station  # wifi.station_interface: UDP links bind its address
        self.sock: socket.socket | None = None
        self.conn_id: int | None = None
        self.connecting: asyncio.Task | None = None
        self.stats = {"up": 0, "down": 0}
        self.options = SetOptions()
        self.window = 0  # passive mode: most unread bytes to keep in the downlink ring
        self._gate: ReadGate | None = None  # created in run(), on the running loop
        self._last_read = 0.0
        self._last_send = 0.0  # when the MCU's data last went to the socket
        self._window_tick: asyncio.TimerHandle | None = None  # armed while a read window is on
        self._lowat_raised = False  # the socket's SO_RCVLOWAT is one +IPD chunk
        self._pause: asyncio.TimerHandle | None = None  # a stream's reads, _STREAMING apart
        # UDP: datagrams keep their boundaries both ways; the remote may move
        # (AT+CIPSTART <mode> 1: once, 2: to every sender).
        self.datagram = False
        self.remote: tuple | None = None
        self.udp_mode = 0
        self.retargeted = False
        self.loopback_source: str | None = None  # a UDP link sending from 127.0.0.1 (udp.loopback_source)
        self._dgram_buf = bytearray(_MAX_DATAGRAM)
        self._pending_eof: list[bytes] = []  # EOF records waiting for ring space
        self._waiting_space: Callable[[], None] | None = None
        self._space_poll: asyncio.TimerHandle | None = None
        self._space_need = 64  # bytes of downlink room the wait is for
        self._closing: asyncio.TimerHandle | None = None  # a host's Close waits for the uplink to flush
        self._closing_reason = ""
        self.front_gone = False  # ended because the front's end of the control socket closed
        # [faults] (bridged.links.faults): the connect and TLS hooks ask it; a
        # connection with a data-path fault gets a Shaper (None: the paths below run as they are).
        self._fault_reports = Batches(self.loop, self._fault_fired)
        self.faults = LinkFaults(faults, fault_seed, link_id, schedule_start(self.loop.time())[0],
                                 self._fault_reports.fired)
        self.shaper: Shaper | None = None
        self._done = self.loop.create_future()

    # -- lifetime ------------------------------------------------------------------

    async def run(self) -> None:
        self.control.setblocking(False)
        # Bytes a dead predecessor left in the uplink ring stay until the next
        # Connect discards them: consuming them now would look like SEND OK.
        self.loop.add_reader(self.control.fileno(), self._on_control)
        self.loop.add_reader(self.uplink.data_fd, self._on_uplink)
        self._gate = ReadGate(self.loop, self._on_readable)
        # The front frees downlink space all the time; we only care while waiting for it.
        self.downlink.want_space_doorbell(False)
        # A worker restarted while the daemon stops may find the front gone:
        # that is the front's EOF to read next, not a crash.
        self._reply(Hello(self.link_id, os.getpid()))
        try:
            await self._done
        finally:
            self.loop.remove_reader(self.control.fileno())
            self.loop.remove_reader(self.uplink.data_fd)
            self._drop_socket()
            self._gate.close()
            self._fault_reports.close()

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
            try:  # a TCP client of the front's server, nothing else
                sock = _connected(socket_from_fd(fds[0], (socket.AF_INET, socket.AF_INET6), socket.SOCK_STREAM))
            except ControlError as exc:
                log.error("adopt_refused", conn_id=msg.conn_id, error=str(exc))
                self._reply(ConnectFailed(msg.conn_id, f"not a TCP socket: {exc}"))
                return
            self._adopt(msg, sock)
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
        elif isinstance(msg, SetOptions):
            self.options = msg
            self._apply_options()
        elif isinstance(msg, Discard):
            if msg.conn_id == self.conn_id and self.uplink.read_index < msg.upto:
                self.uplink.consume(min(msg.upto - self.uplink.read_index, self.uplink.available()))
        elif isinstance(msg, SetRecvWindow):
            self.window = msg.window
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
                self._stop_window()  # the window's tick reads past the Shaper
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

    # -- connecting ----------------------------------------------------------------

    def _start_connect(self, msg: Connect) -> None:
        if self.conn_id is not None:
            self._reply(ConnectFailed(msg.conn_id, f"link {self.link_id} is busy"))
            return
        self.conn_id = msg.conn_id
        self.uplink.discard_all()
        self.connecting = self.loop.create_task(self._connect(msg))

    async def _connect(self, msg: Connect) -> None:
        datagram = msg.link_type.startswith("UDP")
        try:
            if datagram:
                sock, remote = await self._open_udp(msg)
            elif msg.link_type.startswith("SSL"):
                sock = await self._open_tls(msg)
                remote = sock.getpeername()
            else:
                await self.faults.before_connect(msg, self.connect_timeout_ms, self.loop.time())
                sock = await open_tcp(msg, self.connect_timeout_ms, self._check)
                remote = sock.getpeername()
        except (OSError, TimeoutError, ValueError) as exc:
            reason = _reason(exc)
            log.warning("connect_failed", type=msg.link_type, host=msg.host, port=msg.port, reason=reason)
            self.conn_id = None
            self._reply(ConnectFailed(msg.conn_id, reason))
            return
        finally:
            self.connecting = None
        self._opened(msg.conn_id, msg.link_type, sock, remote, datagram, msg.udp_mode)

    def _check(self, address: str, port: int) -> Refusal | None:
        return None if self.fence.open else self.fence.check(address, port)

    async def _open_udp(self, msg: Connect) -> tuple[socket.socket, tuple]:
        """The local port must be in [links] local_ports; the socket binds the station's address."""
        if not self.fence.policy.local_port_allowed(msg.local_port):
            log.warning("local_port_refused", port=msg.local_port, local_ports=self.fence.policy.local_ports)
            raise LocalPortRefused(f"local port {msg.local_port} is outside [links] local_ports")
        name = station_interface(self.station)
        try:
            index = socket.if_nametoindex(name)
        except OSError:
            index = 0
        station_ip = own_address(name, msg.link_type.endswith("v6"))
        return await open_udp(msg, self.connect_timeout_ms, self._check, station_ip, index)

    async def _open_tls(self, msg: Connect) -> ssl.SSLSocket:
        """TCP connect, then the TLS handshake, all within the connect timeout."""
        started = self.loop.time()
        await self.faults.before_connect(msg, self.connect_timeout_ms, started)
        raw = await open_tcp(msg, self.connect_timeout_ms, self._check)
        failed = self.faults.handshake_fails(self.loop.time(), "client")
        if failed is not None:
            raw.close()  # the server sees the client give up
            raise failed
        try:
            sock = tls.wrap_client(raw, msg, self.pki)
        except BaseException:
            raw.close()
            raise
        left = (msg.timeout_ms or self.connect_timeout_ms) / 1000 - (self.loop.time() - started)
        try:
            async with asyncio.timeout(max(left, 0.001)):
                await tls.handshake(sock)
            if msg.tls_auth in (2, 3):
                tls.check_name(sock, msg.tls_cn or msg.host)
                tls.check_dates(sock, msg.tls_time)
        except BaseException:
            sock.close()
            raise
        return sock

    def _adopt(self, msg: Adopt, sock: socket.socket) -> None:
        """A client of the front's server: ours from now on, like a connected one."""
        if self.conn_id is not None:
            sock.close()
            self._reply(ConnectFailed(msg.conn_id, f"link {self.link_id} is busy"))
            return
        self.conn_id = msg.conn_id
        self.uplink.discard_all()
        sock.setblocking(False)
        if msg.link_type.startswith("SSL"):
            self.connecting = self.loop.create_task(self._adopt_tls(msg, sock))
            return
        self._opened(msg.conn_id, msg.link_type, sock, sock.getpeername(), datagram=False, udp_mode=0)

    async def _adopt_tls(self, msg: Adopt, raw: socket.socket) -> None:
        remote = raw.getpeername()
        failed = self.faults.handshake_fails(self.loop.time(), "server")
        if failed is not None:
            raw.close()
            self.connecting = None
            self._adopt_failed(msg, remote, failed)
            return
        try:
            sock = tls.wrap_server(raw, msg, self.pki)
        except (OSError, ValueError) as exc:
            raw.close()
            self._adopt_failed(msg, remote, exc)
            return
        try:
            async with asyncio.timeout(_HANDSHAKE_TIMEOUT):
                await tls.handshake(sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            self._adopt_failed(msg, remote, exc)
            return
        finally:
            self.connecting = None
        self._opened(msg.conn_id, msg.link_type, sock, remote, datagram=False, udp_mode=0)

    def _adopt_failed(self, msg: Adopt, remote: tuple, exc: BaseException) -> None:
        log.warning("server_handshake_failed", remote=remote[0], port=remote[1], reason=_reason(exc))
        self.conn_id = None
        self._reply(ConnectFailed(msg.conn_id, _reason(exc)))

    def _opened(self, conn_id: int, link_type: str, sock: socket.socket, remote: tuple,
                datagram: bool, udp_mode: int) -> None:
        self.sock = sock
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

    # -- uplink: ring -> socket -----------------------------------------------------

    def _on_uplink(self) -> None:
        self.uplink.clear_data_doorbell()
        self.uplink.hold_doorbells()  # one progress doorbell for all the sends below
        try:
            self._pump_uplink()
        finally:
            self.uplink.release_doorbells()

    def _pump_uplink(self) -> None:
        self._pump_ring()
        if self._closing is not None and (self.sock is None or not self.uplink.available()):
            self._finish(self._closing_reason)

    def _pump_ring(self) -> None:
        if self.datagram:
            self._send_datagrams()
            return
        while self.sock is not None and self.uplink.available():
            size = self.uplink.available()
            if self.shaper is not None:  # a bandwidth cap (0: the Shaper pumps again later)
                size = self.shaper.up_allowance(size, self._tls_retry)
                if not size:
                    return
            views = self.uplink.readable_views(size)
            try:
                if isinstance(self.sock, ssl.SSLSocket):
                    sent = self._send_tls(views[0])
                else:
                    sent = self.sock.sendmsg(views) if len(views) > 1 else self.sock.send(views[0])
            except (BlockingIOError, *_TLS_AGAIN):
                sent = 0
            except OSError as exc:
                sent = -1
                reason = f"send failed: {exc.strerror or exc}"
            finally:
                for view in views:
                    view.release()
            if sent < 0:
                self._finish(reason)
                return
            if sent == 0:
                self.loop.add_writer(self.sock.fileno(), self._on_writable)
                return
            self.uplink.consume(sent)
            self.stats["up"] += sent
            if self.shaper is not None:
                self.shaper.sent(sent)
            self._last_send = self.loop.time()
            if self._window_tick is not None:
                self._stop_window()  # the peer may answer this at once: read it at once

    def _send_tls(self, view: memoryview) -> int:
        # OpenSSL wants a write retried after WANT_WRITE with the same length.
        size = self._tls_retry or min(len(view), _TLS_WRITE)
        self._tls_retry = size
        sent = self.sock.send(view[:size])
        self._tls_retry = 0
        return sent

    def _send_datagrams(self) -> None:
        """Each uplink record is one datagram, to its own address or the remote."""
        while self.sock is not None:
            header = records.peek_record_header(self.uplink)
            if header is None:
                return
            target = header.addr or self.remote
            # The remote too, every time (the fence remembers verdicts for a
            # second): "self" grows when the gateway takes a new address.
            if not self.fence.open and not self._may_send(target):
                self.uplink.consume(header.total)  # lost, as a datagram to an unreachable host
                continue
            if self.shaper is not None and not self.shaper.up_allowance(1):
                return  # a bandwidth cap: a datagram goes whole once the bucket holds some
            payload = self.uplink.peek(header.length, header.size)
            try:
                self.sock.sendto(payload, target)
            except BlockingIOError:
                self.loop.add_writer(self.sock.fileno(), self._on_writable)
                return
            except OSError as exc:
                # A datagram that cannot go is lost, as lwIP would lose it.
                log.warning("datagram_dropped", to=str(header.addr or self.remote), reason=_reason(exc))
            self.uplink.consume(header.total)
            self.stats["up"] += header.length
            if self.shaper is not None:
                self.shaper.sent(header.length)

    def _may_send(self, target: tuple) -> bool:
        """A datagram from a loopback source can reach only this host (a group's
        too, on lo): it must also pass as sent to that source."""
        if not self.fence.admit(target, "send"):
            return False
        return self.loopback_source is None or self.fence.admit((self.loopback_source, target[1]), "send")

    def _on_writable(self) -> None:
        if self.sock is not None:
            self.loop.remove_writer(self.sock.fileno())
        self._on_uplink()

    # -- downlink: socket -> ring ---------------------------------------------------

    def _on_readable(self) -> None:
        if self.shaper is not None:  # a data-path fault (bridged.links.shaping)
            self.shaper.on_readable()
            return
        now = self.loop.time()
        since, self._last_read = now - self._last_read, now
        # One doorbell for all the records of this wake-up: the front wakes once.
        ring = self.downlink
        ring.hold_doorbells()
        try:
            if self.datagram:
                got = self._recv_datagrams()
            else:
                got = self._recv_stream(since < _STREAMING or self._window_tick is not None)
        finally:
            ring.release_doorbells()
        if got < _WINDOW_PIECE or self._window_tick is not None or self.sock is None:
            return
        if since < self.read_window and now - self._last_send > _WINDOW_QUIET * self.read_window \
                and self._can_window():
            self._start_window()
        elif since < _STREAMING and self._gate.is_open:
            self._pause_reading()
            self._pause = self.loop.call_later(_STREAMING, self._end_pause)

    def _end_pause(self) -> None:
        self._pause = None
        self._resume_reading()

    # -- the read window: one wake-up for a window's worth of a stream -------------
    #
    # A peer streaming at UART rates (the UART, not the network, sets the pace
    # on a gateway) sends a segment every few ms; reading each as it lands
    # costs the worker and the front a wake-up apiece.  Once two reads come
    # within one window, the socket's SO_RCVLOWAT rises to one +IPD chunk, so
    # the kernel wakes us only when a whole chunk has gathered, and a timer
    # reads whatever is there at the window's end.  The timers of all workers
    # fall on one grid (the monotonic clock is shared), so the front wakes
    # once for all links.  Never held back: a lone piece after a quiet spell
    # (a tick that finds nothing ends the window), small pieces (interactive
    # traffic), and the answer to what the MCU sent (sending ends the window,
    # and none opens until the MCU has been quiet for a few windows).  The
    # peer's FIN and errors wake us regardless of SO_RCVLOWAT.

    def _can_window(self) -> bool:
        # Passive mode keeps its data here anyway; datagrams have no low-water mark.
        return (self.read_window > 0 and not self.datagram and not self.window
                and self.sock is not None and self._gate.is_open and self.shaper is None)

    def _start_window(self) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self.ipd_chunk)
        except OSError as exc:
            log.warning("read_window_unavailable", reason=_reason(exc))
            self.read_window = 0
            return
        self._lowat_raised = True
        self._arm_window_tick()

    def _arm_window_tick(self) -> None:
        window = self.read_window
        due = (math.floor((self.loop.time() + _TICK_MARGIN) / window) + 1) * window
        self._window_tick = self.loop.call_at(due, self._on_window_tick)

    def _on_window_tick(self) -> None:
        self._window_tick = None
        if not self._can_window():
            self._stop_window()
            return
        self._last_read = self.loop.time()
        ring = self.downlink
        ring.hold_doorbells()
        try:
            # One recv takes all the kernel has (up to a record): a short read
            # means the socket is empty, so no EAGAIN round trip.
            got = self._recv_stream(False)
        finally:
            ring.release_doorbells()
        if got and self._window_tick is None and self._can_window():
            self._arm_window_tick()
        else:
            self._stop_window()  # quiet for a whole window, or the read ended it

    def _stop_window(self) -> None:
        """Back to reading every piece at once (the invariant: a raised
        low-water mark always has a tick armed that will read below it)."""
        if self._window_tick is not None:
            self._window_tick.cancel()
            self._window_tick = None
        if self._lowat_raised:
            self._lowat_raised = False
            if self.sock is not None:
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                except OSError:
                    pass  # the socket failed: its next read says why

    def _recv_stream(self, streaming: bool) -> int:
        """Receive into the downlink ring; return the byte count (the hot path: keep it lean).

        While data streams in, read until the kernel says EAGAIN (more keeps
        arriving meanwhile); a lone piece is read once.
        """
        sock, ring, window = self.sock, self.downlink, self.window
        if sock is None:
            return 0  # a call_soon'd read after the socket was dropped
        tls = isinstance(sock, ssl.SSLSocket)
        got = 0
        for _ in range(_RECORDS_PER_WAKEUP):
            limit = self.chunk
            if window:
                # Passive mode: the unread data must stay within the receive
                # window, so the peer's TCP window closes once it is full.
                limit = min(limit, window - ring.available())
            try:
                n = records.recv_record(ring, sock, limit, datagram=False, fill=tls) if limit > 0 else -1
            except (BlockingIOError, *_TLS_AGAIN):
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                n = 0
            except OSError as exc:
                self._finish(f"receive failed: {exc.strerror or exc}")
                break
            if n == 0:
                self._finish("peer closed")
                break
            if n < 0:
                self._pause_reading()
                self._stop_window()
                # A full receive window (passive mode) waits for a read to make
                # room in it; the ring has plenty, and waiting for ring space
                # would resume at once and spin.
                need = ring.capacity - window + 1 if window and limit <= 0 else 64
                self._wait_space(self._resume_reading, need=max(need, 64))
                break
            got += n
            if n < limit and not (streaming or tls):
                break  # a short read of a lone piece: another recv would only say EAGAIN
        else:
            if tls and sock.pending():
                # Decrypted bytes wait inside OpenSSL: no fd event will announce them.
                self.loop.call_soon(self._on_readable)
        self.stats["down"] += got
        return got

    def _recv_datagrams(self) -> int:
        """Receive datagrams into the downlink ring; return the payload byte count."""
        got = 0
        for _ in range(_RECORDS_PER_WAKEUP):
            if self.sock is None:
                break
            room = self.downlink.capacity // 2  # every datagram we keep fits in this
            if not self.window and self.downlink.free() < room:
                # Active mode: wait for the front rather than drop.
                self._pause_reading()
                self._wait_space(self._resume_reading, need=room)
                break
            try:
                n, sender = self.sock.recvfrom_into(self._dgram_buf)
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("receive_failed", reason=_reason(exc))
                break
            if not self.fence.open and not self.fence.admit(sender, "receive"):
                continue  # from a refused address: neither delivered nor a new remote
            self._retarget(sender)
            if not n:
                # Nothing to deliver (active mode printed nothing for it); kept,
                # it would be a passive read of 0 bytes after a notice of more.
                continue
            unread = self.downlink.available()
            # Passive mode with a full window: UDP data is lost (AT+CIPRECVTYPE).
            # With nothing unread a datagram larger than the window is kept,
            # else it could never be read (ESP-AT queues datagrams, not bytes).
            if n > room - 32 or (self.window and unread and unread + n > self.window):
                log.debug("datagram_dropped", length=n, unread=unread)
                continue
            with memoryview(self._dgram_buf) as view:
                records.put_record(self.downlink, records.DATA, view[:n], sender)
            got += n
        self.stats["down"] += got
        return got

    def _retarget(self, sender: tuple) -> None:
        """AT+CIPSTART's UDP <mode>: 1 moves the remote once, 2 to every sender."""
        if self.udp_mode == 0 or sender[:2] == self.remote[:2]:
            return
        if self.udp_mode == 1 and self.retargeted:
            return
        self.remote, self.retargeted = sender, True
        self._reply(RemoteChanged(self.conn_id, sender[0], sender[1]))

    def _pause_reading(self) -> None:
        self._gate.shut()

    def _resume_reading(self) -> None:
        if self.sock is not None and not self._gate.is_open:
            self._gate.open(self.sock.fileno())
            if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
                # Decrypted bytes wait inside OpenSSL: no fd event will announce them.
                self.loop.call_soon(self._on_readable)

    def _wait_space(self, then: Callable[[], None], need: int = 64) -> None:
        """Call ``then`` once the front has freed ``need`` bytes of the downlink ring."""
        self._waiting_space = then
        self._space_need = need
        self.downlink.want_space_doorbell(True)
        self.downlink.clear_space_doorbell()
        self.loop.add_reader(self.downlink.space_fd, self._on_space)
        self._poll_space()

    def _poll_space(self) -> None:
        """Look at the free space now and every _SPACE_POLL while waiting: the
        front may have consumed before it saw that we want its doorbell."""
        self._space_poll = None
        if self._waiting_space is None:
            return
        if self.downlink.free() >= self._space_need:
            self.loop.call_soon(self._on_space)
        else:
            self._space_poll = self.loop.call_later(_SPACE_POLL, self._poll_space)

    def _on_space(self) -> None:
        if self._waiting_space is not None and self.downlink.free() < self._space_need:
            # Some room, not enough yet (a datagram needs half the ring): keep
            # waiting rather than wake the reader to find it still full.
            self.downlink.clear_space_doorbell()
            return
        self.loop.remove_reader(self.downlink.space_fd)
        self.downlink.want_space_doorbell(False)
        if self._space_poll is not None:
            self._space_poll.cancel()
            self._space_poll = None
        then, self._waiting_space = self._waiting_space, None
        self._flush_eofs()
        if then is not None:
            then()

    # -- ending a connection --------------------------------------------------------

    def _close(self, conn_id: int, reason: str, flush: bool = False) -> None:
        if conn_id != self.conn_id:
            # Not ours (already ended): answer anyway so the front never waits.
            self._put_eof(conn_id, "not open")
            return
        if self.connecting is not None:
            self.connecting.cancel()
        elif flush and self._closing is None and self._must_flush():
            self._closing_reason = reason
            self._closing = self.loop.call_later(_CLOSE_FLUSH, self._finish, reason)
            self._on_uplink()  # finishes once the ring is empty
            return
        elif self._closing is not None and flush:
            return  # already closing; a reset's Close (no flush: AT+RST) cuts the flush short
        self._finish(reason)

    def _must_flush(self) -> bool:
        """Admitted bytes wait in the ring, and so_linger 0 does not ask for a reset."""
        return self.sock is not None and self.uplink.available() > 0 and self.options.linger != 0

    def _finish(self, reason: str) -> None:
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None
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
        self._gate.shut()
        self.loop.remove_writer(self.sock.fileno())
        self._lowat_raised = False  # the socket closes: no need to lower it first
        self._stop_window()
        if self._pause is not None:
            self._pause.cancel()
            self._pause = None
        if self.shaper is not None:
            self.shaper.close()
            self.shaper = None
        self.sock.close()
        self.sock = None
        self.datagram = False
        self._tls_retry = 0

    def _put_eof(self, conn_id: int, reason: str) -> None:
        self._pending_eof.append(f"{conn_id} {reason}".encode())
        self._flush_eofs()

    def _flush_eofs(self) -> None:
        while self._pending_eof:
            if not records.put_record(self.downlink, records.EOF, self._pending_eof[0]):
                if self._waiting_space is None:
                    self._wait_space(lambda: None)
                return
            self._pending_eof.pop(0)


def _reason(exc: BaseException) -> str:
    """A log-friendly reason; ESP-AT's MCU only ever sees ERROR."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, PermissionError):
        return f"{exc.strerror}: ports below 1024 need CAP_NET_BIND_SERVICE"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _connected(sock: socket.socket) -> socket.socket:
    """``sock`` if it has a peer (an accepted client); else it is closed.

    Raises:
        ControlError: unconnected or listening: adopting it would fail later,
            with the link already taken.
    """
    try:
        sock.getpeername()
    except OSError as exc:
        sock.close()
        raise ControlError(f"the socket received has no peer ({exc.strerror})") from None
    return sock
