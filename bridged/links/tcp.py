"""Opening TCP connections the way AT+CIPSTART asks for them."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from bridged.ipc.messages import Connect, SetOptions
from bridged.net.policy import DestinationRefused, Refusal
from bridged.net.resolver import resolve, sockaddr

__all__ = ["open_tcp", "apply_keep_alive", "apply_options"]


def apply_keep_alive(sock: socket.socket, seconds: int) -> None:
    """ESP-AT's keep_alive: off at 0, else KEEPIDLE=<s>, KEEPINTVL=1, KEEPCNT=3."""
    if seconds <= 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def apply_options(sock: socket.socket, options: SetOptions) -> dict[str, int]:
    """Set AT+CIPTCPOPT's options; return them as read back with getsockopt."""
    linger = struct.pack("ii", 0, 0) if options.linger < 0 else struct.pack("ii", 1, options.linger)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if options.nodelay else 0)
    apply_keep_alive(sock, options.keep_alive)
    on, seconds = struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
    keep = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    return {
        "so_linger": seconds if on else -1,
        "tcp_nodelay": int(bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))),
        "keep_alive": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) if keep else 0,
    }


def _no_check(address: str, port: int) -> Refusal | None:
    return None


def _peer(sock: socket.socket, addr: tuple) -> tuple:
    """The connected peer's address.  A peer that reset the connection right after its accept
    (SO_LINGER 0) leaves none to ask (ENOTCONN): the address connected to, then.  The connect
    succeeded, so the link opens and its CLOSED follows, as on ESP-AT (not ERROR)."""
    try:
        return sock.getpeername()
    except OSError:
        return addr


async def open_tcp(request: Connect, default_timeout_ms: int,
                   check: Callable[[str, int], Refusal | None] = _no_check) -> tuple[socket.socket, tuple]:
    """Resolve and connect; return a connected non-blocking socket and its peer's address.

    Every address the name resolved to is tried in turn, except those
    ``check`` refuses ([links] allow/deny): it sees each before its connect.

    Raises:
        OSError: name resolution or every connection attempt failed
            (DestinationRefused when the policy refused the last address).
        TimeoutError: the timeout of AT+CIPSTART (or the profile's) passed.
    """
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if request.link_type.endswith("v6") else socket.AF_INET
    timeout = (request.timeout_ms or default_timeout_ms) / 1000
    async with asyncio.timeout(timeout):
        # AT+CIPDNS's manual servers when the MCU set them; an address literal is never looked up.
        addresses = await resolve(request.host, family, request.dns_servers, timeout)
        error: OSError = OSError(f"no address for {request.host}")
        for address in addresses:
            refusal = check(address, request.port)
            if refusal is not None:
                error = DestinationRefused(refusal)
                continue
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                addr = sockaddr(address, request.port)  # an unknown zone: gaierror, an OSError
                sock.setblocking(False)
                if request.local_ip:
                    sock.bind((request.local_ip, 0))
                await loop.sock_connect(sock, addr)
            except ConnectionResetError:
                # Connected, and reset before the loop looked (a refused connect is ECONNREFUSED):
                # a peer that accepts and resets at once.  The link opens; its CLOSED follows.
                return sock, addr
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock, _peer(sock, addr)
        raise error

