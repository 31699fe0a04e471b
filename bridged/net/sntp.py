"""SNTP (RFC 4330) without I/O: the request, the checks on a reply, the device clock.

Theory of operation
-------------------
A client request is 48 bytes: LI 0, version 4, mode 3 (client) and a
transmit timestamp; everything else zero.  The server copies that transmit
timestamp into its reply's originate field, which is how a reply is matched
to its request.  bridged puts a random 64-bit value there, not its clock: it
is only a cookie (as chrony does), and it keeps off-path forgeries out.  The
times the offset needs on the client side (T1 sent, T4 received) are kept
beside the request instead.

A reply is accepted only when all of RFC 4330 section 5's checks pass; each
failure has a ``Rejection`` reason so the caller can log why:

=================  =========================================================
SHORT              fewer than 48 bytes
VERSION            version not 3 or 4
MODE               mode not 4 (server)
ORIGINATE          originate timestamp is not the cookie sent
KISS_O_DEATH       stratum 0: the reference id is a kiss code (RATE, DENY...)
UNSYNCHRONIZED     leap indicator 3 (alarm) or stratum over 15
ZERO_TRANSMIT      transmit timestamp 0
SOURCE             from another address or port (decided by the I/O part)
=================  =========================================================

The originate check comes before the kiss-o'-death one: a kiss is obeyed only
when it answers our request.

Timestamps are NTP era-relative (32-bit seconds since 1900); RFC 4330
section 3: a seconds field with its top bit clear is in era 1 (from
2036-02-07 on), so a server saying 2038 or 2100 is read right.

The device clock (``DeviceClock``) is the ESP's system time: seconds since
the Unix epoch as an offset over the host's monotonic clock.  At power-on
(the daemon's start) it reads 1970-01-01 00:00:00, as an ESP32 that never
synchronised does, and it counts on from there; an accepted reply steps it
by the measured offset.  The host's own clock is never read or set.
"""

from __future__ import annotations

import enum
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "PORT",
    "PACKET_SIZE",
    "Rejection",
    "ReplyRejected",
    "ServerReply",
    "DeviceClock",
    "build_request",
    "parse_reply",
    "offset",
    "to_ntp",
    "from_ntp",
    "retry_delay",
    "RETRY_FIRST",
    "RETRY_MAX",
]

PORT = 123
PACKET_SIZE = 48
NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
_ERA = 1 << 32
_HEADER = struct.Struct("!BBbbII4s")  # LI/VN/mode, stratum, poll, precision, delay, dispersion, refid
_TIMESTAMPS = struct.Struct("!QQQQ")  # reference, originate, receive, transmit

# After a round in which no server answered, wait RETRY_FIRST seconds (RFC
# 4330's 15 s minimum poll, lwIP's SNTP_RETRY_TIMEOUT), doubling each round
# up to RETRY_MAX, and never longer than the AT+CIPSNTPINTV interval.
RETRY_FIRST = 15.0
RETRY_MAX = 240.0


class Rejection(enum.Enum):
    SHORT = "short"
    VERSION = "version"
    MODE = "mode"
    ORIGINATE = "originate"
    KISS_O_DEATH = "kiss_o_death"
    UNSYNCHRONIZED = "unsynchronized"
    ZERO_TRANSMIT = "zero_transmit"
    SOURCE = "source"


class ReplyRejected(ValueError):
    """A datagram that is no acceptable answer to our request."""

    def __init__(self, reason: Rejection, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ServerReply:
    """The fields of an accepted reply that the client uses (times in Unix seconds)."""

    stratum: int
    version: int
    receive: float  # T2: the request reached the server
    transmit: float  # T3: the reply left the server


def to_ntp(unix: float) -> int:
    """A 64-bit NTP timestamp (seconds in the current era, 32-bit fraction)."""
    seconds = int(unix // 1)
    fraction = int((unix - seconds) * _ERA)
    if fraction == _ERA:  # a hair below a whole second rounds up to it
        seconds, fraction = seconds + 1, 0
    return ((seconds + NTP_UNIX_OFFSET) % _ERA) << 32 | fraction


def from_ntp(timestamp: int) -> float:
    """Unix seconds for a 64-bit NTP timestamp, in 1968..2104 (RFC 4330 section 3)."""
    seconds, fraction = timestamp >> 32, timestamp & (_ERA - 1)
    if not seconds & 0x8000_0000:
        seconds += _ERA  # era 1: 2036-02-07 06:28:16 UTC and after
    return seconds - NTP_UNIX_OFFSET + fraction / _ERA


def build_request(cookie: int) -> bytes:
    """A client request whose transmit timestamp is ``cookie`` (64 bits, not 0)."""
    if not 0 < cookie < 1 << 64:
        raise ValueError("the cookie is a non-zero 64-bit number")
    return _HEADER.pack(0 << 6 | 4 << 3 | 3, 0, 0, 0, 0, 0, b"\0" * 4) + _TIMESTAMPS.pack(0, 0, 0, cookie)


def parse_reply(data: bytes, cookie: int) -> ServerReply:
    """Check a datagram against the request that carried ``cookie``.

    Raises:
        ReplyRejected: the first check it fails, with its reason.
    """
    if len(data) < PACKET_SIZE:
        raise ReplyRejected(Rejection.SHORT, f"{len(data)} bytes, a reply has {PACKET_SIZE}")
    flags, stratum, _poll, _precision, _delay, _dispersion, refid = _HEADER.unpack_from(data)
    _reference, originate, receive, transmit = _TIMESTAMPS.unpack_from(data, _HEADER.size)
    leap, version, mode = flags >> 6, flags >> 3 & 7, flags & 7
    if version not in (3, 4):
        raise ReplyRejected(Rejection.VERSION, f"version {version}")
    if mode != 4:
        raise ReplyRejected(Rejection.MODE, f"mode {mode}, a server answers in mode 4")
    if originate != cookie:
        raise ReplyRejected(Rejection.ORIGINATE, f"originate {originate:#018x}, sent {cookie:#018x}")
    if stratum == 0:
        raise ReplyRejected(Rejection.KISS_O_DEATH, f"kiss code {refid.decode('latin-1')!r}")
    if leap == 3 or stratum > 15:
        raise ReplyRejected(Rejection.UNSYNCHRONIZED, f"leap indicator {leap}, stratum {stratum}")
    if transmit == 0:
        raise ReplyRejected(Rejection.ZERO_TRANSMIT, "transmit timestamp 0")
    # A server that leaves its receive timestamp out: take it as sent at once.
    return ServerReply(stratum, version, from_ntp(receive or transmit), from_ntp(transmit))


def offset(reply: ServerReply, sent: float, received: float) -> float:
    """How far the device clock is behind the server (RFC 4330 section 5's theta).

    Args:
        sent: the device clock when the request left (T1).
        received: the device clock when the reply came (T4).
    """
    return ((reply.receive - sent) + (reply.transmit - received)) / 2


def retry_delay(failed_rounds: int, interval: float) -> float:
    """Seconds to wait after ``failed_rounds`` (>= 1) rounds without an answer."""
    return min(RETRY_FIRST * 2 ** min(failed_rounds - 1, 16), RETRY_MAX, interval)


class DeviceClock:
    """The ESP's system time: Unix seconds, an offset over a monotonic clock.

    Starts at the epoch when made (power-on); ``step`` moves it by an offset.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._offset = -monotonic()

    def now(self) -> float:
        return self._monotonic() + self._offset

    def step(self, by: float) -> None:
        self._offset += by
