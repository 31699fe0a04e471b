"""The supervisor: creates the shared pieces, forks the children, restarts
the ones that die, and speaks to systemd.

Theory of operation (after gunicorn's arbiter): the supervisor runs no event
loop, so it may fork at any time; children build their own loop after the
fork and so share the imported code copy-on-write.  Signal handlers only
enqueue (``signal.set_wakeup_fd``); the main loop calls ``handle_<signame>``.
The loop sleeps in ``select`` until a signal, a message of the front or the
next thing due (a heartbeat tick, a restart, the service watchdog's ping),
never on a fixed poll: an idle supervisor wakes about twice per heartbeat.

What it owns, so that they outlive any child: the rings (two per link slot),
the pseudo-terminal when there is no serial device, and the supervisor
channel to the front.  A link worker gets a fresh control socketpair each
time it starts; the front end is sent to the front with ``WorkerStarted``.
The front sees a worker's death at once (EOF on that socket) and reports the
link closed; the supervisor forks a replacement right away.  When the front
dies, the workers see EOF and exit (one still there `WORKER_STOP_GRACE` later
is killed: it would keep the session down); everything is started again.
Nothing we send a child waits: a front that does not read loses its pings and
gets its ``WorkerStarted`` once its channel has room (`Children._announce`).

Children (``bridged.children``, a part of `Supervisor`): forking each with
only what it may keep, reaping, and the restart policy.  A start that cannot
work, a front that keeps failing or a limit reached ends ``run()`` with an
exception whose text is the one line to print, after the children are
stopped; the caller exits 1.

A worker whose downlink ring the front refused (``WorkerRefused``) is
killed and restarted like a crashed one (`Children.kill_refused`); the front
keeps what its full channel cannot take until it has room
(`bridged.uart.sup_outbox`), so no refusal is lost while we are busy.

Liveness (``bridged.liveness``): a child that stops answering heartbeats is
killed and restarted like a crashed one; WATCHDOG=1 only while the front
answers.  The control socket (``bridged.ops``) is bound here, before any
fork, so it outlives every front; the front serves it.

Reload (SIGHUP, ``systemctl reload``): the configuration is read again from
the same file, profile and command line.  A configuration that does not load,
or that changes a key only a restart can apply (``config.RESTART_ONLY``), is
refused and the running one stays; a changed one restarts the front and the
workers with it, on the same port (the MCU sees ``ready``, as after AT+RST).
"""

from __future__ import annotations

import gc
import math
import os
import select
import signal
import socket
import time
from pathlib import Path
from typing import Callable

import structlog

from bridged import caps, spawn, systemd
from bridged.children import WORKER_STOP_GRACE, Children
from bridged.config import RESTART_ONLY, Config, ConfigError, changed_keys
from bridged.faults import tally
from bridged.faults.seed import children_started, faults_seeded, log_seed, mark_epoch
from bridged.ipc.control import ControlError, recv_message
from bridged.ipc.messages import FrontReady, Ping, PortFailed, Pong, WorkerRefused, WorkerStarted
from bridged.ipc.rings import Ring
from bridged.liveness import Liveness, Report
from bridged.log import setup_logging
from bridged.net.hosts import overrides
from bridged.ops import server as control_server
from bridged.spawn import Child, StartError, read_wakeup
from bridged.uart.port import Pty, open_pty

__all__ = ["Supervisor"]

log = structlog.get_logger()


