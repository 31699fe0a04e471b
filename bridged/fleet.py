"""``bridged fleet``: many emulated devices on one machine, for load testing.

Theory of operation
-------------------
Device ``i`` of a fleet in directory ``D`` is a separate ``bridged run
--pty D/ttyESPi --state-dir D/state/i`` process (its own supervisor, front and
link workers), in a session of its own so that a terminal's Ctrl-C reaches
only the fleet, which then stops every device in an orderly way. Its output
goes to ``D/logs/i.log``. ``D/run/i`` is its runtime directory, passed as
``$RUNTIME_DIRECTORY`` (systemd's convention), where its control socket is
(``D/run/i/control.sock``, asked by ``bridged fleet status`` and ``fault``).

Readiness is systemd's: every device gets ``$NOTIFY_SOCKET`` naming one
datagram socket of the fleet, ``D/run/notify.sock`` (in a folder only we may
enter: an abstract socket is listed in /proc/net/unix and any local user
could flood it, delaying every READY=1; one in the abstract namespace only
when that path is too long for a socket address), and its supervisor sends ``READY=1
once the front has said ``ready`` on the pty. The kernel attaches the sender's
pid (``SO_PASSCRED``), which says which device is ready. Nothing is written to
a device's pty by the fleet, so a host opening it later still finds ``ready``.

Start-up is bounded: at most ``concurrency`` devices are starting (spawned, not
ready yet) at a time, so 50 devices do not import Python at once on 2 cores.
A device that is not ready within ``start_timeout`` is killed and counts as a
death.

Death policy (a fleet is a load generator; one broken device must not end it):
a device that exits on its own, whatever its status, is reported
(``device_died``), the rest of its process group is killed, what a SIGKILLed
supervisor of an older version left in /dev/shm is removed (the rings are
memfds now), and it is restarted -- at once, then after 1, 2 and 4 s while it
keeps dying before or within 10 s of becoming ready (a device that cannot be spawned at all counts
as such a death). After 5 such deaths in a row it is left
stopped (``device_failed``, state ``failed``); the fleet goes on with the
others and ends with status 1 only when every device has failed. Restarts are
counted per device in the manifest.

Stop (SIGTERM, SIGINT): SIGTERM to each running device in index order, at
most ``concurrency`` stopping at a time (each stop wakes and ends 3 to 7
Python processes), reading the notify socket all along; a device not
gone 10 s after its SIGTERM is killed with its process group, and so is
every device left when a second SIGTERM or SIGINT comes. Exit status 0 when
every device stopped cleanly, 1 otherwise. SIGHUP is passed on to every
ready device, which reloads its configuration as ``bridged run`` does (one
still starting is left alone: its handler may not be set up yet).

``D/fleet.json`` (the manifest, replaced atomically) tells ``bridged fleet
status`` and scripts who is where: the fleet's pid, and per device its pid,
state, paths and restart count.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import time

import structlog

from bridged.fleet_devices import Device, DeviceState, FleetSpec, bind_notify, device_paths, sender_pid, unlink_quietly
from bridged import systemd
from bridged.atomic import write_atomic
from bridged.spawn import read_wakeup
from bridged.launch import daemon_argv, exit_status, finish, kill_group, spawn

__all__ = ["Device", "DeviceState", "Fleet", "FleetSpec", "MANIFEST", "device_paths"]

log = structlog.get_logger()

MANIFEST = "fleet.json"
MAX_COUNT = 1000
_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_STOP_GRACE = 10.0  # a device's own stop takes up to ~5 s (front 1 s, workers 4 s)
_FAST_DEATH = 10.0
_MAX_FAILURES = 5
_MAX_BACKOFF = 30.0  # a cap should _MAX_FAILURES grow (5 deaths: 0, 1, 2, 4 s)
_MANIFEST_EVERY = 0.25
_SUN_PATH_MAX = 107  # sockaddr_un's 108 bytes, less the terminating NUL
# Inherited variables a device must not take as its own.
_DROPPED_ENV = ("WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                "STATE_DIRECTORY")


class Fleet:
    """Starts, watches, restarts and stops the devices of one fleet."""

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.directory = spec.directory.resolve()
        self.devices = [Device(i, device_paths(self.directory, i)) for i in range(spec.count)]
        notify_path = self.directory / "run" / "notify.sock"
        self.notify_name = (str(notify_path) if len(os.fsencode(notify_path)) <= _SUN_PATH_MAX
                            else f"@bridged-fleet-{os.getpid()}-{secrets.token_hex(4)}")
        self._notify: socket.socket | None = None
        self._wakeup_r = -1
        self._signals = bytearray()
        self._began = 0.0
        self._announced = False
        self._manifest_dirty = True
        self._manifest_at = 0.0

    # -- lifetime ----------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        for sub in ("state", "run", "logs"):
            (self.directory / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._notify = bind_notify(self.notify_name)
        self._began = time.monotonic()
        log.info("fleet_starting", count=self.spec.count, dir=str(self.directory),
                 concurrency=self.spec.concurrency)
        try:
            return self._loop()
        finally:
            self._notify.close()
            if not self.notify_name.startswith("@"):
                unlink_quietly(self.notify_name)
            signal.set_wakeup_fd(-1)

    def _install_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup_r = r
        signal.set_wakeup_fd(w)
        for sig in _SIGNALS:
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the number

    def _loop(self) -> int:
        while True:
            # Idle (all ready or failed), only signals and notifications wake the fleet.
            busy = any(d.state in (DeviceState.STARTING, DeviceState.BACKOFF) for d in self.devices)
            timeout = 0.1 if busy or self._manifest_dirty else 1.0
            readable, _, _ = select.select([self._wakeup_r, self._notify], [], [], timeout)
            if self._wakeup_r in readable:
                self._take_signals()
            if signal.SIGTERM in self._signals or signal.SIGINT in self._signals:
                return self.stop()
            if signal.SIGHUP in self._signals:
                self._reload()
            exited = signal.SIGCHLD in self._signals
            self._signals.clear()
            if exited:
                self._reap()
            if self._notify in readable:
                self._take_notifications()
            self._check_start_timeouts()
            self._start_due()
            if not self._announced and all(d.state in (DeviceState.READY, DeviceState.FAILED)
                                           for d in self.devices):
                self._announce()
            if all(d.state is DeviceState.FAILED for d in self.devices):
                log.critical("fleet_failed", hint="every device failed; see their logs")
                self._write_manifest(running=False)
                return 1
            self._maybe_write_manifest()

    def _reload(self) -> None:
        """SIGHUP: each ready device reloads its configuration, as ``bridged run`` does."""
        ready = [d for d in self.devices if d.state is DeviceState.READY]
        log.info("fleet_reload", devices=len(ready))
        for device in ready:
            _kill(device.pid, signal.SIGHUP)

    def _take_signals(self) -> None:
        self._signals += read_wakeup(self._wakeup_r)

    def _announce(self) -> None:
        self._announced = True
        ready = [d for d in self.devices if d.state is DeviceState.READY]
        failed = [d.index for d in self.devices if d.state is DeviceState.FAILED]
        took = time.monotonic() - self._began
        # The manifest first: whoever waits for the line below reads it next.
        self._write_manifest(running=True)
        first, last = self.devices[0].paths.pty, self.devices[-1].paths.pty
        ptys = str(first) if len(self.devices) == 1 else f"{first} .. {last}"
        print(f"bridged fleet: {len(ready)} of {len(self.devices)} devices ready in {took:.1f} s"
              f" at {ptys} (logs {self.directory}/logs, state {self.directory}/state,"
              f" run {self.directory}/run, manifest {self.directory / MANIFEST})"
              + (f"; failed: {failed}" if failed else ""), flush=True)
        log.info("fleet_ready", ready=len(ready), failed=failed, seconds=round(took, 3))
        systemd.ready(f"{len(ready)} devices")  # when the fleet itself runs under systemd

    # -- starting ------------------------------------------------------------------------

    def _start_due(self) -> None:
        now = time.monotonic()
        starting = sum(d.state is DeviceState.STARTING for d in self.devices)
        for device in self.devices:
            if starting >= self.spec.concurrency:
                return
            first = device.state is DeviceState.STOPPED and device.proc is None
            due = device.state is DeviceState.BACKOFF and now >= (device.restart_at or 0)
            if first or due:
                starting += self._spawn(device)

    def _spawn(self, device: Device) -> bool:
        """Start ``device``; False when it could not be (counted as a death before READY:
        a broken directory of one device, or fork failing for want of memory or tasks,
        must not end the fleet and leave the others to their death signal)."""
        paths, spec = device.paths, self.spec
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
        env.update(NOTIFY_SOCKET=self.notify_name, RUNTIME_DIRECTORY=str(paths.run_dir))
        argv = daemon_argv(paths.pty, paths.state_dir, spec.config, spec.profile, spec.baud)
        try:
            for directory in (paths.state_dir, paths.run_dir):
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            proc = spawn(argv, paths.log, env)
        except OSError as exc:
            device.proc, device.ready_at = None, None
            log.error("device_spawn_failed", index=device.index, error=str(exc))
            self._died(device, -1)
            return False
        device.proc = proc
        device.state, device.started, device.ready_at = DeviceState.STARTING, time.monotonic(), None
        device.restart_at = None
        self._manifest_dirty = True
        log.info("device_started", index=device.index, pid=device.pid, restarts=device.restarts)
        return True

    def _take_notifications(self) -> None:
        assert self._notify is not None
        by_pid = {d.pid: d for d in self.devices if d.proc is not None}
        for _ in range(256):  # bounded: the loop comes back for the rest
            try:
                data, ancdata, _flags, _addr = self._notify.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            pid = sender_pid(ancdata)
            device = by_pid.get(pid)
            if device is None or b"READY=1" not in data.split(b"\n"):
                continue
            if device.state is DeviceState.STARTING:
                device.state, device.ready_at = DeviceState.READY, time.monotonic()
                self._manifest_dirty = True
                log.info("device_ready", index=device.index, pid=pid,
                         seconds=round(device.ready_at - device.started, 3))

    def _check_start_timeouts(self) -> None:
        now = time.monotonic()
        for device in self.devices:
            if device.state is DeviceState.STARTING and now - device.started > self.spec.start_timeout:
                log.error("device_start_timeout", index=device.index, pid=device.pid,
                          seconds=self.spec.start_timeout)
                kill_group(device.pid, signal.SIGKILL)  # reaped as a death next turn

    # -- dying ----------------------------------------------------------------------------

    def _reap(self) -> None:
        for device in self.devices:
            if device.proc is None or device.state not in (DeviceState.STARTING, DeviceState.READY):
                continue
            if exit_status(device.proc) is not None:
                # Its front and workers, should any be left, are killed before it is reaped.
                self._died(device, finish(device.proc, device.paths.pty))

    def _died(self, device: Device, code: int) -> None:
        pid = device.pid
        now = time.monotonic()
        fast = device.ready_at is None or now - device.ready_at < _FAST_DEATH
        device.failures = device.failures + 1 if fast else 1
        device.exit_codes.append(code)
        self._manifest_dirty = True
        if device.failures >= _MAX_FAILURES:
            device.state, device.restart_at = DeviceState.FAILED, None
            log.error("device_failed", index=device.index, pid=pid, exit_code=code,
                      failures=device.failures, log_file=str(device.paths.log))
            return
        delay = 0.0 if device.failures <= 1 else min(_MAX_BACKOFF, 2.0 ** (device.failures - 2))
        device.state, device.restart_at = DeviceState.BACKOFF, now + delay
        device.restarts += 1
        log.error("device_died", index=device.index, pid=pid, exit_code=code,
                  restart_in=delay, restarts=device.restarts, log_file=str(device.paths.log))

    # -- stopping -------------------------------------------------------------------------

    def stop(self) -> int:
        """Stop every running device, in index order, at most `concurrency` at a time
        (as in starting: a stop wakes and ends 3 to 7 processes); 0 if all stopped cleanly.

        A second SIGTERM or SIGINT kills what is left at once.
        """
        log.info("fleet_stopping")
        systemd.stopping()
        self._signals.clear()
        # Not reaped yet (one that exited unseen is still a zombie holding its pid): each
        # is reaped by _stopped, after its group was killed (bridged.launch.finish).
        running = [d for d in self.devices if d.proc is not None and d.proc.returncode is None]
        waiting, stopping = list(running), {}  # device -> its deadline
        while waiting or stopping:
            while waiting and len(stopping) < self.spec.concurrency:
                device = waiting.pop(0)
                _kill(device.pid, signal.SIGTERM)
                stopping[device.index] = (device, time.monotonic() + _STOP_GRACE)
            # Keep reading the notify socket: a stopping supervisor sends STOPPING=1, and
            # with ten datagrams queued (net.unix.max_dgram_qlen) the next sender blocks.
            select.select([self._wakeup_r, self._notify], [], [], 0.02)
            self._take_notifications()
            self._take_signals()  # SIGCHLD from the exits, or the user asking again
            hurry = signal.SIGTERM in self._signals or signal.SIGINT in self._signals
            for index, (device, deadline) in list(stopping.items()):
                if exit_status(device.proc) is None and (hurry or time.monotonic() > deadline):
                    log.error("device_killed", index=device.index, pid=device.pid,
                              hint="stop asked again" if hurry else "it did not stop within 10 s")
                    kill_group(device.pid, signal.SIGKILL)
                    del stopping[index]  # _stopped waits for its end
                elif exit_status(device.proc) is not None:
                    del stopping[index]
            if hurry:
                for device in waiting:
                    kill_group(device.pid, signal.SIGKILL)
                waiting.clear()
        clean = all([self._stopped(d) for d in running])
        for device in self.devices:
            if device.state is not DeviceState.FAILED:
                device.state = DeviceState.STOPPED
        self._write_manifest(running=False)
        print(f"bridged fleet: {len(running)} devices stopped"
              + ("" if clean else " (not all cleanly; see the log)"), flush=True)
        log.info("fleet_stopped", devices=len(running), clean=clean)
        return 0 if clean else 1

    @staticmethod
    def _stopped(device: Device) -> bool:
        """Clean up after a device that has exited (or was killed); True if it stopped cleanly."""
        code = finish(device.proc, device.paths.pty)  # nothing of it should be left; make sure
        # SIGTERM's default action: the device was still importing, nothing to clean.
        if code in (0, -signal.SIGTERM):
            return True
        log.error("device_stop_failed", index=device.index, pid=device.pid, exit_code=code)
        return False

    # -- manifest -------------------------------------------------------------------------

    def _maybe_write_manifest(self) -> None:
        if self._manifest_dirty and time.monotonic() - self._manifest_at >= _MANIFEST_EVERY:
            self._write_manifest(running=True)

    def _write_manifest(self, running: bool) -> None:
        doc = {"pid": os.getpid(), "running": running, "count": self.spec.count,
               "dir": str(self.directory), "devices": [d.entry() for d in self.devices]}
        # Readable by others, as before; a status file: no fsync (it says nothing after a power cut).
        write_atomic(self.directory / MANIFEST, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o644, durable=False)
        self._manifest_dirty, self._manifest_at = False, time.monotonic()


def _kill(pid: int, sig: int) -> None:
    if pid <= 0:  # kill(0) would signal the fleet's own group
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
