"""ICMP echo (ping) over Linux sockets, for AT+PING; knows nothing of ESP-AT.

Theory of operation: one echo request, one wait for its reply.

* Socket kind.  An unprivileged ICMP datagram socket ("ping socket",
  ``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``, and IPPROTO_ICMPV6) is tried
  first: the kernel allows it to groups in ``net.ipv4.ping_group_range`` (one
  sysctl for both families), picks the echo identifier (the socket's "port")
  and hands the socket only replies carrying it.  Otherwise a raw socket, which
  needs CAP_NET_RAW and sees every ICMP packet the host receives (our own
  requests on loopback, other programs' replies, errors), so replies are
  matched by type, identifier, sequence number and payload.  Neither allowed:
  ``PingNotPermitted``, whose message says how to allow one.
* Checksums.  The kernel fills in the checksum of a datagram socket's ICMP
  and of every ICMPv6 message (RFC 3542: IPV6_CHECKSUM is always on for raw
  ICMPv6); a raw IPv4 socket sends what we computed.  A raw IPv4 socket reads
  the IP header too, datagram sockets and ICMPv6 start at the ICMP header.
* Waiting.  The socket is non-blocking and read from the running loop's reader
  callback (asyncio or uvloop); the send and the wait for the reply together
  are bounded by ``timeout``.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import ipaddress
import itertools
import os
import socket
import struct
import time

__all__ = ["SocketKind", "PingNotPermitted", "PingTimeout", "datagram_allowed", "open_icmp_socket", "echo",
           "ECHO_PAYLOAD_SIZE"]

ECHO_PAYLOAD_SIZE = 32  # bytes of data after the 8-byte ICMP header, as ESP-IDF's esp_ping sends

_ECHO_REQUEST = {socket.AF_INET: 8, socket.AF_INET6: 128}
_ECHO_REPLY = {socket.AF_INET: 0, socket.AF_INET6: 129}
_PROTOCOL = {socket.AF_INET: socket.IPPROTO_ICMP, socket.AF_INET6: socket.IPPROTO_ICMPV6}
_HEADER = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence

_sequence = itertools.count(1)


class SocketKind(enum.Enum):
    DATAGRAM = "datagram"  # unprivileged ping socket (net.ipv4.ping_group_range)
    RAW = "raw"  # needs CAP_NET_RAW


class PingNotPermitted(PermissionError):
    """Neither an ICMP datagram socket nor a raw socket may be opened here."""


class PingTimeout(TimeoutError):
    """No echo reply within the timeout."""


def open_icmp_socket(family: int, kind: SocketKind | None = None) -> tuple[socket.socket, SocketKind]:
    """A non-blocking ICMP (AF_INET) or ICMPv6 (AF_INET6) socket.

    Args:
        kind: the socket kind to open; None tries a datagram socket, then a raw one.

    Raises:
        PingNotPermitted: no allowed kind (the message names the fixes).
        OSError: anything else the kernel refuses (no IPv6, ...).
    """
    kinds = (kind,) if kind is not None else (SocketKind.DATAGRAM, SocketKind.RAW)
    refused: list[str] = []
    for candidate in kinds:
        sock_type = socket.SOCK_DGRAM if candidate is SocketKind.DATAGRAM else socket.SOCK_RAW
        try:
            sock = socket.socket(family, sock_type, _PROTOCOL[family])
        except OSError as exc:
            # EACCES: gid outside ping_group_range; EPERM: no CAP_NET_RAW;
            # EPROTONOSUPPORT: a kernel without ping sockets.
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EPROTONOSUPPORT):
                raise
            refused.append(f"{candidate.value} socket: {exc.strerror}")
            continue
        sock.setblocking(False)
        return sock, candidate
    raise PingNotPermitted(
        "cannot open an ICMP socket (" + "; ".join(refused) + "): allow ping sockets for bridged's group "
        f"(sysctl net.ipv4.ping_group_range, e.g. \"{os.getgid()} {os.getgid()}\") or grant CAP_NET_RAW"
    )


def datagram_allowed() -> bool:
    """Whether this process may open an unprivileged ICMP socket (so needs no CAP_NET_RAW to ping)."""
    try:
        sock, _ = open_icmp_socket(socket.AF_INET, SocketKind.DATAGRAM)
    except OSError:
        return False
    sock.close()
    return True


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _request(family: int, ident: int, seq: int, payload: bytes) -> bytes:
    header = _HEADER.pack(_ECHO_REQUEST[family], 0, 0, ident, seq)
    if family == socket.AF_INET6:
        return header + payload  # the kernel computes ICMPv6 checksums
    return _HEADER.pack(_ECHO_REQUEST[family], 0, checksum(header + payload), ident, seq) + payload


def _icmp_message(family: int, kind: SocketKind, packet: bytes) -> bytes:
    """The ICMP message in a received packet (a raw IPv4 socket includes the IP header)."""
    if family == socket.AF_INET and kind is SocketKind.RAW:
        if not packet or packet[0] >> 4 != 4:
            return b""
        return packet[(packet[0] & 0x0F) * 4:]
    return packet


def _is_our_reply(family: int, message: bytes, ident: int, seq: int, payload: bytes) -> bool:
    if len(message) < _HEADER.size:
        return False
    type_, code, _, got_ident, got_seq = _HEADER.unpack_from(message)
    return (type_ == _ECHO_REPLY[family] and code == 0 and got_ident == ident and got_seq == seq
            and message[_HEADER.size:] == payload)


def _sockaddr(address: str) -> tuple[int, tuple]:
    ip = ipaddress.ip_address(address.split("%")[0])
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    info = socket.getaddrinfo(address, None, family, socket.SOCK_RAW, 0, socket.AI_NUMERICHOST)
    return family, info[0][4]


async def echo(address: str, timeout: float, kind: SocketKind | None = None) -> tuple[float, SocketKind]:
    """Send one ICMP echo request to ``address`` and wait for its reply.

    Args:
        address: an IPv4 or IPv6 address literal (resolve names first).
        timeout: seconds for the send and the wait together.
        kind: force a socket kind (tests); None picks the first allowed.

    Returns:
        (round-trip time in seconds, the socket kind used).

    Raises:
        PingTimeout: no reply in time.
        PingNotPermitted: no ICMP socket may be opened.
        OSError: the request could not be sent (no route, ...).
    """
    family, sockaddr = _sockaddr(address)
    sock, used = open_icmp_socket(family, kind)
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(sock, family, used, sockaddr), used
    except TimeoutError:
        raise PingTimeout(f"no echo reply from {address} within {timeout:g} s") from None
    finally:
        sock.close()


async def _exchange(sock: socket.socket, family: int, kind: SocketKind, sockaddr: tuple) -> float:
    loop = asyncio.get_running_loop()
    seq = next(_sequence) & 0xFFFF
    payload = os.urandom(ECHO_PAYLOAD_SIZE)
    # A raw socket's identifier is ours to choose; a datagram socket's is its
    # port, which the kernel writes over ours and knows after the first send.
    ident = int.from_bytes(os.urandom(2), "big")
    replied: asyncio.Future[float] = loop.create_future()
    if kind is SocketKind.DATAGRAM:
        sock.bind(("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
        ident = sock.getsockname()[1]
    request = _request(family, ident, seq, payload)

    def on_readable() -> None:
        while not replied.done():
            try:
                packet, source = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # A queued ICMP error (IP_RECVERR is off, so rare): reading
                # cleared it; the request is still unanswered, keep waiting.
                return
            if source[0] == sockaddr[0] and _is_our_reply(
                    family, _icmp_message(family, kind, packet), ident, seq, payload):
                replied.set_result(time.monotonic())

    loop.add_reader(sock.fileno(), on_readable)
    try:
        await _send(loop, sock, request, sockaddr)
        sent_at = time.monotonic()
        return await replied - sent_at
    finally:
        loop.remove_reader(sock.fileno())


async def _send(loop: asyncio.AbstractEventLoop, sock: socket.socket, request: bytes, sockaddr: tuple) -> None:
    while True:
        try:
            sock.sendto(request, sockaddr)
            return
        except (BlockingIOError, InterruptedError):
            writable = loop.create_future()
            loop.add_writer(sock.fileno(), writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(sock.fileno())