class Supervisor(Children):
    def __init__(self, config: Config, device: str, pty_link: str | None, state_dir: Path,
                 reload: Callable[[], Config] | None = None, control: Path | None = None) -> None:
        self.liveness = Liveness(1.0, 3)
        self._adopt(config)
        self._reload = reload  # loads the configuration again from the same sources
        self.device = device
        self.pty_link = pty_link
        self.state_dir = state_dir
        self.pty: Pty | None = None
        self.rings: list[tuple[Ring, Ring]] = []
        self.front = Child("front")
        self.workers = [Child("link", i) for i in range(config.links.count)]
        self.sup_sock: socket.socket | None = None  # our end of the front's channel
        self.front_ready = False
        self.control_path = control  # where `bridged status` finds us (None: nowhere)
        self.listener: socket.socket | None = None
        self.report = Report()
        self.stopping = False
        self.served = False  # a front has reached ready since we started
        self._port_failure: str | None = None  # the reason of the running front's PortFailed
        self._fatal: str | None = None  # why we end now (raised as StartError by the loop)
        self._front_eof = False  # the running front's channel is at its end: read no more
        # link_id -> WorkerStarted not yet sent (the front's channel was full) and its socket
        self._announcements: dict[int, tuple[WorkerStarted, socket.socket]] = {}
        self._workers_kill_at: float | None = None  # when the dead front's workers get SIGKILL
        self._started: list[tuple[Child, int]] | None = None  # forked by _start_all, not yet logged
        self._wakeup_r = self._wakeup_w = -1
        self._signals = bytearray()  # signal numbers read from the wakeup pipe, not handled yet

    # -- lifetime ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped: 0 after SIGTERM.

        Raises:
            PortError: the pty cannot be made.
            StartError: the serial port cannot be used, the front keeps
                failing, or a limit is reached.
            Either one's text is the line to print; the children are stopped by then.
        """
        try:
            # Ours to hand down at fork, not to use (bridged.caps).
            caps.limit(caps.Cap, effective=False, hand_down=True)
            tally.create()  # before any fork: every front counts faults in it (bridged.faults.tally)
            self._install_signals()
            # The control socket first: once the pty's link is there (what scripts and
            # tests wait for), `bridged status` finds the socket too.
            if self.control_path is not None:
                try:
                    self.listener, self._control_ident = control_server.listen(self.control_path)
                except control_server.ListenError as exc:
                    raise StartError(str(exc)) from None
            if not self.device:
                self.pty = open_pty(self.pty_link)
                log.info("pty_created", path=self.pty.path, link=self.pty_link)
                print(f"bridged: serial port ready at {self.pty_link or self.pty.path}"
                      f"{' -> ' + self.pty.path if self.pty_link else ''}", flush=True)
            return self._serve()
        finally:
            # Whatever comes now is too late to act on, and the interpreter's
            # shutdown restores the default handlers: a signal then would
            # replace our exit status with death by that signal.
            signal.pthread_sigmask(signal.SIG_BLOCK, spawn.SIGNALS)
            self._cleanup()

    def _serve(self) -> int:
        """Make the rings, fork the children, loop; an OSError (a limit reached) ends it."""
        try:
            size = self.config.links.ring_size
            for w in self.workers:
                self.rings.append((Ring.create(size, f"link{w.link_id}-up"),
                                   Ring.create(size, f"link{w.link_id}-down")))
            mark_epoch()
            # What is imported and built by now lives as long as the daemon: out of the
            # collector's sight, the children's collections never write to its pages (they
            # stay shared, copy-on-write) and the interpreter's exit does not walk it.
            gc.freeze()
            self._start_all()
            children_started()
            return self._loop()
        except OSError as exc:
            self.stopping = True
            self._stop_children()
            raise spawn.limit_error(exc, len(self.workers)) from None

    def _install_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup_r, self._wakeup_w = r, w
        signal.set_wakeup_fd(w)
        for sig in spawn.SIGNALS:
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the number

    def _loop(self) -> int:
        watchdog = systemd.watchdog_interval()
        next_ping = time.monotonic()
        while True:
            readable, writable = self._wait(next_ping if watchdog else math.inf)
            if writable:
                self._announce()  # the front's channel has room again
            if self._wakeup_r in readable:
                self._take_signals()
            if self._term_requested():
                return self.handle_term()
            signals, self._signals = self._signals, bytearray()
            for signum in signals:
                self._handle_signal(signum)
            if self._fatal is not None:
                self.stopping = True
                self._stop_children()
                raise StartError(self._fatal)
            if self.sup_sock is not None and self.sup_sock in readable:
                self._on_front_message()
            self.liveness.tick(time.monotonic(), self._ping)
            self._restart_due()
            if watchdog and time.monotonic() >= next_ping:
                next_ping = time.monotonic() + watchdog
                if self._healthy():
                    systemd.watchdog_ping()

    def _wait(self, watchdog_due: float) -> tuple[list, list]:
        """Sleep until a signal, a message of the front, room on its channel for
        a pending announcement (`_announce`), or the next thing due: liveness's
        tick (`Liveness.next_due`), a restart (`_next_restart`), the service
        watchdog's ping.  No polling: an idle daemon on a small board wakes for
        those only.  Returns the readable and the writable."""
        fds: list = [self._wakeup_r]
        if self.sup_sock is not None and not self._front_eof:
            fds.append(self.sup_sock)
        writing = [self.sup_sock] if self._announcements and self.sup_sock is not None else []
        if self._signals or self._fatal is not None:
            timeout: float | None = 0.0  # signals read by `_reaped`, or the end: act now
        else:
            due = min(self.liveness.next_due(), self._next_restart(), watchdog_due)
            timeout = None if due == math.inf else max(0.0, due - time.monotonic())
        readable, writable, _ = select.select(fds, writing, [], timeout)
        return readable, writable

    def _take_signals(self) -> None:
        self._signals += read_wakeup(self._wakeup_r)

    def _term_requested(self) -> bool:
        # Before any SIGCHLD: `pkill bridged` signals the children too, and the
        # front may exit before we see our own SIGTERM; its exit is no crash.
        return signal.SIGTERM in self._signals or signal.SIGINT in self._signals

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self.handle_chld()
        elif signum == signal.SIGHUP:
            self.handle_hup()

    def handle_hup(self) -> None:
        if self._reload is None:
            log.warning("reload_not_supported", hint="restart the service to apply a new config")
            return
        systemd.reloading()
        restarted = False
        try:
            restarted = self._reload_config()
        finally:
            # systemd waits for READY=1 after RELOADING=1: now, or when the
            # restarted front says ready (_on_front_message), after its boot.
            if not restarted:
                systemd.ready("serving")

    def _reload_config(self) -> bool:
        """Apply a changed configuration; True when the children were restarted with it."""
        try:
            new = self._reload()
        except ConfigError as exc:
            log.error("reload_refused", error=str(exc), hint="the running configuration stays")
            return False
        new = faults_seeded(new, self.config)  # an unset seed is the one in force, not a change
        changed = changed_keys(self.config, new)
        fixed = [key for key in changed if key in RESTART_ONLY]
        if fixed:
            log.error("reload_refused", needs_restart=fixed, hint="restart the service to apply them")
            return False
        if not changed:
            log.info("reload_unchanged")
            return False
        log.info("reloading", changed=changed)
        self._adopt(new)
        cfg = new.log
        setup_logging(cfg.level, cfg.format, "supervisor")
        self.stopping = True  # none of these exits is a failure
        try:
            self._stop_children()
        finally:
            self.stopping = False
        for child in (self.front, *self.workers):
            child.failures, child.restart_at = 0, None
        mark_epoch()  # the new configuration's fault schedules start now
        self._start_all()
        children_started()
        return True

    def _adopt(self, config: Config) -> None:
        """Run with ``config`` from now on.

        The resolver's host overrides are built here, once, not in each child:
        a child forked afterwards shares the table's pages instead of copying
        a big hosts file's into its own memory.
        """
        drawn = config.faults.seed is None
        self.config = faults_seeded(config, getattr(self, "config", None))
        log_seed(self.config, drawn)
        self.host_overrides = overrides(config.dns.hosts, config.dns.hosts_file)
        self.liveness.configure(config.watchdog.heartbeat_ms / 1000, config.watchdog.missed_heartbeats)

    def _healthy(self) -> bool:
        """Feed systemd's watchdog: every child is there and the front answers."""
        return all(w.pid for w in self.workers) and self.liveness.answering(self.front)

    def _ping(self, child: spawn.Child, seq: int) -> Ping:
        return self.report.ping(seq, [self.front, *self.workers]) if child is self.front else Ping(seq)

    # -- the front's messages ----------------------------------------------------------------

    def _drain_front_messages(self) -> None:
        while self.sup_sock is not None and select.select([self.sup_sock], [], [], 0)[0]:
            if not self._on_front_message():
                return

    def _on_front_message(self) -> bool:
        """Handle one message of the front; False at its EOF or an error."""
        try:
            received = recv_message(self.sup_sock)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            # It closed its end with our messages unread (a front that failed before
            # reading any: a port it cannot open). The kernel says so once, then
            # gives what it sent before (its PortFailed), then EOF.
            return True
        except OSError:  # the front is gone (SIGCHLD follows)
            self._front_eof = True  # readable for good: stop waiting on it
            return False
        except ControlError as exc:  # the front is a process apart: maybe a compromised one
            log.error("control_message_refused", role="front", error=str(exc))
            return False
        if received is None:
            self._front_eof = True  # the front died (SIGCHLD follows): readable for good
            return False
        msg, fds = received
        for fd in fds:
            os.close(fd)
        if isinstance(msg, PortFailed):
            self._port_failure = msg.reason
        elif isinstance(msg, Pong):
            if self.liveness.answered(self.front, msg) and self.front_ready:
                self.report.show(msg.summary)
        elif isinstance(msg, WorkerRefused):
            self.kill_refused(msg)
        elif isinstance(msg, FrontReady):  # once per front, at its first ready
            log.info("front_ready", pid=self.front.pid, port=msg.port)
            self.front.failures = 0
            if not self.front_ready:
                self.front_ready = self.served = True
                systemd.ready(f"serving {msg.port}")
        return True

    # -- stopping ----------------------------------------------------------------------------

    def handle_term(self) -> int:
        log.info("stopping")
        self.stopping = True
        systemd.stopping()
        self._stop_children()
        return 0

    def _stop_children(self) -> None:
        deadline = time.monotonic() + WORKER_STOP_GRACE
        # The front first, so that it does not take the workers' exits for crashes;
        # then the workers, which close their sockets (FIN to every peer).
        spawn.terminate([self.front], min(deadline, time.monotonic() + 1.0), self.handle_chld)
        spawn.terminate(self.workers, deadline, self.handle_chld)

    def _cleanup(self) -> None:
        for up, down in self.rings:
            for ring in (up, down):
                ring.close()  # nothing to unlink: rings have no name (bridged.ipc.rings)
        if self.pty is not None:
            self.pty.close()
        self._drop_announcements()
        if self.sup_sock is not None:
            self.sup_sock.close()
        if self.listener is not None:
            control_server.unlink(self.control_path, self._control_ident)
            self.listener.close()
