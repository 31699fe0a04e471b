"""The supervisor's children: forking each with only what it may keep,
reaping them, and the restart policy (a part of ``bridged.supervisor.Supervisor``).

Restart policy: a child that dies is forked again with a backoff
(``spawn.Child``); a front that fails five times in a row without reaching
``ready`` ends the daemon (systemd's Restart= takes over).  A port that
cannot be used at start is not retried: a pty link that cannot be made stops
the start before any fork (`PortError`); a serial port the front cannot open
comes back as ``PortFailed`` and the exit status ``PORT_FAILED``.  A port
that served and then fails to reopen (a front restarted while a USB adapter
re-plugs) is retried with the backoff, and given up after five tries.  A
limit reached (descriptors, memory, processes: an OSError while making the
rings or forking) ends the daemon too.  Each of these ends ``run()`` with an
exception whose text is the one line to print, after the children are
stopped; the caller exits 1.

Isolation: nothing of the supervisor's signal handling runs in a child
(``bridged.spawn``); a link worker unmaps the other links' rings and closes
their doorbells, the pty, the supervisor channel, the control socket and the
other workers' heartbeat channels, each time it is forked.  Capabilities
(``bridged.caps``): the supervisor keeps CAP_NET_BIND_SERVICE and CAP_NET_RAW
permitted only, to hand down; each child keeps only what it needs, before it
does anything else.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from typing import Callable

import structlog

from bridged import caps, spawn
from bridged.faults import tally
from bridged.ipc.control import send_message, socketpair
from bridged.ipc.messages import WorkerRefused, WorkerStarted
from bridged.links.main import FRONT_GONE, run_worker
from bridged.net import ping, resolver
from bridged.net.policy import parse_local_ports
from bridged.spawn import Child
from bridged.uart.main import PORT_FAILED, run_front

__all__ = ["WORKER_STOP_GRACE", "Children"]

log = structlog.get_logger()

_FRONT_MAX_FAILURES = 5
# Seconds the workers have to end after SIGTERM (a stop, or their front's death) before SIGKILL.
WORKER_STOP_GRACE = 4.0


class Children:
    """Starting, reaping and restarting the front and the link workers; a part
    of ``bridged.supervisor.Supervisor``, whose state it uses."""

    # -- starting children -------------------------------------------------------------

    def _start_all(self) -> None:
        """Fork the front and every worker, one right after another; log them and
        send the front its ``WorkerStarted`` after the last fork.

        Each fork shares the supervisor's pages with one more child, so what the
        supervisor writes between two forks is copied again after each (a log
        line touches about a hundred pages): a third of the supervisor's start.
        The front waits for every worker before its boot, so it waits no longer.
        """
        self._started = []
        try:
            self._start_front()
            for worker in self.workers:
                self._start_worker(worker)
        finally:
            started, self._started = self._started, None
            for child, pid in started:
                log.info("child_started", role=child.role, pid=pid, **child.ident())
            self._announce()
            for link_id in self._announcements:
                log.warning("worker_announcement_deferred", link_id=link_id, pending=len(self._announcements))

    def _start_front(self) -> None:
        if self.sup_sock is not None:  # the last front's channel: the new one must not inherit it
            self.sup_sock.close()
            self.sup_sock = None
        self._drop_announcements()
        ours, theirs = socketpair()

        def target() -> int:
            caps.limit(caps.front_keeps(ping.datagram_allowed()))
            ours.close()
            for channel in self.liveness.channels():
                channel.close()
            return run_front(self.config, self.device, self.pty, self.state_dir, self.rings, theirs,
                             self.listener)

        self.front.pid = self._fork(self.front, target)
        theirs.close()
        self.sup_sock = ours
        self._front_eof = False
        self.liveness.watch(self.front, ours, owned=False)
        self.report.front_started()
        self.front_ready = False
        self._port_failure = None

    def _start_worker(self, worker: Child) -> None:
        assert worker.link_id is not None
        front_end, worker_end = socketpair()
        ours, theirs = socketpair()  # heartbeats
        uplink, downlink = self.rings[worker.link_id]

        def target() -> int:
            caps.limit(caps.worker_keeps(parse_local_ports(self.config.links.local_ports)))
            front_end.close()
            ours.close()
            self._keep_only(worker.link_id)
            return run_worker(self.config, worker.link_id, worker_end, uplink, downlink, self.state_dir, theirs)

        worker.pid = self._fork(worker, target)
        worker_end.close()
        theirs.close()
        self.liveness.watch(worker, ours)
        stale = self._announcements.pop(worker.link_id, None)
        if stale is not None:
            stale[1].close()  # for a worker since replaced: of no use to the front
        self._announcements[worker.link_id] = (WorkerStarted(worker.link_id, worker.pid), front_end)
        if self._started is not None:
            return  # announced with the others (_start_all)
        self._announce()
        if worker.link_id in self._announcements:
            log.warning("worker_announcement_deferred", link_id=worker.link_id, pending=len(self._announcements))

    def _announce(self) -> None:
        """Send the front its pending ``WorkerStarted``, never waiting.

        A front that does not read (stopped, deadlocked) fills its channel; a
        blocking send would hold the supervisor with it, deaf to signals and
        liveness.  What does not fit stays pending, the latest per link, and
        goes when the channel has room (the loop waits for that); a front that
        never reads again misses its pings and is aborted, and a new front gets
        fresh announcements (`_drop_announcements`).
        """
        while self._announcements and self.sup_sock is not None:
            link_id, (msg, front_end) = next(iter(self._announcements.items()))
            try:
                send_message(self.sup_sock, msg, [front_end.fileno()], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                # The front is gone (its own exit says why); the worker sees EOF and ends too.
                log.info("worker_not_announced", link_id=link_id, error=str(exc))
            del self._announcements[link_id]
            front_end.close()

    def _drop_announcements(self) -> None:
        """Close the pending announcements' sockets: before a new front (which
        gets its own), and in a new child (a worker keeps no other link's control
        socket: holding one would keep that link's worker from seeing its front go)."""
        for _, front_end in self._announcements.values():
            front_end.close()
        self._announcements.clear()

    def _keep_only(self, link_id: int) -> None:
        """In a new link worker: let go of everything that is not this link's.

        Other links' rings are unmapped, not only their fds closed: a mapping
        is reachable memory even without a descriptor.
        """
        if self.sup_sock is not None:
            self.sup_sock.close()
        self._drop_announcements()
        if self.listener is not None:
            self.listener.close()
        for channel in self.liveness.channels():
            channel.close()  # the other workers' heartbeats
        if self.pty is not None:
            os.close(self.pty.master)
            os.close(self.pty.slave)
        for other, pair in enumerate(self.rings):
            if other != link_id:
                for ring in pair:
                    ring.close()
        tally.release()  # the front's fault counts

    def _fork(self, child: Child, target: Callable[[], int]) -> int:
        table = self.host_overrides

        def run() -> int:
            # Every lookup the child makes for the MCU meets [dns] hosts first; a
            # reload forks new children, so they get the new table.
            resolver.set_overrides(table)
            return target()

        pid = spawn.fork(run, child.role, child.link_id, self.config.log, (self._wakeup_r, self._wakeup_w))
        child.started = time.monotonic()
        child.restart_at = None
        if self._started is not None:
            self._started.append((child, pid))  # logged after the last fork (_start_all)
        else:
            log.info("child_started", role=child.role, pid=pid, **child.ident())
        return pid

    # -- children dying ------------------------------------------------------------------

    def handle_chld(self) -> None:
        reaped = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reaped.append((pid, os.waitstatus_to_exitcode(status)))
        # The front first: workers that ended because it did are no surprise.
        reaped.sort(key=lambda item: item[0] != self.front.pid)
        for pid, code in reaped:
            self._reaped(pid, code)

    def _reaped(self, pid: int, code: int) -> None:
        child = next((c for c in [self.front, *self.workers] if c.pid == pid), None)
        if child is None:
            return
        child.pid = 0
        self.liveness.forget(child)
        self._take_signals()
        if self.stopping or self._term_requested():
            return  # a stop is under way: the loop handles the signal next
        if child is self.front and code == PORT_FAILED:
            self._drain_front_messages()  # PortFailed, sent just before the exit
            self._port_failure = self._port_failure or f"{self.device} cannot be opened as the serial port"
            if not self.served:
                self._fatal = self._port_failure  # a start that cannot work: the loop ends it
                return
            # It served before (a USB adapter re-plugging?): retry with the backoff below.
            log.error("port_lost", error=self._port_failure)
        elif child is not self.front and (self.front.restart_at is not None or code == FRONT_GONE):
            # A worker ends with its front (EOF on its control socket): expected.
            # The front's own exit may be reaped a moment later (its fds close
            # before it becomes a zombie), so give it that moment.
            log.info("worker_stopped_with_front", link_id=child.link_id, exit_code=code)
            child.restart_at = None if self.front.restart_at is not None else time.monotonic() + 0.5
            return
        else:
            log.error("child_died", role=child.role, exit_code=code, **child.ident())
        child.schedule_restart(time.monotonic())
        if child is self.front:
            # Its workers lose their control sockets and exit; start afresh.  One that
            # does not (ignores SIGTERM, or stuck while its heartbeats are not yet
            # missed) would keep the session down: SIGKILL at the deadline.
            self._workers_kill_at = time.monotonic() + WORKER_STOP_GRACE
            for worker in self.workers:
                if worker.pid:
                    spawn.kill(worker.pid, signal.SIGTERM)

    def kill_refused(self, msg: WorkerRefused) -> None:
        """The front refused the downlink ring of this link's worker: SIGKILL it.

        A well-behaved worker exits at the EOF the front gives it; a hostile one
        that does not would hold the link id for good (we restart a worker only
        at its exit).  The front is a process apart, maybe a compromised one: only
        the live worker of that link dies, never the front, us or any other pid.
        Not yet reaped, that pid is still our child's (no reuse); its SIGCHLD
        restarts it as a crash.  A refused worker that exited by itself already
        is no longer live: its message is ignored, logged.
        """
        link_id, pid = msg.link_id, msg.pid
        worker = self.workers[link_id] if 0 <= link_id < len(self.workers) else None
        if worker is None or pid <= 0 or worker.pid != pid:
            log.warning("worker_refusal_ignored", link_id=link_id, pid=pid,
                        live_pid=worker.pid if worker is not None else None)
            return
        log.error("worker_killed_refused", link_id=link_id, pid=pid)
        spawn.kill(pid, signal.SIGKILL)

    def _next_restart(self) -> float:
        """When `_restart_due` has something to do (inf: nothing before a child's exit)."""
        front = self.front
        if front.restart_at is not None:
            if front.failures >= _FRONT_MAX_FAILURES:
                return 0.0  # the end, at once
            # The front starts again once its workers are reaped: their SIGCHLD wakes us,
            # or the deadline to kill those still there.
            if any(w.pid for w in self.workers):
                return math.inf if self._workers_kill_at is None else self._workers_kill_at
            return front.restart_at
        return min((w.restart_at for w in self.workers if w.restart_at is not None and not w.pid),
                   default=math.inf)

    def _restart_due(self) -> None:
        """Fork what is due again, or set ``_fatal`` when the front keeps failing."""
        now = time.monotonic()
        front = self.front
        if front.restart_at is not None:
            if front.failures < _FRONT_MAX_FAILURES:
                if any(w.pid for w in self.workers):
                    self._kill_lingering_workers(now)
                elif now >= front.restart_at:
                    self._start_all()
            elif self._port_failure is not None:  # the port stayed away: say so in one line
                self._fatal = self._port_failure
            else:
                log.critical("front_keeps_failing", failures=front.failures)
                self._fatal = (f"the front failed {front.failures} times in a row before it was ready; "
                               "its log events say why")
            return
        for worker in self.workers:
            if worker.restart_at is not None and now >= worker.restart_at and not worker.pid:
                self._start_worker(worker)

    def _kill_lingering_workers(self, now: float) -> None:
        """SIGKILL the workers still there `WORKER_STOP_GRACE` after their front died."""
        if self._workers_kill_at is None or now < self._workers_kill_at:
            return
        self._workers_kill_at = None  # once: their SIGCHLD wakes us for the restart
        for worker in self.workers:
            if worker.pid:
                log.error("worker_outlived_front", pid=worker.pid, link_id=worker.link_id,
                          seconds=WORKER_STOP_GRACE)
                spawn.kill(worker.pid, signal.SIGKILL)
