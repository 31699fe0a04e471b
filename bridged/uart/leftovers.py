"""What +++ left of a stream, on its way into the link's ring (a part of ``Front``).

Theory of operation.  +++ ends a stream whatever room its ring has.  The
bytes it had read but not yet put into the ring are the MCU's, sent before
it escaped: they go out as room comes (``sending.Leftover``), ahead of the
next send on the link.  (ESP-AT drops the UART bytes before the pattern its
core had not taken yet; keeping them loses nothing the MCU sent, and a peer
that reads sees one stream.)  They are looked at on a timer that backs off
while the peer stays deaf (a send started on the link takes them first);
AT+CIPCLOSE waits up to a second for their room, a restart drops them.
"""

from __future__ import annotations

import structlog

from bridged.uart.roomwait import ROOM_POLL
from bridged.uart.sending import Leftover, Send

__all__ = ["Leftovers"]

log = structlog.get_logger()

_LEFTOVER_POLL_MAX = 1.0  # seconds: a leftover's look backs off to this while its peer stays deaf


class Leftovers:
    """Escaped streams' bytes into their rings; a part of ``bridged.uart.front.Front``."""

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
        self._leftover_wait = ROOM_POLL  # a new one: looked at soon
        self._leftover_poll = self.loop.call_later(ROOM_POLL, self._push_leftovers)

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
        if leftover is not None and await leftover.drain(_LEFTOVER_POLL_MAX, ROOM_POLL) \
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
        """Escaped streams' bytes into their rings as room comes (a look every ROOM_POLL,
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
            self._leftover_wait = ROOM_POLL if moved else min(2 * self._leftover_wait, _LEFTOVER_POLL_MAX)
            self._leftover_poll = self.loop.call_later(self._leftover_wait, self._push_leftovers)
