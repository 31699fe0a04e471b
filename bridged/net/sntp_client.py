"""The SNTP client AT+CIPSNTPCFG starts: asks the MCU's servers, keeps the device clock.

Theory of operation.  One client lives in the UART front for the life of the
process, as the ESP's RTC does: its ``DeviceClock`` survives AT+RST and
AT+RESTORE (the spec page, AT+CIPSNTPTIME: the time "will not be lost after
a software reset"), while what AT+CIPSNTPCFG configured is RAM and is
forgotten (``stop``).  ``start`` runs one task:

* a round asks the servers in order, each until one answers: the name is
  resolved through ``bridged.net.resolver.resolve`` with the AT+CIPDNS
  servers, one request goes out from a fresh UDP socket (a new random port,
  the task's own: closed however the wait ends, a stop included) and the
  task waits up to ``RECV_TIMEOUT`` for an acceptable reply (see
  ``bridged.net.sntp``); each datagram is checked as it is read, a few per
  loop turn (``_Exchange``); datagrams that fail a check, or come from another
  address or port, are ignored (logged, at most one line per reason every
  ``LOG_EVERY`` seconds) and the wait goes on.  A kiss-o'-death ends the
  wait for that server at once.  No network (the station has no IP) makes
  the round fail without sending anything;
* after an accepted reply the clock is stepped, ``+TIME_UPDATED`` goes out
  if it is the first since ``start`` (ESP-AT v4's at_time_sync_cb prints it
  once per AT+CIPSNTPCFG: a flag that AT+CIPSNTPCFG sets and the callback
  clears), and the next round comes after the AT+CIPSNTPINTV interval, read
  when it is scheduled (ESP-IDF's sntp_set_sync_interval applies from the
  next sync, as here);
* after a round without an answer, the next comes after ``retry_delay``
  (15 s doubling up to 4 min, never more than the interval), or at once
  when the station joins (``wake``) before the first answer.  So at most
  three requests per round, rounds at least 15 s apart: never a flood.

Deliberate differences from lwIP's SNTP: a server that stays silent costs
``RECV_TIMEOUT`` (5 s) rather than 15 s before the next one is asked; the
first request goes out at once rather than after a random start-up delay.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Protocol

import structlog

from bridged.net.resolver import ResolveError, resolve, sockaddr
from bridged.net.sntp import (
    PORT,
    DeviceClock,
    Rejection,
    ReplyRejected,
    ServerReply,
    build_request,
    offset,
    parse_reply,
    retry_delay,
)
from bridged.tasks import Spawn

__all__ = ["Device", "SntpClient", "RECV_TIMEOUT", "LOG_EVERY"]

log = structlog.get_logger()

RECV_TIMEOUT = 5.0  # s a server has to answer one request
RESOLVE_TIMEOUT = 5.0  # s for the server's name
LOG_EVERY = 10.0  # s between two log lines for ignored replies of one reason
_READS_PER_TURN = 8  # datagrams read per event-loop turn (a flood waits its turn)
_READ_SIZE = 512  # bytes read of a datagram: a reply has 48 (a longer one is cut, unharmed)


class Device(Protocol):
    """What the client needs from the session that started it."""

    def interval(self) -> float:
        """AT+CIPSNTPINTV, in seconds."""

    def dns_servers(self) -> Sequence[str]:
        """AT+CIPDNS's manual servers; () for the host's resolver."""

    def ipv6(self) -> bool:
        """AT+CIPV6: the station has IPv6 addresses, so IPv6 servers can be reached."""

    def online(self) -> bool:
        """The station has its IP address."""

    def time_updated(self) -> None:
        """Send +TIME_UPDATED."""


class SntpClient:
    def __init__(self, clock: DeviceClock | None = None, port: int = PORT, *, spawn: Spawn) -> None:
        self.clock = clock or DeviceClock()
        self._spawn = spawn
        self.port = port
        self.servers: tuple[str, ...] = ()
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._synced = False  # an answer was accepted since start
        self._logged: dict[Rejection, tuple[float, int]] = {}  # reason -> (last logged, suppressed since)

    def start(self, servers: Sequence[str], device: Device) -> None:
        """(Re)start asking ``servers``; the next accepted answer sends +TIME_UPDATED."""
        self.stop()
        self.servers = tuple(servers)
        self._synced = False
        self._wake.clear()
        log.info("sntp_started", servers=list(self.servers))
        self._task = self._spawn(self._run(device))

    def stop(self) -> None:
        """Stop asking (AT+CIPSNTPCFG=0, a restart); the clock keeps its time."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
            log.info("sntp_stopped")

    def wake(self) -> None:
        """The station joined: before the first answer, ask now rather than after the retry delay."""
        if self._task is not None and not self._synced:
            self._wake.set()

    async def _run(self, device: Device) -> None:
        failed = 0
        while True:
            self._wake.clear()  # a join from now on cuts the wait after a failed round short
            if await self._round(device):
                failed = 0
                await asyncio.sleep(device.interval())
                continue
            failed += 1
            try:
                async with asyncio.timeout(retry_delay(failed, device.interval())):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _round(self, device: Device) -> bool:
        if not device.online():
            log.info("sntp_offline")
            return False
        for name in self.servers:
            if await self._ask(name, device):
                if not self._synced:
                    self._synced = True
                    device.time_updated()
                return True
        return False

    async def _ask(self, name: str, device: Device) -> bool:
        """One request to ``name``; True once an acceptable reply stepped the clock."""
        try:
            # Without AT+CIPV6=1 the ESP has no IPv6 address: an IPv6 server is unreachable.
            family = socket.AF_UNSPEC if device.ipv6() else socket.AF_INET
            address = (await resolve(name, family, device.dns_servers(), RESOLVE_TIMEOUT))[0]
        except ResolveError as exc:
            log.info("sntp_resolve_failed", server=name, why=str(exc))
            return False
        try:
            target = sockaddr(address, self.port)
            sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:  # no IPv6 on this host, no fd left ...
            log.info("sntp_send_failed", server=name, address=address, error=str(exc))
            return False
        try:
            outcome = await self._exchange(name, sock, target)
        finally:
            sock.close()  # whatever ended the wait, a cancellation (stop) included
        if outcome is None:
            return False
        reply, sent, received = outcome
        step = offset(reply, sent, received)
        self.clock.step(step)
        shown = datetime.fromtimestamp(int(self.clock.now()), timezone.utc).isoformat()
        log.info("sntp_synced", server=name, address=address, stratum=reply.stratum,
                 offset=round(step, 6), time=shown)
        return True

    async def _exchange(self, name: str, sock: socket.socket,
                        target: tuple) -> tuple[ServerReply, float, float] | None:
        """Send one request from ``sock`` and wait for its answer: (reply, T1, T4), or None."""
        cookie = secrets.randbits(64) or 1
        exchange = _Exchange(sock, target, cookie, self.clock, lambda exc: self._ignored(name, target, exc))
        loop = asyncio.get_running_loop()
        try:
            sock.setblocking(False)
            sent = self.clock.now()
            sock.sendto(build_request(cookie), target)
            loop.add_reader(sock.fileno(), exchange.readable)
            try:
                async with asyncio.timeout(RECV_TIMEOUT):
                    answer = await exchange.answer
                if isinstance(answer, OSError):
                    raise answer
            finally:
                loop.remove_reader(sock.fileno())
        except TimeoutError:  # before OSError: it is one
            log.info("sntp_no_answer", server=name, address=target[0], timeout=RECV_TIMEOUT)
            return None
        except OSError as exc:  # no route, a refused send, a failed read
            log.info("sntp_send_failed", server=name, address=target[0], error=str(exc))
            return None
        if answer is None:  # a kiss-o'-death: this server, not again this round
            return None
        reply, received = answer
        return reply, sent, received

    def _ignored(self, name: str, target: tuple, exc: ReplyRejected) -> None:
        """Log an ignored reply, at most once per reason every LOG_EVERY seconds."""
        now = time.monotonic()
        last, suppressed = self._logged.get(exc.reason, (-LOG_EVERY, 0))
        if now - last < LOG_EVERY:
            self._logged[exc.reason] = (last, suppressed + 1)
            return
        self._logged[exc.reason] = (now, 0)
        log.warning("sntp_reply_ignored", server=name, address=target[0], reason=exc.reason.value,
                    detail=exc.detail, suppressed=suppressed)


