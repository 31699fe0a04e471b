"""The supervisor: creates the shared pieces, forks the children, restarts
the ones that die, and speaks to systemd.

Theory of operation (after gunicorn's arbiter): the supervisor runs no event
loop, so it may fork at any time; children build their own loop after the
fork and so share the imported code copy-on-write.  Signal handlers only
enqueue (``signal.set_wakeup_fd``); the main loop calls ``handle_<signame>``.

What it owns, so that they outlive any child: the rings (two per link slot),
the pseudo-terminal when there is no serial device, and the supervisor
channel to the front.  A link worker gets a fresh control socketpair each
time it starts; the front end is sent to the front with ``WorkerStarted``.
The front sees a worker's death at once (EOF on that socket) and reports the
link closed; the supervisor forks a replacement right away.  When the front
dies, the workers see EOF and exit; everything is started again.

Restart policy: a child that dies is restarted at once, then with a backoff
doubling up to 5 s while it keeps dying within 10 s of its start.  A front
that fails five times in a row without reaching ``ready`` ends the daemon with
status 1 (systemd's Restart= takes over from there).

Reload (SIGHUP, ``systemctl reload``): the configuration is read again from
the same file, profile and command line.  A configuration that does not load,
or that changes a key only a restart can apply (``config.RESTART_ONLY``), is
refused and the running one stays; a changed one restarts the front and the
workers with it, on the same port (the MCU sees ``ready``, as after AT+RST).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog

from bridged import systemd
from bridged.config import RESTART_ONLY, Config, ConfigError, changed_keys
from bridged.ipc.control import ControlError, recv_message, send_message, socketpair
from bridged.ipc.messages import FrontReady, Heartbeat, WorkerStarted
from bridged.ipc.rings import Ring
from bridged.links.main import FRONT_GONE, run_worker
from bridged.log import setup_logging
from bridged.net import resolver
from bridged.net.hosts import overrides
from bridged.uart.main import run_front
from bridged.uart.port import Pty, open_pty

__all__ = ["Supervisor"]

log = structlog.get_logger()

_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_STOP_GRACE = 4.0
_FAST_DEATH = 10.0
_MAX_BACKOFF = 5.0
_FRONT_MAX_FAILURES = 5
_PR_SET_PDEATHSIG = 1


@dataclass
class _Child:
    role: str  # "front" or "link"
    link_id: int | None = None
    pid: int = 0
    started: float = 0.0
    failures: int = 0  # consecutive deaths soon after start
    restart_at: float | None = None  # when to fork again

    def ident(self) -> dict[str, int]:
        """Log fields naming the child: link_id for a link worker only."""
        return {} if self.link_id is None else {"link_id": self.link_id}


class Supervisor:
    def __init__(self, config: Config, device: str, pty_link: str | None, state_dir: Path,
                 reload: Callable[[], Config] | None = None) -> None:
        self._adopt(config)
        self._reload = reload  # loads the configuration again from the same sources
        self.device = device
        self.pty_link = pty_link
        self.state_dir = state_dir
        self.pty: Pty | None = None
        self.rings: list[tuple[Ring, Ring]] = []
        self.front = _Child("front")
        self.workers = [_Child("link", i) for i in range(config.links.count)]
        self.sup_sock: socket.socket | None = None  # our end of the front's channel
        self.front_ready = False
        self.last_heartbeat = 0.0
        self.stopping = False
        self._wakeup_r = -1
        self._signals = bytearray()  # signal numbers read from the wakeup pipe, not handled yet

    # -- lifetime ----------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        size = self.config.links.ring_size
        self.rings = [(Ring.create(size), Ring.create(size)) for _ in self.workers]
        if not self.device:
            self.pty = open_pty(self.pty_link)
            log.info("pty_created", path=self.pty.path, link=self.pty_link)
            print(f"bridged: serial port ready at {self.pty_link or self.pty.path}"
                  f"{' -> ' + self.pty.path if self.pty_link else ''}", flush=True)
        try:
            self._start_all()
            return self._loop()
        finally:
            self._cleanup()

    def _install_signals(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wakeup_r = r
        signal.set_wakeup_fd(w)
        for sig in _SIGNALS:
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the number

    def _loop(self) -> int:
        watchdog = systemd.watchdog_interval()
        next_ping = time.monotonic()
        while True:
            fds = [self._wakeup_r] + ([self.sup_sock] if self.sup_sock is not None else [])
            readable, _, _ = select.select(fds, [], [], 0 if self._signals else 0.2)
            if self._wakeup_r in readable:
                self._take_signals()
            if self._term_requested():
                return self.handle_term()
            signals, self._signals = self._signals, bytearray()
            for signum in signals:
                self._handle_signal(signum)
            if self.sup_sock is not None and self.sup_sock in readable:
                self._on_front_message()
            code = self._restart_due()
            if code is not None:
                return code
            if watchdog and time.monotonic() >= next_ping:
                next_ping = time.monotonic() + watchdog
                if self._healthy():
                    systemd.watchdog_ping()

    def _take_signals(self) -> None:
        while self._wakeup_r >= 0:
            try:
                data = os.read(self._wakeup_r, 64)
            except BlockingIOError:
                return
            if not data:
                return
            self._signals += data

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
        try:
            self._reload_config()
        finally:
            systemd.ready("serving")  # systemd waits for READY=1 after RELOADING=1

    def _reload_config(self) -> None:
        try:
            new = self._reload()
        except ConfigError as exc:
            log.error("reload_refused", error=str(exc), hint="the running configuration stays")
            return
        changed = changed_keys(self.config, new)
        fixed = [key for key in changed if key in RESTART_ONLY]
        if fixed:
            log.error("reload_refused", needs_restart=fixed, hint="restart the service to apply them")
            return
        if not changed:
            log.info("reload_unchanged")
            return
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
        self._start_all()

    def _adopt(self, config: Config) -> None:
        """Run with ``config`` from now on.

        The resolver's host overrides are built here, once, not in each child:
        a child forked afterwards shares the table's pages instead of copying
        a big hosts file's into its own memory.
        """
        self.config = config
        self.host_overrides = overrides(config.dns.hosts, config.dns.hosts_file)

    def _healthy(self) -> bool:
        alive = self.front.pid and all(w.pid for w in self.workers)
        return bool(alive) and time.monotonic() - self.last_heartbeat < 5.0

    # -- starting children -------------------------------------------------------------

    def _start_all(self) -> None:
        self._start_front()
        for worker in self.workers:
            self._start_worker(worker)

    def _start_front(self) -> None:
        ours, theirs = socketpair()

        def target() -> int:
            ours.close()
            return run_front(self.config, self.device, self.pty, self.state_dir, self.rings, theirs)

        self.front.pid = self._fork(self.front, target)
        theirs.close()
        if self.sup_sock is not None:
            self.sup_sock.close()
        self.sup_sock = ours
        self.front_ready = False
        self.last_heartbeat = time.monotonic()

    def _start_worker(self, worker: _Child) -> None:
        assert worker.link_id is not None
        front_end, worker_end = socketpair()
        uplink, downlink = self.rings[worker.link_id]

        def target() -> int:
            front_end.close()
            if self.sup_sock is not None:
                self.sup_sock.close()
            if self.pty is not None:
                os.close(self.pty.master)
                os.close(self.pty.slave)
            return run_worker(self.config, worker.link_id, worker_end, uplink, downlink, self.state_dir)

        worker.pid = self._fork(worker, target)
        worker_end.close()
        try:
            send_message(self.sup_sock, WorkerStarted(worker.link_id, worker.pid), [front_end.fileno()])
        except OSError as exc:
            log.error("front_unreachable", error=str(exc))
        front_end.close()

    def _fork(self, child: _Child, target) -> int:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                self._child_setup(child)
                code = target()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("child_crashed", role=child.role)
            finally:
                os._exit(code)
        child.started = time.monotonic()
        child.restart_at = None
        log.info("child_started", role=child.role, pid=pid, **child.ident())
        return pid

    def _child_setup(self, child: _Child) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self._wakeup_r)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        # Ctrl-C in a terminal reaches every process of the foreground job at
        # once; only the supervisor acts on it, stopping the front before the
        # workers (a worker that left on its own would read as a crash).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Die with the supervisor, even if it is killed with SIGKILL.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:
            os._exit(1)
        cfg = self.config.log
        setup_logging(cfg.level, cfg.format, child.role, child.link_id)
        # Every lookup the child makes for the MCU meets [dns] hosts first; a
        # reload forks new children, so they get the new table.
        resolver.set_overrides(self.host_overrides)

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
        self._take_signals()
        if self.stopping or self._term_requested():
            return  # a stop is under way: the loop handles the signal next
        if child is not self.front and (self.front.restart_at is not None or code == FRONT_GONE):
            # A worker ends with its front (EOF on its control socket): expected.
            # The front's own exit may be reaped a moment later (its fds close
            # before it becomes a zombie), so give it that moment.
            log.info("worker_stopped_with_front", link_id=child.link_id, exit_code=code)
            child.restart_at = None if self.front.restart_at is not None else time.monotonic() + 0.5
            return
        log.error("child_died", role=child.role, exit_code=code, **child.ident())
        now = time.monotonic()
        child.failures = child.failures + 1 if now - child.started < _FAST_DEATH else 1
        delay = 0.0 if child.failures <= 1 else min(_MAX_BACKOFF, 0.25 * 2 ** (child.failures - 2))
        child.restart_at = now + delay
        if child is self.front:
            # Its workers lose their control sockets and exit; start afresh.
            for worker in self.workers:
                if worker.pid:
                    _kill(worker.pid, signal.SIGTERM)

    def _restart_due(self) -> int | None:
        now = time.monotonic()
        front = self.front
        if front.restart_at is not None:
            if front.failures >= _FRONT_MAX_FAILURES:
                log.critical("front_keeps_failing", failures=front.failures)
                return 1
            if now >= front.restart_at and not any(w.pid for w in self.workers):
                self._start_all()
            return None
        for worker in self.workers:
            if worker.restart_at is not None and now >= worker.restart_at and not worker.pid:
                self._start_worker(worker)
        return None

    # -- the front's messages ----------------------------------------------------------------

    def _on_front_message(self) -> None:
        try:
            received = recv_message(self.sup_sock)
        except (BlockingIOError, OSError):
            return
        except ControlError as exc:  # the front is a process apart: maybe a compromised one
            log.error("control_message_refused", role="front", error=str(exc))
            return
        if received is None:
            return  # the front died; SIGCHLD follows
        msg, fds = received
        for fd in fds:
            os.close(fd)
        if isinstance(msg, Heartbeat):
            self.last_heartbeat = time.monotonic()
        elif isinstance(msg, FrontReady):
            self.last_heartbeat = time.monotonic()
            self.front.failures = 0
            if not self.front_ready:
                self.front_ready = True
                systemd.ready(f"serving {msg.port}")

    # -- stopping ----------------------------------------------------------------------------

    def handle_term(self) -> int:
        log.info("stopping")
        self.stopping = True
        systemd.stopping()
        self._stop_children()
        return 0

    def _stop_children(self) -> None:
        deadline = time.monotonic() + _STOP_GRACE
        # The front first, so that it does not take the workers' exits for crashes;
        # then the workers, which close their sockets (FIN to every peer).
        self._terminate([self.front], min(deadline, time.monotonic() + 1.0))
        self._terminate(self.workers, deadline)

    def _terminate(self, children: list[_Child], deadline: float) -> None:
        children = [c for c in children if c.pid]
        for child in children:
            _kill(child.pid, signal.SIGTERM)
        while any(c.pid for c in children) and time.monotonic() < deadline:
            self.handle_chld()
            time.sleep(0.005)
        for child in children:
            if child.pid:
                log.warning("child_killed", role=child.role, **child.ident())
                _kill(child.pid, signal.SIGKILL)
        self.handle_chld()

    def _cleanup(self) -> None:
        for up, down in self.rings:
            for ring in (up, down):
                ring.close()
                ring.unlink()
        if self.pty is not None:
            self.pty.close()
        if self.sup_sock is not None:
            self.sup_sock.close()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

