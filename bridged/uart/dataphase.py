"""The UART front's data phases: AT+CIPSEND, CIPSENDEX, CIPSENDL, passthrough (a part of ``Front``).

Theory of operation.  After a ``>`` prompt the parser's data machine hands
out payload; ``uart.sending.Send`` gathers AT+CIPSEND/CIPSENDEX and streams
AT+CIPSENDL and passthrough into the link's uplink ring.  The session
(``bridged.at.session``) decides what the end of a phase says: SEND OK once
the whole payload is admitted into the ring, SEND FAIL if the link goes
first or so_sndtimeo passes while part of it waits for room.  While the ring
is full the front asks the worker for its space doorbell (otherwise the
worker never rings it, and the front needs no wake-up per send), and a send
still streaming stops reading the port (the tty buffer fills, RTS drops),
then listens for +++ into a bounded buffer (``uart.reading._hold_stream``); a
complete one waiting for room has input refused, busy p... (the session's
AWAITING_SEND_OK), so AT+RST still restarts.

+++ ends a stream whatever room its ring has.  The bytes it had read but not
yet put into the ring are the MCU's, sent before it escaped: they go out as
room comes (``sending.Leftover``), ahead of the next send on the link.  (ESP-AT
drops the UART bytes before the pattern its core had not taken yet; keeping
them loses nothing the MCU sent, and a peer that reads sees one stream.)
"""

from __future__ import annotations

import structlog

from bridged.at import format as fmt
from bridged.at.datamode import DataKind
from bridged.at.parser import DataChunk, DataComplete, DataEscaped
from bridged.at.session import Escaped, PayloadDone, Settled, State, Tick, prompt_event
from bridged.commands.options import SysMsg
from bridged.commands.registry import SendRequest
from bridged.uart.downlink import Passthrough
from bridged.uart.links import Slot
from bridged.uart.sending import Leftover, Send
from bridged.uart.transcript import MarkKind

__all__ = ["DataPhases"]

log = structlog.get_logger()

_ROOM_POLL = 0.05  # seconds between looks at a full uplink ring while a send waits for room
_LEFTOVER_POLL_MAX = 1.0  # seconds: a leftover's look backs off to this while its peer stays deaf
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

    def _keep_leftover(self, send: Send, data: bytes = b"") -> None:
        """A send ended: what it still held for the link goes out as room comes
        (``sending.Leftover``), while the MCU is back in command mode.  That is
        an escaped stream's bytes read but not yet in its full ring, behind what
        an earlier escape left in front of this send (``Send.ahead``): a send
        cancelled, failed or escaped again does not take those with it."""
        leftover, send.ahead = send.ahead, None
        if leftover is None:
            if not data:
                return
            leftover = Leftover(send, data)
        else:
            leftover.data += data  # the MCU sent these after the earlier ones
        link_id = send.slot.link_id
        if not leftover.alive():
            log.warning("escaped_bytes_dropped", link_id=link_id, bytes=len(leftover.data),
                        why="the link ended before its ring had room for them")
            return
        if leftover.push():
            return
        log.info("escaped_bytes_kept", link_id=link_id, bytes=len(leftover.data))
        self._leftovers[link_id] = leftover
        if self._leftover_poll is not None:
            self._leftover_poll.cancel()
        self._leftover_wait = _ROOM_POLL  # a new one: looked at soon
        self._leftover_poll = self.loop.call_later(_ROOM_POLL, self._push_leftovers)

    def _drop_leftovers(self) -> None:
        """A restart: the links go unheard, and what +++ left of their streams with them."""
        pending = list(self._leftovers.values())
        if self.sending is not None and self.sending.ahead is not None:
            pending.append(self.sending.ahead)
            self.sending.ahead = None
        for leftover in pending:
            log.info("escaped_bytes_dropped", link_id=leftover.slot.link_id, bytes=len(leftover.data),
                     why="restart")
        self._leftovers.clear()
        if self._leftover_poll is not None:
            self._leftover_poll.cancel()
            self._leftover_poll = None

    async def _before_close(self, link_id: int) -> None:
        """AT+CIPCLOSE: what a +++ left of the link's stream goes into its ring first, if room comes
        within _LEFTOVER_POLL_MAX (the look's longest wait, which would else have it dropped)."""
        leftover = self._leftovers.get(link_id)
        if leftover is not None and await leftover.drain(_LEFTOVER_POLL_MAX, _ROOM_POLL) \
                and self._leftovers.pop(link_id, None) is leftover:
            log.info("escaped_bytes_sent", link_id=link_id, at="close")

    def _leftover_for(self, link_id: int) -> Leftover | None:
        leftover = self._leftovers.pop(link_id, None)
        if leftover is not None and not leftover.alive():
            log.warning("escaped_bytes_dropped", link_id=link_id, bytes=len(leftover.data),
                        why="the link ended before its ring had room for them")
            return None
        return leftover

    def _push_leftovers(self) -> None:
        """Escaped streams' bytes into their rings as room comes (a look every _ROOM_POLL,
        no doorbell: the ring's is the sends'; a look that moved nothing doubles the wait, up to
        _LEFTOVER_POLL_MAX, so a peer deaf for long costs a wake-up a second, not 20; one that
        moved bytes brings it back).  A send started on the link meanwhile took its own."""
        self._leftover_poll = None
        moved = False
        for link_id, leftover in list(self._leftovers.items()):
            before = len(leftover.data)
            if not leftover.alive():
                log.warning("escaped_bytes_dropped", link_id=link_id, bytes=len(leftover.data),
                            why="the link ended before its ring had room for them")
                del self._leftovers[link_id]
            elif leftover.push():
                log.info("escaped_bytes_sent", link_id=link_id)
                del self._leftovers[link_id]
            moved = moved or len(leftover.data) != before
        if self._leftovers:
            self._leftover_wait = _ROOM_POLL if moved else min(2 * self._leftover_wait, _LEFTOVER_POLL_MAX)
            self._leftover_poll = self.loop.call_later(self._leftover_wait, self._push_leftovers)

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
            self._room_poll = self.loop.call_later(_ROOM_POLL, self._poll_room)

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

