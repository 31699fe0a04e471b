"""The front's messages to the supervisor, none lost to a full channel.

Theory of operation: the front's end of the supervisor channel is
non-blocking (the front never waits on the supervisor, which may be busy
reaping or killing children).  A message the channel cannot take now is kept,
in order, and sent when the channel is writable again (one ``add_writer``
while anything waits); a message sent behind a waiting one waits too, so the
supervisor hears them in the order the front said them.  What must arrive
does: ``WorkerRefused`` (else a hostile worker the front refused holds its
link id for good), ``FrontReady``, ``PortFailed``.  A ``Pong`` answers the
supervisor's latest ping only (``bridged.liveness`` compares its seq), so a
waiting one is replaced by a newer one rather than queued behind it.

Bounded: the supervisor sends a ping per heartbeat and each refusal ends a
worker it must restart, so a handful of messages wait at most; past
``_MAX_WAITING`` (a supervisor that stopped reading for good) a new message
is dropped and logged.  A channel that fails (the supervisor is gone) drops
what waits: the front hears its EOF and stops.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque

import structlog

from bridged.ipc.control import send_message
from bridged.ipc.messages import Pong

__all__ = ["SupervisorOutbox"]

log = structlog.get_logger()

_MAX_WAITING = 64


class SupervisorOutbox:
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket | None) -> None:
        self.loop = loop
        self.sock = sock
        self._waiting: deque[object] = deque()

    def send(self, msg: object) -> None:
        """Send ``msg`` now, or as soon as the channel has room; never blocks."""
        if self.sock is None:
            return
        if self._waiting:
            self._keep(msg)
            return
        try:
            send_message(self.sock, msg)
        except BlockingIOError:
            log.info("supervisor_channel_full", message=type(msg).__name__)
            self._keep(msg)
            self.loop.add_writer(self.sock.fileno(), self._flush)
        except OSError as exc:
            log.warning("supervisor_unreachable", error=str(exc))

    def _keep(self, msg: object) -> None:
        if isinstance(msg, Pong):
            for i, waiting in enumerate(self._waiting):
                if isinstance(waiting, Pong):
                    del self._waiting[i]  # it answered an older ping: the newer answer replaces it
                    break
        if len(self._waiting) >= _MAX_WAITING:
            log.error("supervisor_message_dropped", message=type(msg).__name__, waiting=len(self._waiting))
            return
        self._waiting.append(msg)

    def _flush(self) -> None:
        """The channel is writable: send what waits, in order, while it takes them."""
        if self._send_waiting():
            self.loop.remove_writer(self.sock.fileno())

    def _send_waiting(self) -> bool:
        """Send what waits while the channel takes it; False while some still wait for room."""
        while self._waiting:
            try:
                send_message(self.sock, self._waiting[0])
            except BlockingIOError:
                return False
            except OSError as exc:
                log.warning("supervisor_unreachable", error=str(exc), dropped=len(self._waiting))
                self._waiting.clear()  # the supervisor is gone: the front hears its EOF and stops
                return True
            log.info("supervisor_message_sent_late", message=type(self._waiting.popleft()).__name__)
        return True

    def close(self) -> None:
        """Stop watching for room: a last try, then what still waits is dropped (the front is
        ending, or the channel failed)."""
        if self.sock is None or self.sock.fileno() < 0:
            return
        self.loop.remove_writer(self.sock.fileno())
        if self._waiting and not self._send_waiting():
            log.warning("supervisor_messages_dropped", messages=[type(m).__name__ for m in self._waiting])
        self._waiting.clear()