class _Exchange:
    """Checks each datagram as it is read, until one answers the request.

    Reading is ours (``loop.add_reader``), not a transport's: at most
    ``_READS_PER_TURN`` datagrams per event-loop turn, so a flood cannot keep
    the loop (and with it the UART) from its other work, and each datagram
    is checked at once, so none is dropped unread behind a queue of junk.
    The caller owns the socket and closes it.
    """

    def __init__(self, sock: socket.socket, target: tuple, cookie: int, clock: DeviceClock,
                 ignored: Callable[[ReplyRejected], None]) -> None:
        self.sock = sock
        self.target = target
        self.cookie = cookie
        self.clock = clock
        self.ignored = ignored
        # (reply, T4) when accepted; None for a kiss-o'-death; the OSError if reading failed.
        self.answer: asyncio.Future[tuple[ServerReply, float] | OSError | None] = (
            asyncio.get_running_loop().create_future())

    def readable(self) -> None:
        for _ in range(_READS_PER_TURN):
            if self.answer.done():
                return
            try:
                data, source = self.sock.recvfrom(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.answer.set_result(exc)  # a result: no "exception never retrieved" if the wait just ended
                return
            self._check(data, source, self.clock.now())

    def _check(self, data: bytes, source: tuple, received: float) -> None:
        try:
            if source[:2] != self.target[:2]:
                raise ReplyRejected(Rejection.SOURCE, f"from {source[0]} port {source[1]}")
            reply = parse_reply(data, self.cookie)
        except ReplyRejected as exc:
            self.ignored(exc)
            if exc.reason is Rejection.KISS_O_DEATH:
                self.answer.set_result(None)
            return
        self.answer.set_result((reply, received))
