"""Liveness: the supervisor asks every child for a heartbeat; one that does
not answer is killed and restarted as a crashed one is.

Theory of operation.  The supervisor holds a channel to each child (the
front's supervisor channel; each link worker's own heartbeat socketpair,
made when it is forked).  Every ``[watchdog] heartbeat_ms`` it sends each
child a ``Ping`` (never blocking: a child that does not read its socket
fills it, and the ping is simply not sent); the child's event loop answers
``Pong`` with the same number (`answer_pings`, or the front's own handler).
A child whose previous ping is still unanswered at the next tick has missed
one; after ``missed_heartbeats`` in a row it is stuck (a busy loop, a
deadlock, SIGSTOP): it gets SIGABRT (faulthandler, enabled in every child,
writes its Python stack to the log) and SIGCONT (a stopped process handles
nothing), and SIGKILL `KILL_GRACE` seconds later if it is still there.  Its
death is then reaped like any crash: logged, restarted with the backoff.

Counting missed ticks rather than measuring time makes a supervisor that was
itself held up (a loaded machine) no reason to kill anyone: each tick counts
at most one miss, and answers queued meanwhile are read before the tick.
The link workers' answers are read only then (`drain`): nothing waits for
them sooner, so they cost the supervisor no wake-up of its own; the front's
come on the supervisor channel, which is read at once for its other messages.

The one periodic wake-up an idle daemon keeps: every child once per
``heartbeat_ms`` (1 s by default) for its ping, the supervisor once for the
tick and once for the front's answer.  The supervisor sleeps until the next
tick (`next_due`), not on a poll.

The service watchdog (WATCHDOG=1) is fed only while the front answers
(`Liveness.answering`): a front stuck for good stops the pings, and systemd
restarts the whole service if the supervisor cannot recover it first.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Callable

import structlog

from bridged import spawn, systemd
from bridged.ipc.control import ControlError, encode, recv_message
from bridged.ipc.messages import Ping, Pong
from bridged.ops import events
from bridged.spawn import Child

__all__ = ["KILL_GRACE", "Liveness", "Report", "answer_pings"]

log = structlog.get_logger()

KILL_GRACE = 2.0  # seconds from SIGABRT (the stack dump) to SIGKILL
_DRAIN_MAX = 64  # messages taken from one channel per tick at most (a child answers one per ping)
STATUS_EVERY = 2.0  # seconds between STATUS= updates at most


class Liveness:
    """The supervisor's side: pings, missed answers, killing the stuck."""

    def __init__(self, interval: float, misses: int) -> None:
        self.interval = interval
        self.misses = misses
        # fileno -> (child, its channel, whether we own and read it: not the front's,
        # which the supervisor reads itself and hands us its Pongs, `answered`)
        self._channels: dict[int, tuple[Child, socket.socket, bool]] = {}
        self._next_tick = 0.0

    def configure(self, interval: float, misses: int) -> None:
        self.interval, self.misses = interval, misses
        # A reload to a shorter heartbeat applies now, not once the old, longer wait is over.
        self._next_tick = min(self._next_tick, time.monotonic() + interval)

    def watch(self, child: Child, channel: socket.socket, owned: bool = True) -> None:
        """A child just forked: ping it on ``channel``; an ``owned`` one is
        read by `tick` (`drain`) and closed by `forget`."""
        self.forget(child)
        if owned:
            channel.setblocking(False)  # read only when a tick is due (`drain`), never waiting
        child.seq = child.answered = child.missed = 0
        child.kill_at = None
        self._channels[channel.fileno()] = (child, channel, owned)

    def forget(self, child: Child) -> None:
        """The child is gone: drop its channel (closing an owned one)."""
        for fd, (c, channel, owned) in list(self._channels.items()):
            if c is child:
                del self._channels[fd]
                if owned:
                    channel.close()
        child.kill_at = None

    def channels(self) -> list[socket.socket]:
        """The channels we own (`read`, `drain`): every one but the front's."""
        return [channel for _, channel, owned in self._channels.values() if owned]

    def read(self, channel: socket.socket) -> Pong | None:
        """Take one answer from a channel; the Pong, if it answers the last ping."""
        return self._take(channel)[1]

    def drain(self) -> None:
        """Take the answers queued on the channels we own (`tick` does, before it
        counts misses): `_DRAIN_MAX` each at most, so a child flooding its channel
        costs a tick a bounded read (and hides its own answer: a miss)."""
        for channel in self.channels():
            for _ in range(_DRAIN_MAX):
                if not self._take(channel)[0]:
                    break

    def _take(self, channel: socket.socket) -> tuple[bool, Pong | None]:
        """(whether more may be queued, the Pong if one answering the last ping came)."""
        entry = self._channels.get(channel.fileno())
        if entry is None:
            return False, None
        child = entry[0]
        try:
            received = recv_message(channel)
        except (BlockingIOError, InterruptedError):
            return False, None
        except ControlError:  # a packet that is no message: not an answer, and no end either
            return True, None
        except OSError:
            received = None
        if received is None:
            # EOF: the child is dying (its reaping forgets it), or it closed its end
            # and lives on (a bug, or hostile): either way it answers no more pings,
            # and the misses get a live one aborted.  Still watched, never forgotten here.
            return False, None
        msg, fds = received
        for fd in fds:  # a child has no descriptor to give us: a hostile one would exhaust ours
            os.close(fd)
        return True, (msg if isinstance(msg, Pong) and self.answered(child, msg) else None)

    @staticmethod
    def answered(child: Child, msg: Pong) -> bool:
        """The child's Pong: True if it answers the last ping."""
        if msg.seq != child.seq:
            return False
        child.answered, child.missed = msg.seq, 0
        return True

    def answering(self, child: Child) -> bool:
        """The child is alive and answered its last ping before this tick."""
        return bool(child.pid) and child.missed == 0

    def next_due(self) -> float:
        """When `tick` has something to do: the next pings, or a stuck child's SIGKILL."""
        kills = [c.kill_at for c, _, _ in self._channels.values() if c.kill_at is not None and c.pid]
        return min([self._next_tick, *kills])

    def tick(self, now: float, ping_for: Callable[[Child, int], Ping]) -> None:
        """Count misses, kill the stuck, send the next pings; SIGKILL those past their grace."""
        for child, _, _ in list(self._channels.values()):
            if child.kill_at is not None and now >= child.kill_at and child.pid:
                log.warning("child_killed", role=child.role, pid=child.pid, **child.ident())
                spawn.kill(child.pid, signal.SIGKILL)
                child.kill_at = None
        if now < self._next_tick:
            return
        self._next_tick = now + self.interval
        self.drain()
        for child, channel, _ in list(self._channels.values()):
            if not child.pid or child.kill_at is not None:
                continue
            if child.seq and child.answered != child.seq:
                child.missed += 1
                if child.missed >= self.misses:
                    self._abort(child, now)
                    continue
            child.seq += 1
            try:
                channel.send(encode(ping_for(child, child.seq)), socket.MSG_DONTWAIT)
            except OSError:
                pass  # full (it does not read) or gone: the miss is counted next tick

    def _abort(self, child: Child, now: float) -> None:
        log.error("child_unresponsive", role=child.role, pid=child.pid, missed=child.missed,
                  seconds=round(child.missed * self.interval, 1), **child.ident())
        spawn.kill(child.pid, signal.SIGABRT)  # faulthandler dumps the stack...
        spawn.kill(child.pid, signal.SIGCONT)  # ... once it runs again, if it was stopped
        child.kill_at = now + KILL_GRACE


