"""A small synchronous AT client: the MCU's end of a serial line, for tools.

Used by ``bridged fleet status --probe`` (how fast each device answers
``AT``), by the Locust integration (``bridged.locust``: one client per
emulated device) and by the fleet benchmark. It is not a host driver: one command at a
time, a final result ends an answer, and active-mode ``+IPD`` records are
taken out of the stream by their announced length (so payload bytes are never
read as a final result) and kept per link in `received`.

Every wait has a deadline. Reads go through ``select.select`` looked up at
call time and non-blocking ``os.read``, so under gevent's monkey patching
(Locust) a wait yields to other greenlets instead of blocking the process.
"""

from __future__ import annotations

import os
import re
import select
import termios
import time
import tty
from dataclasses import dataclass, field

__all__ = ["AtAnswer", "AtClient", "AtTimeout"]

# A final result at a line start (the echo of "AT" precedes it when ATE1).
_FINAL = re.compile(rb"(?:^|\r\n)(OK|ERROR|SEND OK|SEND FAIL)\r\n")
_IPD = re.compile(rb"\+IPD,(\d+)(?:,(\d+))?(?:,\"[^\"]*\",\d+)?:")
_NOTICE = re.compile(rb"\+IPD,\d+(?:,\d+)?\r\n")  # passive mode: a count, no payload
_IPD_HEAD_MAX = 64  # "+IPD,4,65536,"<IPv6 address>",65535:" fits


class AtTimeout(TimeoutError):
    """No final result came before the deadline."""


@dataclass(frozen=True, slots=True)
class AtAnswer:
    """What one command got back: the bytes through its final result."""

    text: bytes
    final: str  # "OK", "ERROR", "SEND OK", "SEND FAIL"
    seconds: float  # from the command's first byte written to its final result read

    @property
    def ok(self) -> bool:
        return self.final in ("OK", "SEND OK")


@dataclass
class AtClient:
    """An open serial line (usually a pty's slave end) spoken to in AT.

    Args:
        path: the device or pty symlink.
        timeout: default deadline of a command, in seconds.
    """

    path: str
    timeout: float = 5.0
    fd: int = field(init=False, default=-1)
    received: dict[int | None, bytearray] = field(init=False, default_factory=dict)
    _buf: bytearray = field(init=False, default_factory=bytearray)

    def __post_init__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            tty.setraw(self.fd, termios.TCSANOW)  # TCSAFLUSH would drop a pending "ready"
        except termios.error:
            pass  # not a tty (a socket pair in a test): nothing to set

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> AtClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------

    def _fill(self, wait: float) -> bool:
        readable, _, _ = select.select([self.fd], [], [], max(0.0, wait))
        if not readable:
            return False
        try:
            chunk = os.read(self.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:  # EIO: the daemon closed the pty's master end
            raise ConnectionError(f"{self.path}: {exc.strerror}") from exc
        if not chunk:
            raise ConnectionError(f"{self.path}: end of file")
        self._buf += chunk
        self._take_ipd()
        return True

    def _take_ipd(self) -> None:
        """Move complete +IPD records out of the buffer into `received`."""
        pos = 0
        while (start := self._buf.find(b"+IPD,", pos)) >= 0:
            match = _IPD.match(self._buf, start)
            if match is None and (notice := _NOTICE.match(self._buf, start)) is not None:
                pos = notice.end()  # a passive-mode notice stays as text
                continue
            if match is None:
                if len(self._buf) - start <= _IPD_HEAD_MAX:
                    return  # the head may still be coming
                pos = start + 1  # not a record's head: leave it as text
                continue
            first, second = match.group(1), match.group(2)
            link_id, length = (int(first), int(second)) if second else (None, int(first))
            end = match.end() + length
            if len(self._buf) < end:
                return  # the payload is still coming
            self.received.setdefault(link_id, bytearray()).extend(self._buf[match.end():end])
            del self._buf[start:end]
            pos = start

    def flush_input(self) -> bytes:
        """Drop what the line holds (boot messages, an earlier user's leftovers)."""
        try:
            termios.tcflush(self.fd, termios.TCIFLUSH)
        except termios.error:
            pass
        while self._fill(0):
            pass
        dropped, self._buf = bytes(self._buf), bytearray()
        return dropped

    def expect(self, pattern: bytes, timeout: float | None = None) -> bytes:
        """Read until ``pattern``; return everything through it.

        Raises:
            AtTimeout: not seen before the deadline.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while (i := self._buf.find(pattern)) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AtTimeout(f"waited for {pattern!r}; have {bytes(self._buf[-200:])!r}")
            self._fill(left)
        out = bytes(self._buf[: i + len(pattern)])
        del self._buf[: i + len(pattern)]
        return out

    def _final(self, deadline: float, started: float) -> AtAnswer:
        while (match := _FINAL.search(self._buf)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AtTimeout(f"no final result; have {bytes(self._buf[-200:])!r}")
            self._fill(left)
        seconds = time.perf_counter() - started
        # Take the group before the buffer changes: a match on a bytearray reads it live.
        final, end = match.group(1).decode(), match.end()
        text = bytes(self._buf[:end])
        del self._buf[:end]
        return AtAnswer(text, final, seconds)

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes, timeout: float | None = None) -> None:
        """Write all of ``data``, reading what comes meanwhile (the tty may be full)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AtTimeout(f"{self.path}: the device stopped reading") from None
                readable, _, _ = select.select([self.fd], [self.fd], [], min(left, 0.05))
                if self.fd in readable:
                    self._fill(0)

    def command(self, line: str | bytes, timeout: float | None = None) -> AtAnswer:
        """Send one command line; return its answer through OK or ERROR.

        Raises:
            AtTimeout: no final result within ``timeout`` (default `timeout`).
            ConnectionError: the line went away (the daemon stopped).
        """
        raw = line.encode() if isinstance(line, str) else line
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        started = time.perf_counter()
        self.write(raw + b"\r\n", timeout)
        return self._final(deadline, started)

    def send(self, payload: bytes, link_id: int | None = None,
             timeout: float | None = None) -> AtAnswer:
        """AT+CIPSEND one payload (link ``link_id`` when AT+CIPMUX=1): wait for
        the ``>`` prompt, write it, return the answer through SEND OK or SEND FAIL
        (or the command's ERROR, when no prompt came).

        Raises:
            AtTimeout: no prompt or no final result before the deadline.
        """
        target = f"{link_id}," if link_id is not None else ""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        started = time.perf_counter()
        self.write(f"AT+CIPSEND={target}{len(payload)}\r\n".encode(), timeout)
        while (prompt := self._buf.find(b"\r\n>")) < 0:
            if (match := _FINAL.search(self._buf)) is not None and match.group(1) == b"ERROR":
                return self._final(deadline, started)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AtTimeout(f"no '>' prompt; have {bytes(self._buf[-200:])!r}")
            self._fill(left)
        del self._buf[: prompt + 3]
        self.write(payload, deadline - time.monotonic())
        return self._final(deadline, started)

    def round_trip(self, timeout: float = 1.0) -> float:
        """Seconds from ``AT`` written to its OK read (the line must be quiet).

        Raises:
            AtTimeout: no OK within ``timeout``.
        """
        answer = self.command(b"AT", timeout)
        if not answer.ok:
            raise AtTimeout(f"AT answered {answer.final}")
        return answer.seconds
