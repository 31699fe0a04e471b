"""A link worker's connections coming to be: ``Connect`` and ``Adopt`` (a part of ``Worker``).

Theory of operation.  A link takes one connection at a time: a ``Connect``
or ``Adopt`` while one is open or coming is answered ``ConnectFailed``
("busy").  ``Connect`` opens what AT+CIPSTART asked for (TCP, UDP, or TCP
then the TLS handshake), all within the connect timeout; ``Adopt`` takes a
client of the front's server, an SSL one after the server's handshake
(``_HANDSHAKE_TIMEOUT``).  Either is answered ``Connected`` once the socket
is ours (``Worker._opened``), or ``ConnectFailed`` with a reason for the
log (the MCU only ever sees ERROR).

What may wait (resolution, connect, handshake) runs as a task in the
worker's TaskGroup (``Worker._spawn``; ``self.connecting`` while it runs): a
host's Close cancels it, and the Close's answer (Ended, EOF) is the only
one.  A failure we expect is a reason; anything else escapes the task,
fails the TaskGroup and ends the worker (our bug, logged with its
traceback by ``bridged.links.main``).

Every address a connect tries passes ``[links] allow / deny`` first
(``_check``); ``[faults]`` may refuse, delay or break connects and
handshakes (``self.faults``: bridged.links.faults).
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import structlog

from bridged.ipc.control import ControlError
from bridged.ipc.messages import Adopt, Connect, ConnectFailed
from bridged.links import tls
from bridged.links.tcp import open_tcp
from bridged.links.udp import open_udp
from bridged.net.interfaces import own_address, station_interface
from bridged.net.policy import LocalPortRefused, Refusal

__all__ = ["Connecting", "failure_reason", "connected_socket"]

log = structlog.get_logger()

_HANDSHAKE_TIMEOUT = 10.0  # a server-side handshake (the spec's per-packet 10 s)


def failure_reason(exc: BaseException) -> str:
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


def connected_socket(sock: socket.socket) -> socket.socket:
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


class Connecting:
    """Connect and Adopt; a part of ``bridged.links.worker.Worker`` (uses its attributes)."""

    def _start_connect(self, msg: Connect) -> None:
        if self.conn_id is not None:
            self._reply(ConnectFailed(msg.conn_id, f"link {self.link_id} is busy"))
            return
        task = self._spawn(self._connect(msg), msg.conn_id)
        if task is None:  # the worker is ending (a task failed): the front must not wait on
            self._reply(ConnectFailed(msg.conn_id, "the link worker is ending"))
            return
        self.conn_id = msg.conn_id
        self.uplink.discard_all()
        self.connecting = task

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
                sock, remote = await open_tcp(msg, self.connect_timeout_ms, self._check)
        except (OSError, TimeoutError, ValueError) as exc:
            why = failure_reason(exc)
            log.warning("connect_failed", type=msg.link_type, host=msg.host, port=msg.port, reason=why)
            self.conn_id = None
            self._reply(ConnectFailed(msg.conn_id, why))
            return
        finally:
            self._connect_over()
        if self._still_wanted(msg.conn_id, sock):
            self._opened(msg.conn_id, msg.link_type, sock, remote, datagram, msg.udp_mode)

    def _connect_over(self) -> None:
        """Forget the running connect, if it is this task: a Close cancels a connect and the
        next Connect may start before the cancelled one has wound down."""
        if self.connecting is asyncio.current_task():
            self.connecting = None

    def _still_wanted(self, conn_id: int, sock: socket.socket) -> bool:
        """Whether a finished connect's socket is the link's: a cancel can be lost (3.11's
        wait_for, in dnspython's resolver, returns a result that came with it), and a connect
        the host closed, or one under way at stop(), must not be opened."""
        if self.conn_id == conn_id and not asyncio.current_task().cancelling():
            return True
        sock.close()
        log.info("connect_outlived", conn_id=conn_id)
        return False

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
        raw, _ = await open_tcp(msg, self.connect_timeout_ms, self._check)
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
        try:
            remote = sock.getpeername()
        except OSError as exc:  # reset since connected_socket looked: ENOTCONN (a task would fail the worker)
            sock.close()
            log.warning("adopt_failed", conn_id=msg.conn_id, reason=failure_reason(exc))
            self._reply(ConnectFailed(msg.conn_id, failure_reason(exc)))
            return
        task = None
        if msg.link_type.startswith("SSL"):
            task = self._spawn(self._adopt_tls(msg, sock, remote), msg.conn_id)
            if task is None:  # the worker is ending (a task failed)
                sock.close()
                self._reply(ConnectFailed(msg.conn_id, "the link worker is ending"))
                return
        self.conn_id = msg.conn_id
        self.uplink.discard_all()
        sock.setblocking(False)
        if task is not None:
            self.connecting = task
            return
        self._opened(msg.conn_id, msg.link_type, sock, remote, datagram=False, udp_mode=0)

    async def _adopt_tls(self, msg: Adopt, raw: socket.socket, remote: tuple) -> None:
        try:
            sock = await self._server_handshake(msg, raw)
        except (OSError, TimeoutError, ValueError) as exc:
            self._adopt_failed(msg, remote, exc)
            return
        finally:
            self._connect_over()  # every way out: a task left as the running connect turns a Close into a cancel
        if self._still_wanted(msg.conn_id, sock):
            self._opened(msg.conn_id, msg.link_type, sock, remote, datagram=False, udp_mode=0)

    async def _server_handshake(self, msg: Adopt, raw: socket.socket) -> ssl.SSLSocket:
        """The TLS server's side of an adopted client, within _HANDSHAKE_TIMEOUT; closes it on failure."""
        failed = self.faults.handshake_fails(self.loop.time(), "server")
        if failed is not None:
            raw.close()
            raise failed
        try:
            sock = tls.wrap_server(raw, msg, self.pki)
        except BaseException:
            raw.close()
            raise
        try:
            async with asyncio.timeout(_HANDSHAKE_TIMEOUT):
                await tls.handshake(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _adopt_failed(self, msg: Adopt, remote: tuple, exc: BaseException) -> None:
        log.warning("server_handshake_failed", remote=remote[0], port=remote[1], reason=failure_reason(exc))
        self.conn_id = None
        self._reply(ConnectFailed(msg.conn_id, failure_reason(exc)))
