"""The UART front's data phases: AT+CIPSEND, CIPSENDEX, CIPSENDL, passthrough (a part of ``Front``).

Theory of operation.  After a ``>`` prompt the parser's data machine hands
out payload; ``uart.sending.Send`` gathers AT+CIPSEND/CIPSENDEX and streams
AT+CIPSENDL and passthrough into the link's uplink ring.  The session
(``bridged.at.session``) decides what the end of a phase says: SEND OK once
the whole payload is admitted into the ring, SEND FAIL if the link goes
first or so_sndtimeo passes while part of it waits for room.  Here: a phase
from its prompt to its end (the payload, the data-phase timer, Recv and SEND
OK, +++); a send waiting for room in a full ring is ``uart.roomwait``'s, what
+++ left of a stream ``uart.leftovers``'.
"""

from __future__ import annotations

import structlog

from bridged.at import format as fmt
from bridged.at.datamode import DataKind
from bridged.at.parser import DataChunk, DataComplete, DataEscaped
from bridged.at.session import Escaped, PayloadDone, Settled, State, prompt_event
from bridged.commands.options import SysMsg
from bridged.commands.registry import SendRequest
from bridged.uart.downlink import Passthrough
from bridged.uart.sending import Send
from bridged.uart.transcript import MarkKind

__all__ = ["DataPhases"]

log = structlog.get_logger()

_RECV_LINGER = 0.002  # seconds "Recv <n> bytes" may wait to share a write with its SEND OK
# The session's events of every send, made once (a frozen dataclass costs a call per field).
_DONE = {result: PayloadDone(result) for result in (None, fmt.SEND_OK, fmt.SEND_FAIL)}


