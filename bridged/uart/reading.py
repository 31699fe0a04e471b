"""The UART front's reading of the serial port (a part of ``Front``).

Theory of operation.  The read gate (``bridged.readgate``) calls
``_on_readable`` while the port is readable and nothing holds it shut; what
is done with the bytes is the session's (``bridged.at.session.Input``):
dropped while booting, refused with ``busy p...`` while a command or a send
waits, left in the port while an answer's after-action waits, parsed
otherwise.  A device that hangs up is waited for (``uart.replug``).  A
stream's full ring holds the port, then has it read for +++ into a bounded
buffer (``_hold_stream``).
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

import structlog

from bridged.at import format as fmt
from bridged.at.datamode import DataKind
from bridged.at.session import Input
from bridged.ipc.messages import PortFailed
from bridged.uart.flow import Flow

if TYPE_CHECKING:
    from bridged.uart.sending import Send

__all__ = ["COALESCE_FULL", "COALESCE_PASSTHROUGH", "PortReading", "TTY_FULL"]

log = structlog.get_logger()

_READ_SIZE = 65536
_FORCE_RESTART = b"AT+RST\r\n"
_COALESCE = 0.004  # seconds between reads of a data phase streaming at UART speed
# ... of a passthrough stream, as ESP-AT packs it (AT+TRANSINTVL, 2920 bytes): fewer, fuller
# ticks; its +++ then needs up to 20 ms + this of silence (_coalesce). At most half the +++
# guard time, so a +++ that may escape is never read on a tick (_coalesce). Not AT+CIPSEND's
# or AT+CIPSENDL's: their SEND OK waits for their last bytes.
COALESCE_PASSTHROUGH = 0.008
TTY_FULL = 3968  # bytes: a read this big emptied a full tty buffer (4 KiB): more may wait behind
_COALESCE_MIN = 512  # bytes: smaller reads are interactive
_COALESCE_RATE = 2_000_000  # bytes/s: faster input is read at once
COALESCE_FULL = 3072  # bytes: a read this big (a tty buffer is 4 KiB) is not paused after
_PAUSE = "coalesce"  # the read gate's hold for a coalescing pause (ended by the tick alone)
_LISTEN_AFTER = 1.0  # seconds a stream's full ring holds the port before it is read for +++
_SIDE = 32768  # bytes of a stream a full ring may hold back while the port is read for +++
_GONE = (errno.EIO, errno.ENXIO, errno.ENODEV)  # a read saying the device went away
_QUICK_LINE = 64  # bytes: a longer read is no AT+CIPSEND line alone (uart.direct._quick_line)


class PortReading:
    """Reading the port; a part of ``bridged.uart.front.Front`` (uses its attributes)."""

    def _resume_reading(self) -> None:
        if self._gate.open_fd == self.fd and not (self._listening or self._side_full or self._listen_timer):
            return  # read already, and not listening (after every send: a plain check)
        self._end_listening()
        if self._replug is not None and self._replug.away:
            return  # the device is gone: reading resumes when it is back
        self._gate.open(self.fd)

    def _pause_reading(self) -> None:
        self._end_listening()
        self._gate.shut()
        self._hold_off()

    # -- a stream's ring is full: held, then listening for +++ ---------------------

    def _hold_stream(self, send: Send) -> None:
        """A stream (AT+CIPSENDL, passthrough) waits for room in its ring.

        Its input is held back at once (flow control: RTS, or the tty's buffer
        fills and stops the MCU).  But ESP-AT hears +++ whatever its send buffer
        holds, and an MCU whose stream stalled sends +++ to get out: so after
        _LISTEN_AFTER the port is read again, its bytes kept in the data
        machine's buffer (they go into the ring first when room comes), until it
        holds _SIDE bytes more than at the stall: enough for what a tty buffers
        (a pty ~20 KiB) and a +++ behind it, whatever the read that filled the
        ring left over (a tick's drain: up to a pty's 20 KiB).  Then the port is
        held until room comes, and the log says so.
        """
        if self._listening:
            if self._side_room() > 0:
                return  # keep reading: a +++ may come
            self._side_held(send)
        self._gate.shut()
        self._hold_off()
        if self._listen_timer is None and not self._side_full:
            self._listen_timer = self.loop.call_later(_LISTEN_AFTER, self._listen, send)

    def _listen(self, send: Send) -> None:
        self._listen_timer = None
        if self.sending is not send or self._room_slot is not send.slot or self.parser.data is None:
            return  # room came, or the send ended meanwhile
        if self._replug is not None and self._replug.away:
            return
        log.info("uart_listening", link_id=send.slot.link_id, held=self.parser.data.buffered, side=_SIDE,
                 why="the uplink ring is full: the port is read for +++ into a bounded buffer")
        self._listening = True
        self._side_base = self.parser.data.buffered
        self._gate.open(self.fd)

    def _side_room(self) -> int:
        data = self.parser.data
        return _SIDE + self._side_base - data.buffered if data is not None else 0

    def _side_held(self, send: Send) -> None:
        self._listening = False
        self._side_full = True
        flow = Flow(self._serial.settings.flow).name.lower() if self._serial is not None else "pty"
        # Flow control (a pty's writer blocks alike) holds the MCU: that is its job. Without it,
        # a real UART's driver drops what overflows: worth a warning.
        say = log.warning if flow == "none" else log.info
        say("uart_input_held", link_id=send.slot.link_id, held=self.parser.data.buffered, flow=flow,
            why="the uplink ring and the +++ buffer are full: input stays in the port until room comes "
                "(flow control holds the MCU; without it the UART driver drops what overflows, +++ included)")

    def _end_listening(self) -> None:
        self._listening = self._side_full = False
        if self._listen_timer is not None:
            self._listen_timer.cancel()
            self._listen_timer = None

    def _hold_off(self) -> None:
        """Input is held back (RTS): the paced line idles meanwhile, it does not fall behind."""
        if self._paced is not None:
            self._paced.pacer.hold_off()

    def _on_readable(self) -> None:
        send = self.sending
        # A plain AT+CIPSEND's payload (uart.direct), a bulk upload's hot path: every check
        # below passes the same way for it (a data phase is parsed and never held for the
        # output's backlog; a direct send is never paced nor listening), so they are skipped.
        if send is not None and send.direct and not self._listening:
            try:
                data = self._read_direct(send)
            except BlockingIOError:
                return
            except OSError as exc:
                self._read_failed(exc)
                return
            if data is not None and (data or not self._ticking):  # (an empty tick read: below)
                self._took(data, self.session.input, _READ_SIZE)
            return
        disposition = self.session.input
        if disposition is Input.LEAVE:
            # Left in the port until the after-action ran: held behind output the MCU
            # does not read, input would pile up here without bound.
            self._pause_reading()
            return
        if self.output.backlogged and self._backlogged():
            return
        size = _READ_SIZE if self._paced is None else self._paced.budget()
        if self._listening:
            size = min(size, self._side_room())
            if size <= 0:
                self._hold_stream(self.sending)  # held: the +++ buffer is full
                return
        if not size:
            return  # the line is busy: read again when it has room
        try:
            data = os.read(self.fd, size)
            if self._ticking:
                if not data:
                    # Not EOF: a tick reads unasked, and a tty set to VMIN 0 (a serial port)
                    # reads empty then. The gate, open again (_on_tick), hears a hang-up.
                    return
                if len(data) >= TTY_FULL:
                    data = self._drain(data, size)
        except BlockingIOError:
            return
        except OSError as exc:
            self._read_failed(exc)
            return
        self._took(data, disposition, size)

    def _drain(self, data: bytes, size: int) -> bytes:
        """A tick's read that emptied a full tty buffer: read on, up to ``size``.

        n_tty hands out at most its 4 KiB buffer per read; the rest waits in
        the tty's flip buffers, which a read finding that buffer empty pushes
        in at once.  So one tick takes all that gathered, not one buffer of it.
        """
        parts = [data]
        got = len(data)
        while got < size:
            try:
                more = os.read(self.fd, size - got)
            except OSError:
                break  # nothing more (EAGAIN), or the device went (EIO): the next read says so again
            if not more:
                break  # EOF: the next read says so again (hung up)
            parts.append(more)
            got += len(more)
            if len(more) < TTY_FULL:
                break
        return b"".join(parts)

    def _took(self, data: bytes, disposition: Input, size: int) -> None:
        """Bytes read from the port (``size`` asked for): to the session's ``disposition``."""
        if not data:
            self._hung_up("hung up (unplugged?)")
            return
        if self._paced is not None:
            self._paced.took(self.fd, size, len(data))
        if self._serial is not None:
            self._serial.after_read(len(data))
        if self.tap is not None:
            self.tap.received(data)
        # Counted whatever becomes of them (an injected overrun's loss, the boot's): all that
        # was read, as bytes_out is all that was written; the input fault offsets rest on it.
        self.counters.rx_bytes += len(data)
        if self.rx_fault is not None and not (data := self.rx_fault(data)):
            return  # an injected overrun lost all of it
        if disposition is Input.DROP:
            self.boot.drop(len(data))
            return
        if disposition is Input.REFUSE:
            self._refuse_busy(data)
            return
        now = self.loop.time()
        if disposition is Input.PARSE and len(data) <= _QUICK_LINE and self._quick_line(data):
            pass  # uart.direct: a send line prompted before, the prompt at once
        else:
            self.parser.receive_bytes(data, now)
            self._process()
        if self._paced is None and not self._listening:  # paced reads come in slices already
            if len(data) < _COALESCE_MIN:  # a small, interactive read only has its time noted (inline)
                self._last_read = now
            else:
                self._coalesce(len(data), now)

    def _read_failed(self, exc: OSError) -> None:
        if exc.errno in _GONE and self._replug is not None:
            self._hung_up(exc.strerror)
            return
        log.error("uart_read_failed", error=str(exc))
        self._pause_reading()
        self.loop.call_later(0.5, self._resume_reading)

    def _hung_up(self, why: str) -> None:
        """The device went away (a read gave EOF, as a tty does only once hung
        up, or EIO; a write EIO): stop reading and writing, keep the session,
        and reopen the device when it returns (bridged.uart.replug)."""
        self._pause_reading()  # it stays readable: EOF again and again
        if self._replug is not None:
            self.output.suspend()
            self._replug.lost(why)
            return
        # The pty's master never hangs up (we hold its slave): if it did, a new front makes a new one.
        self.port_lost = f"{self.port_name} {why}; plug the device in or choose another --port"
        self._tell_supervisor(PortFailed(self.port_lost))
        self.stop()

    def _on_write_failed(self, exc: OSError) -> None:
        # EIO, as a hung-up tty says; anything else too leaves a port we
        # cannot write to: reopened, it gets a fresh start.
        self._hung_up(exc.strerror or str(exc))

    def _port_back(self, fd: int) -> None:
        """The device is back, reopened with the settings in force: carry on."""
        self.fd = fd
        self.output.resume(fd)
        self._resume_reading()
        self._process()

    def _coalesce(self, size: int, now: float) -> None:
        """While the MCU streams a data phase at UART speed, read every few ms.

        At 0.5 MB/s (5 Mbaud) an MCU writing 1 KiB pieces would wake us 500
        times a second; the kernel can gather a few ms of them instead: every
        _COALESCE, or COALESCE_PASSTHROUGH from a passthrough stream's first
        tick on.  Only for a steady
        stream at UART rates: commands, +++ and interactive bytes (small reads)
        and faster bulk input (a pty, or catching up) are read at once.

        A byte's arrival time may read up to one period late, never early (it
        is the time of the read).  So +++ after streamed data needs up to
        20 ms + the period of silence before it (24 ms after AT+CIPSEND's or
        AT+CIPSENDL's data, 28 ms in passthrough; an MCU waiting 1 s, as
        drivers do, always escapes), and a '+++' inside a stream, read with
        less silence before it than 20 ms, is never taken for an escape.  The
        silence after +++ is exact: a +++ with 20 ms of silence before it came
        after the tick that found the stream gone (a pause is never longer
        than half the guard time), so the gate is open and it is read at once.
        """
        interval, self._last_read = now - self._last_read, now
        data = self.parser.data
        if data is None or not (self._gate.is_open or self._ticking and self._gate.paused_only(_PAUSE)):
            return  # (a tick's read that filled the ring: the gate is shut, not paused)
        # A passthrough stream goes on to the longer period from its first tick on: the pause a
        # read starts is _COALESCE's, as for any data phase (bulk input held up by a full ring
        # reads slowly for a moment; its first tick, reading it all at once, ends the pausing).
        period = COALESCE_PASSTHROUGH if self._ticking and data.kind is DataKind.PASSTHROUGH else _COALESCE
        if not (_COALESCE_MIN <= size and interval < 2 * period and size < _COALESCE_RATE * interval):
            return
        # A read that nearly filled the tty buffer means the MCU is waiting on us: unless it is
        # a passthrough tick's, which drained them, on a port whose buffers take more than one
        # (a pty; a UART without flow control). (Bulk input is over _COALESCE_RATE: read at once.)
        if size >= COALESCE_FULL and not (self._ticking and period != _COALESCE and self._spills()):
            return
        if not self._ticking:  # (on a tick the gate is still held)
            # A hold, not shut(): its end must not reopen a read a full ring shut meanwhile.
            self._gate.hold(_PAUSE, press=False)  # a pause, not back-pressure: RTS stays up
        self._port_paused = True
        self._arm_tick(period)

    def _spills(self) -> bool:
        """Whether input past the tty's 4 KiB buffer waits in its flip buffers (64 KiB)
        instead of stopping the MCU: a pty, or a UART without flow control."""
        return self._serial is None or self._serial.settings.flow == Flow.NONE

    def _arm_tick(self, period: float = COALESCE_PASSTHROUGH) -> None:
        """One timer ends the coalescing pauses under way (the port's, a passthrough
        downlink's: ``uart.downlink``), so both directions of a stream share a wake-up."""
        if self._tick is None:
            self._tick = self.loop.call_later(period, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        try:
            if self._port_paused:
                self._tick_read()
        finally:
            self._end_down_pauses()  # uart.downlink

    def _tick_read(self) -> None:
        """Read here, the gate still held: a stream still under way pauses again
        (_coalesce) with no epoll_ctl pair and no loop turn per tick."""
        self._port_paused = False
        try:
            if self._gate.paused_only(_PAUSE):
                self._ticking = True
                self._on_readable()
        finally:
            # Even past a bug of ours that raised in there: from the gate's read callback it
            # cost a log line, the next read going on; the pause kept, the port stayed unread.
            self._ticking = False
            if not self._port_paused:
                self._gate.release(_PAUSE)  # opens only if nothing else keeps it shut

    def _refuse_busy(self, data: bytes) -> None:
        """Input while a command runs is discarded, one busy p... per chunk."""
        if _FORCE_RESTART in data:
            self.output.reply(fmt.FORCE_RESTART)
            rest = len(data) - data.index(_FORCE_RESTART) - len(_FORCE_RESTART)
            self._restart(False, dropped=rest)
            return
        log.info("busy_refused", bytes=len(data))
        if self.ctx.state.syslog:
            self.output.reply(fmt.err_code(0x010B0000))
        self.output.reply(fmt.BUSY)
