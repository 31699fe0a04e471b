"""One daemon for several tests of a module, each test on a factory-fresh session.

Starting a daemon (a Python start, its imports, five link workers) is most of
the time of a short end-to-end test.  Where a test needs only what AT+RESTORE
gives back -- the session of a freshly flashed ESP: settings, links, servers,
stored values -- a module can keep one daemon and start each test with
AT+RESTORE instead.

Each test sees the daemon as if it were its own: ``begin()`` marks the log, so
``events()``, ``wait_event()`` and ``log_text()`` show only what was logged
from the test's AT+RESTORE on, and the test's ``expected_errors`` start empty.
Every line of the log is checked for unexpected errors exactly once, against
the expected errors of the test it belongs to (a test's late lines, up to the
next test's restore, count as its own).  Not for tests that need what a
restart keeps or a fresh process has (the RTC clock, the processes' pids and
their start events, the process itself): those start their own daemon.

A test that leaves the session where AT+RESTORE cannot reach it (a data mode,
a port that stopped reading), or that logged one of ``retire_after`` (state
AT+RESTORE does not undo, such as a set clock), costs a fresh daemon, not the
next test.  Nor may what it left on the line pass for the next test's
answers: the pty's unread input is flushed first (an OK it did not read would
pass for AT+RESTORE's), a ``ready`` before the OK (a restart it began: the
booting chip lost AT+RESTORE) sends AT+RESTORE again, and the daemon's log
must show the factory restart (an OK and a ready of the last test's AT+RST
are not a restore).
"""

from __future__ import annotations

import re
import termios
import time
from pathlib import Path

from tests.harness import Daemon, Host, Timeout, parse_events

__all__ = ["SharedDaemon"]


class SharedDaemon:
    """A daemon kept across tests (``config`` and ``args`` as Daemon's).

    ``begin()`` gives each test the daemon on a fresh session, ``ready`` on its
    way to the next ``daemon.host()``; ``host()`` a booted host on it;
    ``done()`` checks what the test left in the log; ``stop()`` ends the daemon
    (exit 0, no unexpected error).
    """

    def __init__(self, tmp: Path, config: str = "", args: tuple[str, ...] = (),
                 retire_after: tuple[str, ...] = ()) -> None:
        self.tmp, self.config, self.args = tmp, config, args
        self.retire_after = retire_after
        self.daemon: Daemon | None = None
        self._started = 0
        self._checked = 0  # log bytes already checked for unexpected errors
        self._retire = False

    def begin(self) -> Daemon:
        """The daemon, its session factory-fresh (AT+RESTORE, else a new daemon) and its
        log marked: the test's ``daemon.host()`` then reads ``ready`` as after a start."""
        host = None
        if self.daemon is not None and not self._retire:
            restores = len(self._factory_restarts())
            host = self._restored()
            if host is not None:
                try:  # logged as the OK has gone out, well before ready
                    self.daemon.wait_event("restart", count=restores + 1, factory=True, timeout=2)
                except Timeout:
                    host.close()  # what answered was not a restore: the last test's AT+RST
                    host = None
            # The last test's late lines and the restore, with that test's expected errors.
            self._check("before this test, after the last one's end")
            if self._retire and host is not None:
                host.close()
                host = None
        if host is None:
            self._replace()
            host = self.daemon.host()
        self.daemon.expected_errors = set()
        self.daemon.log_from = self._checked
        self.daemon.pending_host = host
        return self.daemon

    def host(self) -> Host:
        """A host that has seen ready, turned echo off and joined the Wi-Fi, on a
        session no earlier test has touched."""
        host = self.begin().host()
        host.boot()
        return host

    def done(self) -> None:
        """Fail the test that just ran if it logged an unexpected error; retire the
        daemon if it logged one of ``retire_after``."""
        if self.daemon.pending_host is not None:  # begun, never used
            self.daemon.pending_host.close()
            self.daemon.pending_host = None
        self._check()

    def stop(self) -> None:
        if self.daemon is not None:
            self._stop(self.daemon)

    def _factory_restarts(self) -> list[dict]:
        return [e for e in self.daemon.events("restart") if e.get("factory")]

    def _restored(self) -> Host | None:
        """The host after AT+RESTORE's OK (echo on or off), or None: the daemon is gone,
        or the session did not answer (it is then replaced); see the module's docstring."""
        if self.daemon.proc.poll() is not None:
            return None
        host = self.daemon.host()
        termios.tcflush(host.fd, termios.TCIFLUSH)  # the last test's unread answers are not ours
        for _ in range(2):
            host.write(b"AT+RESTORE\r\n")
            answer = self._ok_or_ready(host, 2.0)
            if answer == b"OK":
                return host
            if answer is None:
                break
        host.close()
        return None

    @staticmethod
    def _ok_or_ready(host: Host, timeout: float) -> bytes | None:
        """Read through the first OK or ready: which came, or None for neither in time."""
        deadline = time.monotonic() + timeout
        while (m := re.search(rb"\r\n(OK|ready)\r\n", host.buf)) is None:
            if time.monotonic() > deadline:
                return None
            host._fill(0.05)
        which = bytes(m.group(1))
        del host.buf[: m.end()]
        return which

    def _replace(self) -> None:
        if self.daemon is not None:
            self._stop(self.daemon)
        self._started += 1
        directory = self.tmp / f"shared{self._started}"
        directory.mkdir()
        self.daemon = Daemon(directory, self.config, self.args).start()
        self._checked = 0
        self._retire = False

    def _check(self, when: str = "") -> None:
        """Unexpected errors logged since the last check fail the test; a retiring event
        marks the daemon for replacement."""
        text, self._checked = self.daemon.read_log(self._checked)
        events = parse_events(text)
        if any(e.get("event") in self.retire_after for e in events):
            self._retire = True
        errors = [e for e in events if e.get("level") in ("error", "critical")
                  and e.get("event") not in self.daemon.expected_errors]
        assert not errors, f"unexpected errors in the log{' (' + when + ')' if when else ''}: {errors}"

    def _stop(self, daemon: Daemon) -> None:
        code = daemon.stop()
        assert code == 0, f"daemon exited {code}:\n{daemon.log_text()[-3000:]}"
        self._check("when the shared daemon stopped")