class Report:
    """What the heartbeats carry: to the front (its Ping) what only the
    supervisor knows, for `bridged status`; from it (its Pong) the summary
    line the supervisor gives systemd as STATUS=."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._events_sent = -1  # events.count() when the front last got our warnings
        self._status = (0.0, "")  # when the last STATUS= went out, and its text

    def front_started(self) -> None:
        self._events_sent = -1  # a new front has none of them
        self._status = (0.0, "")  # READY=1's STATUS= ("serving ...") replaced the last summary

    def ping(self, seq: int, children: list[Child]) -> Ping:
        """The front's Ping: uptime, restarts (front first), our warnings when they changed."""
        fresh = events.count() != self._events_sent
        self._events_sent = events.count()
        return Ping(seq, int((time.monotonic() - self.started) * 1000), tuple(c.restarts for c in children),
                    events.recent() if fresh else ())

    def show(self, summary: str) -> None:
        """STATUS=: the front's summary, when it changed, every STATUS_EVERY seconds at most."""
        now = time.monotonic()
        if summary and summary != self._status[1] and now - self._status[0] >= STATUS_EVERY:
            self._status = (now, summary)
            systemd.status(summary)


def answer_pings(loop: asyncio.AbstractEventLoop, channel: socket.socket) -> None:
    """In a link worker: answer the supervisor's pings from the event loop."""
    channel.setblocking(False)

    def on_readable() -> None:
        try:
            received = recv_message(channel)
        except BlockingIOError:
            return
        except (OSError, ControlError):
            received = None
        if received is None:  # the supervisor is gone (PDEATHSIG ends us too)
            loop.remove_reader(channel.fileno())
            return
        msg, _fds = received
        if isinstance(msg, Ping):
            try:
                channel.send(encode(Pong(msg.seq)), socket.MSG_DONTWAIT)
            except OSError:
                pass  # the supervisor's side is full or gone: it counts a miss

    loop.add_reader(channel.fileno(), on_readable)
