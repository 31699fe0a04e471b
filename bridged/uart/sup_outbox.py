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
is dropped and logged, except ``FrontReady`` and ``PortFailed``: said once
each per front process, they still wait (the supervisor's start-up and its
exit status hang on them, and nothing would say them again).  A channel
that fails (the supervisor is gone) drops what waits: the front hears its
EOF and stops.  The ending front (``close``)
gives what still waits a bounded blocking try: PortFailed is said just before
the front ends, and the supervisor's exit status depends on it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque

import structlog

from bridged.ipc.control import send_message
from bridged.ipc.messages import FrontReady, PortFailed, Pong

__all__ = ["SupervisorOutbox"]

log = structlog.get_logger()

_MAX_WAITING = 64
_ONCE_PER_FRONT = (FrontReady, PortFailed)  # kept past _MAX_WAITING: bounded by their nature
_CLOSE_WAIT = 1.0  # seconds the ending front gives what still waits


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
        if len(self._waiting) >= _MAX_WAITING and not isinstance(msg, _ONCE_PER_FRONT):
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
        """Stop watching for room; the front is ending: what still waits gets up to _CLOSE_WAIT
        seconds to go (a PortFailed said just before the end must reach the supervisor, which
        reads on meanwhile), then is dropped."""
        if self.sock is None or self.sock.fileno() < 0:
            return
        self.loop.remove_writer(self.sock.fileno())
        if self._waiting and not self._send_waiting():
            self._last_flush()
        self._waiting.clear()

    def _last_flush(self) -> None:
        """Send what waits, waiting for room (the loop no longer runs our writer), within _CLOSE_WAIT."""
        deadline = time.monotonic() + _CLOSE_WAIT
        before = self.sock.gettimeout()
        try:
            while self._waiting and (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                send_message(self.sock, self._waiting[0])
                self._waiting.popleft()
        except OSError as exc:  # TimeoutError: the supervisor did not read in time; or it is gone
            log.warning("supervisor_messages_dropped", messages=[type(m).__name__ for m in self._waiting],
                        error=str(exc) or type(exc).__name__)
        finally:
            self.sock.settimeout(before)
