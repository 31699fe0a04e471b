"""One emulated device for a test: ``bridged run`` on a pty, in a directory of its own.

Theory of operation.  A `Device` is the real daemon (``python -m bridged run
--pty``, the interpreter running the tests), never a stand-in: what a
firmware test sees is what a host sees in the field.  Its directory ``D``::

    D/tty              the pty's symbolic link (`Device.port`): the MCU's end
    D/bridged.toml     the test's configuration overrides (``--config``)
    D/state/           its state directory (AT+SYSSTORE, certificates)
    D/run/control.sock its control socket (``--control``; in a short
                       temporary directory when D's path is too long for one)
    D/transcript.log   the AT transcript (``--transcript``), unless switched off
    D/bridged.log      its output: JSON log lines

Ready is systemd's readiness: the device gets ``$NOTIFY_SOCKET`` naming a
datagram socket of its own, ``notify.sock`` beside its control socket (a
folder only our uid may enter), and its supervisor sends ``READY=1`` once
the front has queued ``ready`` for the pty, after ``[firmware] boot_ms``.  Nothing is read from the pty, so the MCU side (`Device.at` or a
host program) still finds ``ready`` there, as after power-on.  (Reading
``ready`` from the pty would take it from the host; the control socket
answers before the boot is over.)

Stop: SIGTERM, then ``stop_timeout`` seconds, then SIGKILL to the device's
whole session (it runs in one of its own and dies with the test process
should that be killed).  `stop` returns the exit status; 0 is a clean stop.

Every wait has a deadline and fails with `DeviceTimeout` saying what it
waited for, what it saw instead and the end of the device's log.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bridged.atclient import AtClient
from bridged.launch import daemon_argv, exit_status, finish, kill_group, spawn
from bridged.ops.protocol import ProtocolError, request
from bridged.testing._config import Overrides, merge, normalise, to_toml
from bridged.testing.transcript import TranscriptFollower, TranscriptMark

__all__ = ["ControlRefused", "Device", "DeviceError", "DeviceOptions", "DeviceTimeout", "UnknownCommand"]

_SUN_PATH_MAX = 107  # sockaddr_un's 108 bytes, less the terminating NUL
_CONTROL_TIMEOUT = 5.0  # per control request
_POLL = 0.02
_LOG_TAIL = 4000  # characters of the device's log in a failure message
# What a device must not take from the test's environment as its own.
_DROPPED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES", "STATE_DIRECTORY", "RUNTIME_DIRECTORY", "JOURNAL_STREAM")
# The plugin's own defaults under the test's overrides: a transcript that
# never rotates, so that waits on it never miss a line.
_DEFAULTS = {"log": {"transcript_max_bytes": 1_099_511_627_776}}


class DeviceError(RuntimeError):
    """The device failed to start, died, or its control socket failed."""


class DeviceTimeout(DeviceError, TimeoutError):
    """A wait on the device reached its deadline."""


class ControlRefused(DeviceError):
    """The control socket answered ``{"ok": false}``; ``error`` is its reason."""

    def __init__(self, message: str, error: str) -> None:
        super().__init__(message)
        self.error = error


class UnknownCommand(ControlRefused):
    """This bridged's control socket does not know the command (an older bridged)."""


@dataclass(frozen=True, slots=True)
class DeviceOptions:
    """How a device is started.

    Args:
        profile: a profile name or .toml path, as ``bridged run --profile``.
        config: overrides over the profile: TOML text or a mapping (see
            ``bridged.testing._config``), as a ``--config`` file.
        transcript: write the AT transcript (needed by `Device.wait_for_transcript`).
        start_timeout: seconds from spawn to READY=1.
        stop_timeout: seconds from SIGTERM to exit, before SIGKILL.
        at_timeout: default deadline of one `Device.at` command.
    """

    profile: str | None = "fast"
    config: Overrides = None
    transcript: bool = True
    start_timeout: float = 30.0
    stop_timeout: float = 10.0
    at_timeout: float = 5.0


