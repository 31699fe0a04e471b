"""The control socket's server, run by the front on the listener the
supervisor bound (`listen`).

Theory of operation.  Each client connection is one task reading requests
(`bridged.ops.protocol` frames) and answering them through a dispatch table
``{cmd: handler}``: adding an operation (``transcript``, ``fault``) is adding
an entry.  Nothing a client does can stall the daemon or grow without bound:

- at most `MAX_CLIENTS` connections at once; the next one gets an error
  reply ("busy") and is closed;
- a request must arrive whole within `IDLE_TIMEOUT` of the connection or of
  the last reply, and a reply must be taken within `WRITE_TIMEOUT`, else the
  connection is dropped;
- a request over `MAX_REQUEST` bytes is refused unread and the connection
  closed; malformed JSON, a missing ``cmd`` or an unknown one get an error
  reply and the connection stays usable; a handler's exception is our bug:
  logged, answered "internal error".

Who may ask (decided here, documented in the README): the socket file is
mode 0660, owned by the service's user and group, so the file system admits
root, that user and the group's members; the peer's credentials
(SO_PEERCRED, SO_PEERGROUPS) are checked again on every connection, so a
socket made world-writable, or a descriptor handed on, admits nobody else:
uid 0, the daemon's effective uid, or a primary or supplementary group equal
to the daemon's effective gid.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import structlog

from bridged.ops.protocol import HEADER, MAX_REQUEST, ProtocolError, decode, encode, sun_address

__all__ = ["ControlServer", "ListenError", "MAX_CLIENTS", "listen", "unlink"]

log = structlog.get_logger()

MAX_CLIENTS = 16
IDLE_TIMEOUT = 10.0
WRITE_TIMEOUT = 5.0
_BACKLOG = 64
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; not in every Python
_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ListenError(Exception):
    """The control socket cannot be made; str() is the cause and the remedy."""


def listen(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """Bind and listen at ``path``, mode 0660, replacing a stale socket file.

    Returns:
        The listening socket, and the file's identity (device, inode) for `unlink`.

    Raises:
        ListenError: the path is too long, not a socket, served by another
            bridged, or cannot be bound.
    """
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # bind() makes the file 0660 through the umask: no chmod by path afterwards,
    # which would follow a link another user of the folder put in its place.
    old = os.umask(0o117)
    try:
        with sun_address(path) as address:
            sock.bind(address)
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o660:
            raise OSError(f"{path} was replaced as it was made")
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"control socket {path}: {exc.strerror or exc}; "
                          "choose another --control") from None
    finally:
        os.umask(old)
    return sock, (st.st_dev, st.st_ino)


def _clear_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenError(f"control socket {path}: {exc.strerror}; choose another --control") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket; remove it or choose another --control")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with sun_address(path) as address:
            probe.connect(address)
    except OSError as exc:
        if exc.errno != errno.ECONNREFUSED:
            raise ListenError(f"control socket {path}: {exc.strerror}; choose another --control") from None
        os.unlink(path)  # left by a bridged that died: nobody listens
        return
    finally:
        probe.close()
    raise ListenError(f"another bridged serves {path}; stop it, or give this one another "
                      "--state-dir or --control")


def unlink(path: Path, ident: tuple[int, int]) -> None:
    """Remove the socket file if it is still ours (``ident`` from `listen`)."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
    except OSError:
        pass  # gone already, or replaced by someone else's: leave it


def peer_allowed(sock: Any) -> tuple[bool, int]:
    """(whether the peer may use the socket, its uid); see the module's docstring."""
    _pid, uid, gid = _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
    if uid in (0, os.geteuid()) or gid == os.getegid():
        return True, uid
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 65536)
    except OSError:
        return False, uid
    groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return os.getegid() in groups, uid


class ControlServer:
    """Serves the control socket with ``handlers`` (``{cmd: async handler}``)."""

    def __init__(self, listener: socket.socket, handlers: Mapping[str, Handler]) -> None:
        self.listener = listener
        self.handlers = dict(handlers)
        self.clients = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        # The file is the supervisor's (`unlink` at its end): from 3.13 asyncio (and
        # uvloop) would remove it when a front's server closes -- at every reload.
        keep = {"cleanup_socket": False} if sys.version_info >= (3, 13) else {}
        self._server = await asyncio.start_unix_server(self._serve, sock=self.listener, **keep)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= MAX_CLIENTS:
            log.info("control_busy", clients=self.clients)
            await self._refuse(writer, f"busy: {MAX_CLIENTS} clients are connected; try again")
            return
        allowed, uid = peer_allowed(writer.get_extra_info("socket"))
        if not allowed:
            log.warning("control_peer_refused", uid=uid)
            await self._refuse(writer, f"permission denied: uid {uid} is neither root, the service's "
                                       "user nor in its group")
            return
        self.clients += 1
        try:
            while await self._one(reader, writer):
                pass
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            writer.transport.abort()  # a client gone or too slow: drop it, nothing to answer
        except asyncio.CancelledError:
            # The front is stopping with a client connected (`bridged status --watch`).
            # Ending cancelled, Python 3.11's stream server logs the task at error
            # level ("Exception in callback"); end normally, the client dropped.
            writer.transport.abort()
        finally:
            self.clients -= 1
            await self._close(writer)

    async def _refuse(self, writer: asyncio.StreamWriter, why: str) -> None:
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await self._reply(writer, {"ok": False, "error": why})
        except (TimeoutError, ConnectionError):
            writer.transport.abort()
        await self._close(writer)

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        """Close after what was written is sent (abort() would drop it), within WRITE_TIMEOUT."""
        writer.close()
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.wait_closed()
        except (TimeoutError, ConnectionError):
            writer.transport.abort()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read and answer one request; False when the connection should end."""
        async with asyncio.timeout(IDLE_TIMEOUT):
            try:
                header = await reader.readexactly(HEADER.size)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                return False  # closed between requests: the usual end
            (size,) = HEADER.unpack(header)
            if size > MAX_REQUEST:
                log.info("control_request_refused", why="oversize", size=size)
                await self._reply(writer, {"ok": False, "error": f"request of {size} bytes; "
                                                                  f"the limit is {MAX_REQUEST}"})
                return False
            body = await reader.readexactly(size)
        reply = await self._dispatch(body)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await self._reply(writer, reply)
        return True

    async def _dispatch(self, body: bytes) -> dict[str, Any]:
        try:
            request = decode(body)
        except ProtocolError as exc:
            log.info("control_request_refused", why=str(exc)[:100])
            return {"ok": False, "error": str(exc)}
        cmd = request.get("cmd")
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            log.info("control_request_refused", why="unknown cmd", cmd=repr(cmd)[:60])
            return {"ok": False, "error": f"unknown cmd {cmd!r:.60}; known: {known}"}
        try:
            return {"ok": True, **await handler(request)}
        except ValueError as exc:  # the request's own mistake: say which
            log.info("control_request_refused", why=str(exc)[:100], cmd=cmd)
            return {"ok": False, "error": str(exc)}
        except Exception:
            log.exception("control_request_failed", cmd=cmd)
            return {"ok": False, "error": "internal error; the daemon's log has the details"}

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(encode(obj))
        await writer.drain()
