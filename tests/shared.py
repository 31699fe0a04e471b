"""One daemon for several tests of a module, each test on a factory-fresh session.

Starting a daemon (a Python start, its imports, five link workers) is most of
the time of a short end-to-end test.  Where a test needs only what AT+RESTORE
gives back -- the session of a freshly flashed ESP: settings, links, servers,
stored values -- a module can keep one daemon and start each test with
AT+RESTORE instead.  Not for tests that read the daemon's log or processes, or
that need what a restart keeps (the RTC clock, the process itself).

A test that leaves the session where AT+RESTORE cannot reach it (a data mode,
a port that stopped reading) costs a fresh daemon, not the next test.  Nor
may what it left on the line pass for the next test's answers: the pty's
unread input is flushed first (an OK it did not read would pass for
AT+RESTORE's), a ``ready`` before the OK (a restart it began: the booting
chip lost AT+RESTORE) sends AT+RESTORE again, and the daemon's log must show
the factory restart (an OK and a ready of the last test's AT+RST are not a
restore).
"""

from __future__ import annotations

import re
import termios
import time
from pathlib import Path

from tests.harness import Daemon, Host, Timeout

__all__ = ["SharedDaemon"]


class SharedDaemon:
    """A daemon kept across tests (``config`` and ``args`` as Daemon's); ``host()``
    gives each test its booted host, ``done()`` checks what that test left in the
    log, ``stop()`` ends the daemon (exit 0, no unexpected error)."""

    def __init__(self, tmp: Path, config: str = "", args: tuple[str, ...] = ()) -> None:
        self.tmp, self.config, self.args = tmp, config, args
        self.daemon: Daemon | None = None
        self._started = 0
        self._errors = 0

    def host(self) -> Host:
        """A host that has seen ready, turned echo off and joined the Wi-Fi, on a
        session no earlier test has touched (AT+RESTORE, else a new daemon)."""
        restores = len(self._factory_restarts())
        host = self._restored()
        if host is not None:
            try:  # logged as the OK has gone out, well before ready
                self.daemon.wait_event("restart", count=restores + 1, factory=True, timeout=2)
            except Timeout:
                host.close()  # what answered was not a restore: the last test's AT+RST
                host = None
        if host is None:
            self._replace()
            host = self.daemon.host()
        host.boot()
        self._errors = len(self._unexpected())
        return host

    def _factory_restarts(self) -> list[dict]:
        return [] if self.daemon is None else [e for e in self.daemon.events("restart") if e.get("factory")]

    def done(self) -> None:
        """Fail the test that just ran if it logged an unexpected error."""
        new = self._unexpected()[self._errors:]
        assert not new, f"unexpected errors in the log: {new}"

    def stop(self) -> None:
        if self.daemon is not None:
            self._stop(self.daemon)

    def _restored(self) -> Host | None:
        """The host after AT+RESTORE's OK (echo on or off), or None: no daemon yet, or
        the session did not answer (the daemon is then replaced); see the module's docstring."""
        if self.daemon is None or self.daemon.proc.poll() is not None:
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

    def _unexpected(self) -> list[dict]:
        return [e for e in self.daemon.events() if e.get("level") in ("error", "critical")
                and e.get("event") not in self.daemon.expected_errors]

    def _stop(self, daemon: Daemon) -> None:
        code = daemon.stop()
        assert code == 0, f"daemon exited {code}:\n{daemon.log_text()[-3000:]}"
        errors = [e for e in daemon.events() if e.get("level") in ("error", "critical")
                  and e.get("event") not in daemon.expected_errors]
        assert not errors, f"unexpected errors in the log: {errors}"