class Device:
    """One running ``bridged run --pty`` (see the module docstring)."""

    def __init__(self, directory: Path, options: DeviceOptions = DeviceOptions()) -> None:
        self.directory = Path(os.path.abspath(directory))
        self.options = options
        self.port = self.directory / "tty"
        self.state_dir = self.directory / "state"
        self.config_path = self.directory / "bridged.toml"
        self.log_path = self.directory / "bridged.log"
        self.transcript_path = self.directory / "transcript.log"
        self.control_path = self.directory / "run" / "control.sock"
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.ready = False  # READY=1 came: it served
        self._at: AtClient | None = None
        self._transcript = TranscriptFollower(self.transcript_path) if options.transcript else None
        self._short_run_dir: str | None = None

    def __repr__(self) -> str:
        return f"<bridged Device {self.port} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -- start and stop ----------------------------------------------------------------

    def start(self) -> Device:
        """Spawn the daemon and wait until it is ready.

        Raises:
            DeviceError: it exited first (a config error, a bad profile...).
            DeviceTimeout: not ready within ``start_timeout``.
        """
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._make_run_dir()
        overrides = merge(normalise(_DEFAULTS), normalise(self.options.config))
        self.config_path.write_text(to_toml(overrides), encoding="utf-8")
        argv = daemon_argv(self.port, self.state_dir, str(self.config_path), self.options.profile)
        argv += ["--control", str(self.control_path)]
        if self.options.transcript:
            argv += ["--transcript", str(self.transcript_path)]
        # Next to the control socket, in a folder only we may enter: an abstract name is
        # listed in /proc/net/unix, and any local user could have sent READY=1 to it.
        name = str(self.control_path.parent / "notify.sock")
        with _notify_socket(name) as notify:
            env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
            env.update(NOTIFY_SOCKET=name, PYTHONUNBUFFERED="1")
            self.proc = spawn(argv, self.log_path, env)
            try:
                self._wait_ready(notify)
            except BaseException:
                self.stop()  # the error carries its log; nothing may outlive a failed start
                raise
        return self  # the notify socket is closed: later sd_notify calls fail at once, harmlessly

    def _make_run_dir(self) -> None:
        if len(os.fsencode(self.control_path)) > _SUN_PATH_MAX:
            self._short_run_dir = tempfile.mkdtemp(prefix="bridged-run-")
            self.control_path = Path(self._short_run_dir) / "control.sock"
        self.control_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _wait_ready(self, notify: socket.socket) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.options.start_timeout
        while True:
            if (code := exit_status(self.proc)) is not None:
                raise DeviceError(f"bridged exited with status {code} before it was ready "
                                  f"(profile {self.options.profile!r}):\n{self.log_tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceTimeout(f"bridged was not ready (no READY=1) within {self.options.start_timeout} s "
                                    f"(profile {self.options.profile!r}; its [firmware] boot_ms is part of the wait):\n"
                                    f"{self.log_tail()}")
            readable, _, _ = select.select([notify], [], [], min(left, 0.1))
            if readable and _take_ready(notify):
                self.ready = True
                return

    def stop(self) -> int:
        """Stop the device (SIGTERM, then SIGKILL after ``stop_timeout``); its exit status.

        A device killed with SIGKILL has status -9.  Idempotent.
        """
        if self._at is not None:
            self._at.close()
            self._at = None
        if self._transcript is not None:
            self._transcript.close()  # what it read stays; a later wait reopens the file
        proc = self.proc
        if proc is not None and self.exit_code is None:
            if exit_status(proc) is None:  # (Popen.send_signal would reap it: see bridged.launch)
                os.kill(proc.pid, signal.SIGTERM)
            try:  # what a supervisor that did not stop in order left behind goes too
                self.exit_code = finish(proc, self.port, self.options.stop_timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid)
                self.exit_code = finish(proc, self.port)
        if self._short_run_dir is not None:
            shutil.rmtree(self._short_run_dir, ignore_errors=True)
            self._short_run_dir = None
        return 0 if self.exit_code is None else self.exit_code

    def __enter__(self) -> Device:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the MCU's side ----------------------------------------------------------------

    @property
    def at(self) -> AtClient:
        """An AT client on the pty, opened at first use (``ready`` is still there to read)."""
        if self._at is None:
            self._at = AtClient(str(self.port), self.options.at_timeout)
        return self._at

    # -- the control socket ------------------------------------------------------------

    def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Send one control request (``{"cmd": ...}``); its reply, ``ok`` removed.

        Raises:
            UnknownCommand: the daemon does not know ``cmd``.
            ControlRefused: the daemon refused the request.
            DeviceError: no answer (the daemon died, or took over 5 s).
        """
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(_CONTROL_TIMEOUT)
                sock.connect(str(self.control_path))
                reply = request(sock, obj)
        except (OSError, ProtocolError) as exc:
            raise DeviceError(f"control socket {self.control_path}: {obj.get('cmd')!r}: "
                              f"{getattr(exc, 'strerror', None) or exc}{self._died()}") from None
        if reply.get("ok") is True:
            return {k: v for k, v in reply.items() if k != "ok"}
        error = str(reply.get("error", "no reason given"))
        if error.startswith("unknown cmd"):
            raise UnknownCommand(f"this bridged does not know the control command {obj.get('cmd')!r} "
                                 f"({error}); is it older than bridged.testing?", error)
        raise ControlRefused(f"bridged refused {obj.get('cmd')!r}: {error}", error)

    def status(self) -> dict[str, Any]:
        """What ``bridged status --json`` prints: the UART, Wi-Fi, links, recent errors."""
        return self.request({"cmd": "status"})["status"]

    def fault(self, name: str, **params: Any) -> dict[str, Any]:
        """Fire fault ``name`` now (``bridged fault NAME key=value ...``); the daemon's reply.

        Raises:
            UnknownCommand: this bridged has no ``fault`` command.
            ControlRefused: an unknown fault or a bad parameter (the reason says which).
        """
        return self.request({"cmd": "fault", "name": name, "params": params})

    # -- the transcript ----------------------------------------------------------------

    def wait_for_transcript(self, pattern: str | bytes | re.Pattern, timeout: float = 10.0,
                            direction: str | None = None) -> TranscriptMark | bytes:
        """Wait for a transcript event; consume it and return it.

        Without ``direction``: the next mark whose text (``command
        name=AT+CIPSEND kind=set``, ``fault name=...``) matches the regular
        expression ``pattern``; returns the `TranscriptMark`.  With
        ``direction`` "RX" (from the MCU) or "TX" (to the MCU): the next
        occurrence of ``pattern`` (bytes, or a bytes regex) in that stream;
        returns the bytes matched.

        Raises:
            DeviceTimeout: not seen within ``timeout`` seconds.
            DeviceError: the transcript is off, or the device died.
        """
        follower = self._transcript
        if follower is None:
            raise DeviceError("this device runs without a transcript (transcript=False)")
        if direction not in (None, "RX", "TX"):
            raise ValueError(f"direction {direction!r}: None (marks), 'RX' or 'TX'")
        if direction is not None and isinstance(pattern, str):
            pattern = pattern.encode()
        elif direction is None and isinstance(pattern, bytes):
            pattern = pattern.decode()
        deadline = time.monotonic() + timeout
        while True:
            follower.poll()
            found = (follower.find_mark(pattern) if direction is None
                     else follower.find_bytes(direction, pattern))
            if found is not None:
                return found
            if self.proc is None or exit_status(self.proc) is not None:
                raise DeviceError(f"waiting for {pattern!r} in the transcript: the device is not running"
                                  f"{self._died()}")
            if time.monotonic() > deadline:
                raise DeviceTimeout(f"no {'mark' if direction is None else direction + ' bytes'} matching "
                                    f"{pattern!r} in {self.transcript_path} within {timeout} s; "
                                    f"{follower.tail(direction)}")
            time.sleep(_POLL)

    # -- the log -----------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = _LOG_TAIL) -> str:
        """The end of the device's output, for a failure message."""
        text = self.log_text()
        return (f"--- {self.log_path} (last {chars} characters) ---\n" if len(text) > chars else
                f"--- {self.log_path} ---\n") + text[-chars:]

    def _died(self) -> str:
        if self.proc is not None and (code := exit_status(self.proc)) is not None:
            return f"; bridged exited with status {code}:\n{self.log_tail()}"
        return ""


@contextlib.contextmanager
def _notify_socket(path: str) -> Iterator[socket.socket]:
    """A datagram socket bound at ``path`` (one a last start left is replaced), removed after."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        sock.bind(path)
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _take_ready(sock: socket.socket) -> bool:
    """Read what is queued; True once READY=1 was among it."""
    for _ in range(64):  # bounded: STATUS= lines may come too
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return False
        if b"READY=1" in data.split(b"\n"):
            return True
    return False