class DataPhases:
    """Payload from the parser into uplink rings; a part of ``bridged.uart.front.Front``."""

    def _start_send(self, request: SendRequest) -> None:
        slot = self.links.slots[request.link_id]
        self.links.touch(request.link_id)
        state, now = self.ctx.state, self.loop.time()
        report, transmit = state.sendl_cfg
        chunk = transmit if request.kind is DataKind.SENDL else self.config.links.chunk
        self.sending = Send(slot, request.kind, request.length, request.remote, report, chunk)
        if self._leftovers:  # an escaped stream's rest goes first
            self.sending.ahead = self._leftover_for(request.link_id)
        # AT+CIPTCPOPT so_sndtimeo: a send the ring cannot admit ends within it.
        self.session.handle(prompt_event(request.kind, self._sndtimeo(self.sending)), now)
        if self.tap is not None:
            self.tap.mark(MarkKind.DATA_START, link=request.link_id, length=request.length,
                          kind=request.kind.name.lower())
        self.parser.start_data(request.kind, request.length, now, chunk, state.transintvl / 1000)
        if request.kind is DataKind.PASSTHROUGH:
            self.passthrough = Passthrough(request.link_id, slot.spec, slot.server)
        else:
            self._try_direct(self.sending)  # uart.direct

    def _process_data(self) -> bool:
        """Move payload towards the uplink ring; False when we must wait."""
        send = self.sending
        if send.direct:
            return False  # uart.direct reads the payload: the parser has none
        room = send.room() if send.streaming else None  # AT+CIPSEND/CIPSENDEX gather: any
        # uvloop's clock ticks in whole ms: when the timer fires the clock may
        # read a hair before its deadline, which would re-arm it at once.
        now = max(self.loop.time(), self._timer_fired_at)
        event = self.parser.next_event(limit=room, now=now)
        cls = type(event)  # the parser's events are final classes
        if cls is DataChunk:
            send.take(event.data, event.at)
            send.slot.last_activity = send.moved_at = now  # AT+CIPSTO: what the MCU sends is traffic too
            if send.kind is DataKind.SENDL:
                self._report_progress()
        elif cls is DataComplete:
            self._payload_complete(event.length)
        elif cls is DataEscaped:
            self._payload_escaped(event.leftover)
        else:  # NEED_DATA
            if room == 0:
                self._wait_room(send)  # reading resumes when the worker makes room
            self._arm_timer(room != 0)
            return False
        return True

    def _arm_timer(self, room: bool = True) -> None:
        """One timer for the data phase: the +++ guard time and AT+TRANSINTVL (not while
        the ring is full: the room's doorbell or poll brings the next look)."""
        deadline = self.parser.deadline(room)
        if self._timer is not None:
            if deadline is not None and self._timer_at == deadline:
                return  # already set for that time
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer_fired_at = self._timer_at
        self._timer = None
        self._process()

    def _payload_complete(self, length: int) -> None:
        if self.parser.buffered:  # more than <length> bytes: ESP-AT says busy
            self._refuse_busy(self.parser.discard_pending())
            if self.session.state is State.BOOTING:  # ... and an AT+RST among them restarted the chip
                return
        send = self.sending
        if self.tap is not None:
            self.tap.mark(MarkKind.DATA_END, link=send.slot.link_id, length=length)
        send.payload_done()
        result = send.result()
        effects = self.session.handle(_DONE.get(result) or PayloadDone(result), self.loop.time())
        if send.kind is not DataKind.SENDL:
            # Its SEND OK follows in this write when the ring took it all; else it
            # usually follows within a fraction of a ms: one write for both.
            if effects.out:
                return self._finish_send(effects.out, process=False, recv=fmt.recv_bytes(length))
            self.output.reply(fmt.recv_bytes(length), linger=_RECV_LINGER)
        else:
            self._report_progress()
        if effects.out:
            self._finish_send(effects.out, process=False)  # (the _process loop we are in goes on)
            return
        self._wait_room(send)
        if effects.deadline is not None:
            self.loop.call_at(effects.deadline, self._send_timed_out, send, effects.deadline)

    def _payload_escaped(self, leftover: bytes) -> None:
        send, self.sending = self.sending, None
        if self.tap is not None:
            self.tap.mark(MarkKind.DATA_END, link=send.slot.link_id, escaped=True)
        self._stop_waiting_room()
        self._resume_reading()  # command mode (the port may have been held for the full ring)
        self._keep_leftover(send, leftover)
        effects = self.session.handle(Escaped(quitt=SysMsg.QUIT_MESSAGE in self.ctx.state.sysmsg), self.loop.time())
        if send.kind is DataKind.PASSTHROUGH:
            log.info("passthrough_left", link_id=send.slot.link_id)
            self._leave_passthrough()
        else:
            log.info("send_cancelled", link_id=send.slot.link_id)
        self.output.reply(effects.out)

    def _report_progress(self) -> None:
        send = self.sending
        if send is not None and send.kind is DataKind.SENDL:
            data = self.parser.data
            self.output.reply(send.progress(data.received if data is not None else send.length))

    def _check_send(self) -> None:
        """Settle a complete send: SEND OK once all of it is admitted, SEND FAIL if its link went first."""
        send = self.sending
        if send is None or self.session.state is not State.AWAITING_SEND_OK:
            return
        send.pump()
        self._report_progress()
        result = send.result()
        if result is not None:
            self._finish_send(self.session.handle(Settled(result), self.loop.time()).out)
        elif send.waiting:
            self._wait_room(send)

    def _finish_send(self, result: bytes, process: bool = True, recv: bytes = b"") -> None:
        if self.sending is not None and self.sending.ahead is not None:
            self._keep_leftover(self.sending)  # a leftover it waited behind (SEND FAIL) is not its own
        self.sending = None
        if self._room_slot is not None:
            self._stop_waiting_room()
        if recv:  # its "Recv <n> bytes" first: one write, at once when nothing else waits
            self.output.reply_now(recv + result, result in fmt.FINALS)
        else:
            self.output.reply(result)
        self._resume_reading()
        if process:
            self._process()
