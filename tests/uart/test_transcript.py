"""The AT transcript's Transcript switch (its lines: test_transcript_format.py, its file: test_transcript_file.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import select
import threading
import time
import tracemalloc
import tty

import pytest
import uvloop
from structlog.testing import capture_logs

from bridged.config import LogConfig
from bridged.uart import transcript
from bridged.uart.transcript import Direction, MarkKind, Transcript, parse_line

pytestmark = pytest.mark.usefixtures("plain_structlog")


# --------------------------------------------------------------------------
# The Transcript: switching, buffering, sinks.


class Holder:
    tap = None


def _config(**kw) -> LogConfig:
    return dataclasses.replace(LogConfig(), **kw)


def _read(path) -> list:
    return [parse_line(line) for line in path.read_text().splitlines()]


def test_enable_disable_sets_and_clears_the_tap(tmp_path):
    """enable() puts the transcript on every holder, disable() takes it off and writes what was recorded."""
    path = tmp_path / "t"

    async def main():
        a, b = Holder(), Holder()
        t = Transcript(_config(transcript_path=str(path)), holders=(a, b))
        assert (t.enabled, a.tap, b.tap) == (False, None, None)
        assert not path.exists()  # off: no file at all
        assert t.enable()
        assert a.tap is t and b.tap is t
        a.tap.received(b"AT\r\n")
        b.tap.sent(memoryview(b"\r\nOK\r\n"))
        t.disable()
        assert (t.enabled, a.tap, b.tap) == (False, None, None)
        return _read(path)

    lines = uvloop.run(main())
    assert [ln.mark for ln in lines] == [MarkKind.TRANSCRIPT_ON, None, None, MarkKind.TRANSCRIPT_OFF]
    assert [(ln.direction, ln.data) for ln in lines[1:3]] == [(Direction.RX, b"AT\r\n"),
                                                              (Direction.TX, b"\r\nOK\r\n")]
    assert lines[0].mono <= lines[1].mono <= lines[2].mono <= lines[3].mono


def test_on_from_config_and_flushed_by_the_timer(tmp_path):
    """[log] transcript = true switches it on at once; recorded bytes reach the file within the flush interval, not at once."""
    path = tmp_path / "t"

    async def main():
        h = Holder()
        t = Transcript(_config(transcript=True, transcript_path=str(path)), holders=(h,))
        h.tap.received(b"AT+GMR\r\n")
        immediately = path.read_text()
        await asyncio.sleep(0.5)
        later = path.read_text()
        t.close()
        return immediately, later

    immediately, later = uvloop.run(main())
    assert "AT+GMR" not in immediately
    assert "'AT+GMR\\r\\n'" in later


def test_write_failure_switches_off_and_says_why(tmp_path):
    """A full disk (/dev/full) ends the transcript at the next flush with one error event, never an exception in the byte path."""

    async def main():
        h = Holder()
        t = Transcript(_config(transcript=True, transcript_path="/dev/full"), holders=(h,))
        with capture_logs() as logs:
            h.tap.received(b"x" * 300_000)  # over the flush size: handed to the writer at the next turn
            await asyncio.sleep(0.05)  # ... which fails on its thread
            h.tap.sent(b"y")  # the next flush (on the timer) finds the failure
            async with asyncio.timeout(5):
                while t.enabled:
                    await asyncio.sleep(0.01)
        return t, h, logs

    t, h, logs = uvloop.run(main())
    assert (t.enabled, h.tap) == (False, None)
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["transcript_write_failed"]



def test_write_failure_at_close_is_said(tmp_path):
    """When the last write, on the way out, fails (/dev/full), close() says so with one error event instead of transcript_off."""

    async def main():
        h = Holder()
        with capture_logs() as logs:
            t = Transcript(_config(transcript=True, transcript_path="/dev/full"), holders=(h,))
            h.tap.received(b"AT\r\n")
            t.close()  # before the timer: the writer thread gets it all now
        return t, h, logs

    t, h, logs = uvloop.run(main())
    assert (t.enabled, h.tap) == (False, None)
    assert [e["event"] for e in logs] == ["transcript_on", "transcript_write_failed"]

def test_unwritable_path_is_an_error_not_a_crash(tmp_path):
    """A path that cannot be opened leaves the transcript off with an error event."""

    async def main():
        with capture_logs() as logs:
            t = Transcript(_config(transcript=True, transcript_path=str(tmp_path / "no" / "t")))
        return t, logs

    t, logs = uvloop.run(main())
    assert not t.enabled
    assert [e["event"] for e in logs] == ["transcript_unavailable"]


@pytest.mark.parametrize(("level", "with_bytes"), [("info", False), ("debug", True)])
def test_to_the_log_marks_at_info_bytes_at_debug_only(level, with_bytes):
    """Without a path, marks are info events; bytes are debug events, and only when the level is debug."""

    async def main():
        h = Holder()
        with capture_logs() as logs:
            t = Transcript(_config(transcript=True, level=level), holders=(h,))
            h.tap.mark(MarkKind.COMMAND, name="AT+CIPSEND", kind="set")
            h.tap.received(b"secret")
            t.close()
        return logs

    logs = uvloop.run(main())
    marks = [e for e in logs if e["event"] == "transcript_mark"]
    assert [(e["mark"], e["log_level"]) for e in marks] == [
        ("transcript_on", "info"), ("command", "info"), ("transcript_off", "info")]
    assert marks[1]["name"] == "AT+CIPSEND"
    chunks = [e for e in logs if e["event"] == "transcript_bytes"]
    if with_bytes:
        assert [(e["dir"], e["text"], e["hex"], e["log_level"]) for e in chunks] == [
            ("RX", "secret", b"secret".hex(" "), "debug")]
    else:
        assert chunks == []


# --------------------------------------------------------------------------
# A disk that stops taking writes.


class _Drain:
    """Reads a pty master on a thread of its own, from a given moment on."""

    def __init__(self, master: int, start_after: float) -> None:
        self.master, self.data, self.go = master, bytearray(), threading.Event()
        self._stop = threading.Event()
        self._timer = threading.Timer(start_after, self.go.set)  # rescues a loop stuck in write()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._timer.start()
        self._thread.start()

    def _run(self) -> None:
        self.go.wait()
        while not self._stop.is_set():
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self.data += os.read(self.master, 65536)
                except OSError:  # EIO: every writer has closed the slave
                    return

    def stop(self, timeout: float = 30.0) -> bytes:
        """What was read, once its last line is the transcript_off mark (or by ``timeout``).

        Not a fixed wait for what is in flight: the writer thread may still be writing
        its backlog (hundreds of KiB) after the Transcript's close gave up waiting for it
        (0.5 s), and on a loaded machine the drain then stopped before the end came."""
        self._timer.cancel()
        self.go.set()
        deadline = time.monotonic() + timeout
        while not self._ended() and time.monotonic() < deadline:  # bounded
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(5)
        return bytes(self.data)

    def _ended(self) -> bool:
        tail = bytes(self.data[-4096:])  # (the drain's thread appends meanwhile)
        if not tail.endswith(b"\n"):
            return False
        last = tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1 : -1].decode(errors="replace")
        try:
            return parse_line(last).mark is MarkKind.TRANSCRIPT_OFF
        except ValueError:
            return False


def test_stuck_file_never_stalls_the_loop_and_its_backlog_is_bounded(monkeypatch):
    """A file that stops taking writes (a pty nobody reads) neither stalls the loop nor grows memory: records past the backlog limit are dropped and one lost mark counts them."""
    monkeypatch.setattr(transcript, "_BACKLOG_LIMIT", 256 * 1024)
    master, slave = os.openpty()
    tty.setraw(slave)
    drain = _Drain(master, start_after=30.0)  # only a loop stuck in write() needs it
    piece = bytes(range(256)) * 40  # 10 KiB: 60 KiB of transcript text

    async def main():
        h = Holder()
        t = Transcript(_config(transcript=True, transcript_path=os.ttyname(slave)), holders=(h,))
        loop = asyncio.get_running_loop()
        worst, last = 0.0, loop.time()
        tracemalloc.start()
        for _ in range(600):  # 6 MiB recorded, 36 MiB of text, for a pty that takes a few KiB
            h.tap.received(piece)
            await asyncio.sleep(0.002)
            now = loop.time()
            worst, last = max(worst, now - last), now
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        drain.go.set()  # the disk is back
        # ... and has taken the backlog (not a fixed 0.5 s: on a loaded machine the writer
        # and the drain took longer, and "after" was then counted lost behind the limit).
        writer = t._sink.writer
        deadline = loop.time() + 20
        while writer.backlog and loop.time() < deadline:  # bounded
            await asyncio.sleep(0.02)
        h.tap.sent(b"after")
        t.close()
        return worst, peak

    try:
        worst, peak = uvloop.run(main())
        text = drain.stop().decode()
    finally:
        os.close(slave)
        os.close(master)
    # A loop stuck in write() stalls until the drain starts at 30 s; formatting a
    # batch under tracemalloc on a loaded machine has taken 2.5 s.
    assert worst < 10.0, f"the loop stalled {worst:.1f} s"
    # The limit, and one flush's batch (256 KiB) formatted, joined and encoded: about 5 MiB.
    assert peak < 12 * 1024 * 1024, f"{peak} bytes held"
    lines = [parse_line(line) for line in text.splitlines()]
    lost = [ln for ln in lines if ln.mark is MarkKind.LOST]
    assert len(lost) == 1 and lost[0].fields["tx"] == 0 and lost[0].fields["rx"] > 0
    rx = b"".join(ln.data for ln in lines if ln.direction is Direction.RX)
    assert len(rx) + lost[0].fields["rx"] == 600 * len(piece)
    assert rx == piece * (len(rx) // len(piece))  # whole reads kept, in order
    assert [ln.data for ln in lines if ln.direction is Direction.TX] == [b"after"]
    assert lines[-1].mark is MarkKind.TRANSCRIPT_OFF
