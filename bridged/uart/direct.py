"""AT+CIPSEND's payload read straight into the uplink ring (a part of ``Front``).

Theory of operation.  A plain AT+CIPSEND on a TCP or SSL link is the bulk
upload drivers use most, and its payload is opaque: ``<length>`` bytes, no
escapes, no interval, and a +++ only as a read of at most three '+'.  When
its ring already has room for all of it, the port is read with ``readv``
into the ring's free area (both of its pieces where it wraps at the ring's
end, plus a small spare buffer for bytes behind the payload), so the payload
is never copied in Python and the parser's data machine is skipped: nothing
is published until the last byte came, then the whole payload is committed
at once and the send settles as every send does
(``DataPhases._payload_complete``: busy p... for surplus, Recv, SEND OK, or
SEND FAIL if the link went meanwhile).

Whatever this path cannot decide as the data machine would -- a read of at
most three '+' while at least three payload bytes are left (a +++
candidate), a transcript or an injected input fault switched on mid-send --
hands the bytes read so far back to the parser, in order and with the time
of the last read, and the send goes on the general way.  The data machine
sees what it would have seen: no other read can be a +++ (``at.datamode``).
"""

from __future__ import annotations

import os

import structlog

from bridged.at import format as fmt
from bridged.at.datamode import DataKind
from bridged.at.errors import AtError
from bridged.at.session import State
from bridged.commands.send import quick_send
from bridged.uart.dispatch import COMMAND_NAME
from bridged.uart.reading import COALESCE_FULL, TTY_FULL
from bridged.uart.sending import Send

__all__ = ["DirectPayload", "SPARE"]

SPARE = 4096  # bytes read behind a payload in the same read: refused busy, as ESP-AT does
_PLUS = b"+++"
_SMALL = 3  # a read this short, of '+' only, with as many left, may be a +++: the data machine decides

log = structlog.get_logger()


class DirectPayload:
    """The direct path; a part of ``bridged.uart.front.Front`` (uses its attributes)."""

    def _quick_line(self, data: bytes) -> bool:
        """``data``, one whole read, is a send line this session prompted before (a bulk
        upload's AT+CIPSEND=<id>,<len>, again and again): its prompt and data phase at once,
        as ``CommandDispatch`` answers it, without the parser's framing and the dispatch's
        walk.  Only where the general way would do just that: the session reads commands,
        the parser holds nothing (no start of a line, no over-long line being dropped), the
        output is not backlogged (it holds command lines), no fault or transcript looks at
        commands, and every check of ``quick_send`` passes; else False: the general way."""
        if (self.session.state is not State.COMMAND or not self.parser.idle or self.output.backlogged
                or self.faults.at_commands or self.tap is not None):
            return False
        quick = quick_send(self.ctx, data)
        if quick is None:
            return False
        if self.ctx.state.echo:
            self.output.reply(data)
        COMMAND_NAME.set(quick[1])  # structlog's bound ``command``, as CommandDispatch._execute sets it
        try:
            self._start_send(quick[0])
            self.output.reply_now(fmt.PROMPT)  # (as if queued before: starting the send queues nothing)
        except Exception:
            log.exception("command_crashed")  # our bug, not the host's: as CommandDispatch._process
            self._error(AtError("internal error"))
        if self.sending is None or not self.sending.direct:
            self._process()  # the parser's data phase (or what a crash left) goes on as after a dispatched line
        return True

    def _try_direct(self, send: Send) -> None:
        """Read this send's payload straight into its ring, if nothing needs the general way."""
        data = self.parser.data
        if (send.kind is DataKind.SEND and not send.datagram and send.ahead is None
                and self.tap is None and self.rx_fault is None and self._paced is None
                and data is not None and data.fresh and send.alive()
                and send.slot.uplink.free() >= send.length):
            send.direct = True
            send.direct_at = self.loop.time()

    def _read_direct(self, send: Send) -> bytes | None:
        """One read of the payload; None when it is handled here, else the bytes
        the general path takes on with (this read's: the earlier ones are the
        parser's already).  OSError as os.read raises it (after a full read below:
        that read is staged already, as if it had been a wake-up of its own)."""
        left = send.length - send.staged
        view = send.slot.uplink.reserve(send.staged, left)  # there was room for all of it
        # (_free_views, its common case inline: the payload's rest does not wrap at the ring's end)
        buffers = [view, self._spare] if view is not None and len(view) == left else self._free_views(send, left)
        if buffers is None:
            return None  # an index read torn (32-bit CPUs): the port is still readable, look again
        n = os.readv(self.fd, buffers)
        if not n:
            return b""  # EOF: the device hung up (uart.reading), the send waits as it stands
        if (n <= _SMALL and left >= _SMALL and _head(buffers, n) == _PLUS[:n]) or self.tap is not None \
                or self.rx_fault is not None:
            return self._direct_fallback(send, left, n)
        now = self.loop.time()
        if self._serial is not None:
            self._serial.after_read(n)
        self.counters.rx_bytes += n
        send.slot.last_activity = send.moved_at = send.direct_at = now  # AT+CIPSTO: traffic
        if n < left:
            send.staged += n
            if n >= TTY_FULL:
                # It emptied a full tty buffer: the rest the MCU wrote waits in the tty's flip
                # buffers, which a read finding that buffer empty pushes in (uart.reading's drain).
                # So read on now: an 8 KiB payload on a pty is one wake-up, not three.  (Bounded:
                # each read stages a buffer's worth of a payload of at most 8192 bytes.)
                self._last_read = now
                return self._read_direct(send)
            if n >= COALESCE_FULL:  # the tty buffer was full: not paused (_coalesce's rule, inline)
                self._last_read = now
            else:
                self._coalesce(n, now)  # uart.reading: a stream at UART speed is read every few ms
            return None
        send.staged = send.length
        send.direct = False
        self.counters.direct_sends += 1  # the whole payload went this way (not one begun, then handed back)
        self.parser.end_data()  # every payload byte was read past it
        if n > left:
            self.parser.receive_bytes(bytes(self._spare[:n - left]), now)  # _payload_complete refuses it
        self._payload_complete(send.length)
        return None

    def _free_views(self, send: Send, left: int) -> list | None:
        """Where the rest of the payload goes: the ring's free area, both of its pieces where it
        wraps (one read takes what the MCU wrote at once, as os.read does: a '+++' cut off at the
        ring's end would be a +++ candidate), then the spare for bytes behind the payload."""
        ring = send.slot.uplink
        view = ring.reserve(send.staged, left)  # there was room for all of it
        if view is None:
            return None
        if len(view) == left:
            return [view, self._spare]
        rest = ring.reserve(send.staged + len(view), left - len(view))  # from the ring's start
        return None if rest is None else [view, rest, self._spare]

    def _direct_fallback(self, send: Send, left: int, n: int) -> bytes:
        """Give the parser the bytes read past it, and return this read's for the general path."""
        region = send.slot.uplink.unpublished(send.staged + min(n, left))
        if n > left:
            region += self._spare[:n - left]
        earlier = bytes(region[:send.staged])
        send.direct = False
        self.counters.direct_fallbacks += 1
        send.staged = 0
        if earlier:
            self.parser.receive_bytes(earlier, send.direct_at)
        return bytes(region[len(earlier):])


def _head(buffers: list, n: int) -> bytes:
    """The first ``n`` (at most three) bytes a read put into ``buffers``."""
    out = b""
    for buf in buffers:
        out += bytes(buf[:n - len(out)])
        if len(out) == n:
            break
    return out
