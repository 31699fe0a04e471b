"""The UART front's downlink and link events (a part of ``Front``).

Theory of operation.  Downlink records from the workers become ``+IPD``
frames (or raw bytes in passthrough, or passive-mode notices); while the
UART output is backed up the front leaves them in the rings, so the workers
stop reading their sockets.  A send the session still settles goes first
(``Session.settle_first``): SEND OK never follows the +IPD that answers it.
A passthrough client link that drops is reconnected every AT+CIPRECONNINTV.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Callable

import structlog

from bridged.at import format as fmt
from bridged.at.datamode import DataKind
from bridged.at.errors import AtError
from bridged.at.session import State
from bridged.commands.context import ConnectSpec
from bridged.commands.dns import lookup_servers
from bridged.commands.options import SysMsg
from bridged.commands.sntp import tls_time
from bridged.commands.tcpip import connected_message
from bridged.commands.wifi import station_ip
from bridged.ipc import records
from bridged.uart.links import Slot
from bridged.uart.reading import COALESCE_PASSTHROUGH
from bridged.uart.sending import Send
from bridged.uart.transcript import MarkKind

__all__ = ["Downlink", "Passthrough"]

log = structlog.get_logger()

_OUTPUT_HIGH = 32768  # stop delivering +IPD above this many queued bytes
_GATHER_MIN = 512  # bytes: smaller downlink pieces are interactive (as the port's _COALESCE_MIN)
_GATHER_GAP = 2 * COALESCE_PASSTHROUGH  # seconds: pieces closer than this are a stream (two ticks)
_GATHER_RATE = 2_000_000  # bytes/s: a faster peer is delivered at once


@dataclass
class Passthrough:
    link_id: int
    spec: ConnectSpec | None  # to reconnect a client link
    server: bool  # a server's client: wait for the next one instead
    reconnecting: asyncio.Task | None = None


class Downlink:
    """Link events to the UART (``uart.slots.LinkEvents``); a part of ``bridged.uart.front.Front``."""

    def _passthrough_lost(self, slot: Slot) -> None:
        """As a client, ESP-AT stays in passthrough and reconnects every AT+CIPRECONNINTV."""
        pt = self.passthrough
        if pt is None or pt.link_id != slot.link_id or pt.spec is None or pt.server:
            return
        if pt.reconnecting is None:
            pt.reconnecting = self.tasks.spawn(self._reconnect(pt))

    def _leave_passthrough(self) -> None:
        """Passthrough is over (+++, a restart): a reconnection under way stops, and a
        connect it started is closed unheard."""
        pt, self.passthrough = self.passthrough, None
        if pt is not None and pt.reconnecting is not None:
            pt.reconnecting.cancel()
            pt.reconnecting = None
        # What gathered goes out now, raw as it came in, before any command after +++.
        paused, self._down_paused = self._down_paused, []
        for slot in paused:
            self.links.resume_downlink(slot)
            if slot.control is not None:
                self.links.delivery.drain(slot)

    async def _reconnect(self, pt: Passthrough, first_delay: float | None = None) -> None:
        delay = self.ctx.state.reconnintv / 10 if first_delay is None else first_delay
        while self.passthrough is pt:
            await asyncio.sleep(delay)
            delay = self.ctx.state.reconnintv / 10
            if self.passthrough is not pt:
                break
            if self.links.is_busy(pt.link_id):
                # Still closing (a reset's old link): ESP-AT retries until +++, never gives up.
                continue
            if station_ip(self.ctx) is None:
                continue  # no AP (a Wi-Fi drop): nothing to reconnect over yet
            # Each attempt resolves again, through the servers AT+CIPDNS holds now.
            spec = dataclasses.replace(pt.spec, dns_servers=lookup_servers(self.ctx),
                                       tls_time=tls_time(self.ctx) if pt.spec.tls_time is not None else None)
            epoch = self.ctx.state.wifi_epoch
            try:
                await self.links.connect(pt.link_id, spec)
                if self.ctx.state.wifi_epoch != epoch:
                    # The AP went away while it connected (a Wi-Fi drop): it fails with it,
                    # as AT+CIPSTART does; the next attempt waits for the station.
                    await self.links.close(pt.link_id)
                    continue
                self.links.announced()  # passthrough prints no CONNECT
            except AtError as exc:
                log.info("passthrough_reconnect_failed", link_id=pt.link_id, why=exc.why)
                continue
            log.info("passthrough_reconnected", link_id=pt.link_id)
            self._passthrough_resume(self.links.slots[pt.link_id])
            break
        pt.reconnecting = None

    def _passthrough_resume(self, slot: Slot) -> None:
        """The passthrough link is back (reconnected, or a new server client)."""
        if self.session.state is State.PASSTHROUGH:
            if self.sending is not None:
                self._keep_leftover(self.sending)  # a leftover it waited behind went with the old link (logged)
            self.sending = Send(slot, DataKind.PASSTHROUGH, 0, block=self.config.links.chunk)
            if SysMsg.PASSTHROUGH_STATUS in self.ctx.state.sysmsg:
                self.output.urc(connected_message(self.ctx, slot.view))
            self._resume_reading()
            self._process()

    def delivery_room(self) -> int:
        return _OUTPUT_HIGH - self.output.buffered

    def _in_passthrough(self) -> bool:
        return self.session.state is State.PASSTHROUGH

    def _status_shown(self) -> bool:
        """CONNECT/CLOSED during passthrough only with AT+SYSMSG bit 2."""
        return not self._in_passthrough() or SysMsg.PASSTHROUGH_STATUS in self.ctx.state.sysmsg

    def link_data(self, slot: Slot, record: records.Record) -> None:
        if self.ctx.state.cipmode == 1:
            # Passthrough (receiving) mode: the peer's bytes go out raw, no +IPD.
            self.output.urc(record.payload)
            if self.session.state is State.PASSTHROUGH:
                self._gather_downlink(slot, len(record.payload))
            return
        if self.session.settle_first():  # SEND OK precedes the +IPD that may answer it
            self._check_send()
        state = self.ctx.state
        remote = None
        if state.cipdinfo and slot.view is not None:
            remote = record.addr or (slot.view.remote_ip, slot.view.remote_port)
        link = slot.link_id if state.cipmux == 1 else None  # ctx.link_arg, inline: once per +IPD
        payload = record.payload
        size = len(payload)
        # At most <chunk> bytes per +IPD (2920 on ESP-AT); a datagram stays whole.
        step = size if record.addr is not None else self.config.links.chunk
        if 0 < size <= step and self.tap is None:  # one +IPD: the usual record
            self.output.urc(fmt.ipd_active(link, size, remote) + payload)
            slot.ipd += 1
            return
        for i in range(0, size, step or 1):
            piece = payload[i : i + step]
            if self.tap is not None:
                self.tap.mark(MarkKind.IPD, link=slot.link_id, length=len(piece))
            self.output.urc(fmt.ipd_active(link, len(piece), remote) + piece)
            slot.ipd += 1

    def _gather_downlink(self, slot: Slot, size: int) -> None:
        """While a peer streams at UART rates into passthrough, let its pieces gather
        in the ring until the port's coalescing tick (``uart.reading``): one wake-up
        for both directions instead of one each.

        As for the port: only a steady stream of pieces of 512 bytes or more,
        slower than 2 MB/s; a lone or small piece (an echo) and bulk data go at once.
        """
        now = self.loop.time()
        interval, self._last_down = now - self._last_down, now
        if (_GATHER_MIN <= size and 0 < interval < _GATHER_GAP and size / interval < _GATHER_RATE
                and slot not in self._down_paused):
            self.links.pause_downlink(slot)
            self._down_paused.append(slot)
            self._arm_tick()

    def _end_down_pauses(self) -> None:
        """The coalescing tick: deliver what gathered.  A stream still under way
        (its records keep coming) stays paused until the next tick, so the
        worker's answer to the uplink the tick just wrote does not wake us on
        its own: it waits for that tick too."""
        paused, self._down_paused = self._down_paused, []
        for slot in paused:
            if slot.control is not None and self._in_passthrough():
                # Its records pause it again (_gather_downlink); its doorbell, unheard while
                # paused, is cleared by the drain it rings once it is heard again.
                self.links.delivery.drain(slot, clear=False)
                if slot not in self._down_paused and self.loop.time() - self._last_down < _GATHER_GAP:
                    # Nothing this tick, but the stream is under way: the worker reads
                    # it when our uplink wakes it, so its records come by the next tick.
                    self._down_paused.append(slot)
                    self._arm_tick()
            if slot not in self._down_paused:
                self.links.resume_downlink(slot)

    def link_accepted(self, slot: Slot) -> None:
        self.ctx.state.had_link = True
        pt = self.passthrough
        if pt is not None and pt.server:
            pt.link_id = slot.link_id
            self._passthrough_resume(slot)
        elif self._status_shown():
            self.output.urc(connected_message(self.ctx, slot.view))

    def link_notice(self, slot: Slot, length: Callable[[], int]) -> None:
        if self.session.settle_first():  # SEND OK before the notice, as for +IPD
            self._check_send()
        link = self.ctx.link_arg(slot.link_id)
        slot.ipd += 1

        def notice() -> bytes:
            # Made when written, with what is unread then; nothing if nothing is.
            n = length()
            if not n:
                return b""
            if self.tap is not None:
                self.tap.mark(MarkKind.IPD, link=slot.link_id, length=n, passive=True)
            return fmt.ipd_passive(link, n)

        self.output.urc(notice)

    def link_freed(self, slot: Slot) -> None:
        self.server.update()  # a free slot may take a waiting client
        if self._dropped is not None and not self._dropped.done():
            self._dropped.set_result(None)  # a booting front waits for the restart's links to end

    def link_ended(self, slot: Slot) -> None:
        if self.sending is not None and self.sending.slot is slot:
            self._link_closed_send(slot)

    def _link_closed_send(self, slot: Slot) -> None:
        if self.session.state is State.AWAITING_SEND_OK:
            self._check_send()
        else:
            self._stop_waiting_room()
            self._resume_reading()  # the rest of the payload is read and dropped
            # ... and so is what a full ring left buffered (a passthrough that reconnects
            # must not send the old stream's tail to its new peer).
            self.loop.call_soon(self._process)

    def link_closed(self, slot: Slot, reason: str) -> None:
        log.info("link_lost", link_id=slot.link_id, reason=reason)
        # A send in progress on this link ends first (SEND FAIL), then CLOSED.
        if self.sending is not None and self.sending.slot is slot:
            self._link_closed_send(slot)
        if self._status_shown():
            self.output.urc(fmt.closed(self.ctx.link_arg(slot.link_id)))
        if self._in_passthrough():
            self._passthrough_lost(slot)
