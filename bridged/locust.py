"""Locust integration: each Locust user is one emulated device.

A `BridgedDevice` user starts its own ``bridged run`` on a pty in a temporary
directory (``on_start``) and stops it (``on_stop``); its tasks speak AT on that
pty through ``self.at``, and every command is a Locust request (request_type
``"AT"``, name = the command up to ``=`` or the name given, response time =
the AT round trip, response length = the answer's bytes, a failure on ERROR,
SEND FAIL, a timeout or a lost line). Locust's master and workers then spread
a fleet over many machines: each worker runs its share of devices locally.

    from locust import constant, task
    from bridged.locust import BridgedDevice

    class Sensor(BridgedDevice):
        wait_time = constant(1)

        @task
        def alive(self):
            self.at.command("AT")

Options added to Locust's command line (and passed on to its workers):
``--bridged-config FILE`` and ``--bridged-profile NAME``, as ``bridged run``'s
``--config`` and ``--profile``. A subclass may set `config_text` (TOML) or
`profile` instead.

Under gevent: Locust monkey-patches at import, so the daemon is spawned with
gevent's subprocess (the user's greenlet waits, the others run) and the AT
client waits in a patched ``select.select``. This module imports locust first
so that the patching happens before anything here touches a socket or a
process. The daemon runs in a session of its own (Ctrl-C reaches Locust, which
stops the users, which stop their daemons) and is told to die with Locust
(``PR_SET_PDEATHSIG``) should Locust itself be killed.
"""

from __future__ import annotations

from locust import User, events  # noqa: I001 -- first: gevent's monkey patching before the rest

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bridged.atclient import AtAnswer, AtClient, AtTimeout
from bridged.launch import daemon_argv, kill_group, spawn

__all__ = ["AtFailure", "AtSession", "BridgedDevice"]

logger = logging.getLogger(__name__)  # Locust's own logging setup renders it


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--bridged-config", metavar="FILE", default=None, include_in_web_ui=False,
                        help="bridged configuration file for every emulated device")
    parser.add_argument("--bridged-profile", metavar="NAME", default=None, include_in_web_ui=False,
                        help="bridged profile for every emulated device (default esp32)")


def _name(line: str) -> str:
    """A stats name that groups by command and leaves parameters (passwords) out."""
    return line.split("=", 1)[0].strip() or "AT"


class AtSession:
    """An `AtClient` whose every command is reported to Locust as a request."""

    def __init__(self, client: AtClient, environment) -> None:
        self.client = client
        self._events = environment.events
        self._stale = False  # a command timed out: its late answer may still come

    def _run(self, name: str, call) -> AtAnswer:
        if self._stale:
            self.client.flush_input()
            self._stale = False
        started = time.perf_counter()
        exception: Exception | None = None
        try:
            answer = call()
        except (AtTimeout, ConnectionError) as exc:
            self._stale = isinstance(exc, AtTimeout)
            exception = exc
            answer = AtAnswer(b"", "TIMEOUT" if self._stale else "CLOSED", time.perf_counter() - started)
        if exception is None and not answer.ok:
            exception = AtFailure(f"{answer.final}: {answer.text[-200:]!r}")
        self._events.request.fire(request_type="AT", name=name, response_time=answer.seconds * 1000,
                                  response_length=len(answer.text), exception=exception, context={})
        return answer

    def command(self, line: str, name: str | None = None, timeout: float | None = None) -> AtAnswer:
        """Send ``line``; return its answer (``.ok`` False on ERROR, timeout, lost line).

        Never raises for the device's answers: failures go to Locust's stats.
        """
        return self._run(name or _name(line), lambda: self.client.command(line, timeout))

    def send(self, payload: bytes, link_id: int | None = None, name: str | None = None,
             timeout: float | None = None) -> AtAnswer:
        """AT+CIPSEND ``payload`` (on ``link_id`` when AT+CIPMUX=1), through SEND OK."""
        return self._run(name or "AT+CIPSEND", lambda: self.client.send(payload, link_id, timeout))


class AtFailure(Exception):
    """The device answered ERROR or SEND FAIL."""


class BridgedDevice(User):
    """A Locust user that is one emulated ESP32 with its own bridged."""

    abstract = True
    config_text: str | None = None  # TOML for the device, over --bridged-config's file
    profile: str | None = None  # over --bridged-profile
    start_timeout = 30.0  # seconds until the device says ready
    at_timeout = 5.0  # default deadline of one AT command

    def __init__(self, environment) -> None:
        super().__init__(environment)
        self.workdir: Path | None = None
        self.daemon: subprocess.Popen | None = None
        self.at: AtSession | None = None

    # -- start ---------------------------------------------------------------------------

    def on_start(self) -> None:
        started = time.perf_counter()
        try:
            self._start_device()
        except BaseException as exc:
            self._fire_start(started, exc)
            self._stop_device()  # Locust calls on_stop only for GreenletExit/StopUser
            raise
        self._fire_start(started, None)

    def _fire_start(self, started: float, exc: BaseException | None) -> None:
        if isinstance(exc, Exception) or exc is None:
            self.environment.events.request.fire(
                request_type="device", name="start", response_time=(time.perf_counter() - started) * 1000,
                response_length=0, exception=exc, context={})

    def _argv(self, workdir: Path) -> list[str]:
        options = getattr(self.environment, "parsed_options", None)
        config = getattr(options, "bridged_config", None)
        profile = self.profile or getattr(options, "bridged_profile", None)
        if self.config_text is not None:
            config = str(workdir / "bridged.toml")
            Path(config).write_text(self.config_text)
        return daemon_argv(workdir / "tty", workdir / "state", config and os.path.abspath(config), profile)

    def _start_device(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="bridged-locust-"))
        self.daemon = spawn(self._argv(self.workdir), self.workdir / "bridged.log")
        pty = self.workdir / "tty"
        deadline = time.monotonic() + self.start_timeout
        while not pty.exists():
            if self.daemon.poll() is not None:
                raise RuntimeError(f"bridged exited with {self.daemon.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise AtTimeout(f"bridged did not create its pty in {self.start_timeout} s")
            time.sleep(0.02)  # gevent's sleep under Locust: other users run meanwhile
        client = AtClient(str(pty), self.at_timeout)
        try:
            client.expect(b"\r\nready\r\n", max(0.1, deadline - time.monotonic()))
        except BaseException:
            client.close()
            raise
        self.at = AtSession(client, self.environment)

    def _log_tail(self) -> str:
        try:
            return (self.workdir / "bridged.log").read_text(errors="replace")[-1000:]
        except (OSError, TypeError):
            return ""

    # -- stop ----------------------------------------------------------------------------

    def on_stop(self) -> None:
        self._stop_device()

    def _stop_device(self) -> None:
        if self.at is not None:
            self.at.client.close()
            self.at = None
        daemon, self.daemon = self.daemon, None
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                kill_group(daemon.pid)
                daemon.wait(5)
        workdir, self.workdir = self.workdir, None
        if workdir is None:
            return
        if daemon is not None and daemon.returncode not in (0, -signal.SIGTERM):
            logger.warning("bridged exited with %s; its log is kept in %s", daemon.returncode, workdir)
            return
        shutil.rmtree(workdir, ignore_errors=True)
