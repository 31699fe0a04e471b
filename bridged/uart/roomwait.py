"""A send waiting for room in its uplink ring, and so_sndtimeo (a part of ``Front``).

Theory of operation.  While the ring is full the front asks the worker for
its space doorbell (otherwise the worker never rings it, and the front needs
no wake-up per send), and a send still streaming stops reading the port
(the tty buffer fills, RTS drops), then listens for +++ into a bounded
buffer (``uart.reading._hold_stream``); a complete one waiting for room has
input refused, busy p... (the session's AWAITING_SEND_OK), so AT+RST still
restarts.  AT+CIPTCPOPT's so_sndtimeo bounds the wait: SEND FAIL once the
session's deadline passes for a complete send, once no byte was admitted for
that long for a stream.
"""

from __future__ import annotations

import structlog

from bridged.at.datamode import DataKind
from bridged.at.session import State, Tick
from bridged.uart.sending import Send
from bridged.uart.slots import Slot

__all__ = ["ROOM_POLL", "RoomWait"]

log = structlog.get_logger()

ROOM_POLL = 0.05  # seconds between looks at a full uplink ring while a send waits for room


class RoomWait:
    """A send's wait for room in its uplink ring; a part of ``bridged.uart.front.Front``."""

    def _send_timed_out(self, send: Send, deadline: float) -> None:
        if self.sending is not send or self.session.state is not State.AWAITING_SEND_OK:
            return
        self._check_send()  # room that came in time, unheard (a missed doorbell), takes the rest first
        if self.sending is not send:
            return
        # uvloop's clock ticks in whole ms: it may read a hair before the deadline.
        effects = self.session.handle(Tick(), max(self.loop.time(), deadline))
        if not effects.out:
            return
        # The part already admitted stays and goes out, as lwIP sends what a timed-out
        # send() took into its buffer: ahead of it in the ring are earlier sends that
        # had SEND OK, and the worker cannot drop bytes behind them (it would drop them).
        log.info("send_timed_out", link_id=send.slot.link_id, admitted=send.admitted, length=send.length)
        self._finish_send(effects.out)

    def _wait_room(self, send: Send) -> None:
        """The send waits for room in its uplink ring: hear the worker.

        A send still streaming stops reading (its payload waits in the port: flow
        control; later it listens for +++, ``uart.reading``); a complete one
        leaves the port read, and what comes is refused
        (busy p..., AT+RST forces a restart), as ESP-AT's receive task goes on
        while its AT task blocks in send(): else a peer that never reads would
        leave the MCU no way out.

        The worker rings the space doorbell only while we ask for it (the
        ring's quiet flag), so it costs nothing when nobody waits.  The flag
        and the read index are plain stores in two processes: after asking,
        look again, and keep looking on a timer while waiting (as the worker
        does for its downlink).
        """
        if not send.complete:
            self._hold_stream(send)  # uart.reading: stopped, then listening for +++
        slot = send.slot
        self._room_need = send.room_needed()
        if self._room_slot is slot:
            return
        self.counters.flow_pauses += 1
        self._stop_waiting_room()
        self._room_slot = slot
        slot.uplink.want_space_doorbell(True)
        slot.uplink.clear_space_doorbell()
        self.loop.add_reader(slot.uplink.space_fd, self._on_room)
        self._poll_room()
        if not send.complete:
            self._bound_stream_wait(send)

    def _bound_stream_wait(self, send: Send) -> None:
        """AT+CIPTCPOPT so_sndtimeo bounds how long AT+CIPSENDL waits for room without a byte
        admitted, as it bounds each send() of ESP-AT's stream (passthrough: not, as on ESP-AT,
        whose page names CIPSEND, CIPSENDEX and CIPSENDL only)."""
        timeout = self._sndtimeo(send)
        if send.kind is DataKind.SENDL and timeout and self._room_timer is None:
            self._room_timer = self.loop.call_later(timeout, self._stream_timed_out, send, timeout)

    def _sndtimeo(self, send: Send) -> float:
        """so_sndtimeo in seconds (0: none) for ``send``'s link.  AT+CIPTCPOPT's options are
        the link id's (kept across its links, stored with AT+SYSSTORE) but belong to a TCP/SSL
        socket: lwIP's send timeout bounds a TCP write only, a UDP link never gets it."""
        if send.datagram:
            return 0.0
        return self.ctx.state.tcpopts[send.slot.link_id].so_sndtimeo / 1000

    def _stream_timed_out(self, send: Send, timeout: float) -> None:
        """No room within so_sndtimeo: the stream fails as ESP-AT's does when a send() fails: the
        rest of the payload is read and dropped (``Send.alive``: +++ still cancels), then SEND
        FAIL.  What was admitted (+CIPSENDL's <had sent len>) stays in the ring and goes out;
        nothing after it does (a hole in the stream would be worse than its end)."""
        self._room_timer = None
        if self.sending is not send or self._room_slot is not send.slot:
            return  # not waiting now: the next wait arms its own
        due = send.moved_at + timeout
        if due - self.loop.time() > 0.001:  # it moved meanwhile: counted from its last admission
            self._room_timer = self.loop.call_at(due, self._stream_timed_out, send, timeout)
            return
        if send.slot.uplink.free() >= self._room_need:
            self._on_room()  # room came in time, unheard (a missed doorbell the poll finds late)
            return
        log.info("send_timed_out", link_id=send.slot.link_id, admitted=send.admitted, length=send.length)
        send.timed_out = True
        self._stop_waiting_room()
        self._resume_reading()
        self._process()

    def _poll_room(self) -> None:
        self._room_poll = None
        if self._room_slot is None:
            return
        if self._room_slot.uplink.free() >= self._room_need:
            self.loop.call_soon(self._on_room)
        else:
            self._room_poll = self.loop.call_later(ROOM_POLL, self._poll_room)

    def _stop_waiting_room(self) -> None:
        slot, self._room_slot = self._room_slot, None
        if slot is None:
            return
        self.loop.remove_reader(slot.uplink.space_fd)
        slot.uplink.want_space_doorbell(False)
        if self._room_timer is not None:  # room came, or the send is gone (a restart drops it first)
            self._room_timer.cancel()
            self._room_timer = None
        if self._room_poll is not None:
            self._room_poll.cancel()
            self._room_poll = None

    def _on_room(self) -> None:
        slot = self._room_slot
        if slot is None:
            return
        slot.uplink.clear_space_doorbell()
        if slot.uplink.free() < self._room_need and self._send_waits_on(slot):
            return  # a doorbell for a sliver of room: wait for more
        self._stop_waiting_room()
        send = self.sending
        if send is None or send.slot is not slot:
            self._resume_reading()
            return
        if send.complete:
            self._check_send()
        else:
            self._resume_reading()
            self._process()

    def _send_waits_on(self, slot: Slot) -> bool:
        send = self.sending
        return send is not None and send.slot is slot and send.alive()
