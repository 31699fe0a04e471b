"""Output.reply_now on a real pty under uvloop: written at once only when nothing else is
queued, held, paced or watched; otherwise queued as reply() queues it, the same bytes in the
same order."""

from __future__ import annotations

import asyncio

from bridged.uart.output import Output
from tests.uart.test_output import _read_until, _read_until_size, _run

PROMPT = b"\r\nOK\r\n\r\n>"
RECV_OK = b"\r\nRecv 4 bytes\r\n\r\nSEND OK\r\n"


def test_idle_output_writes_at_once_and_tells_the_drained_callback(pty_pair):
    master, slave = pty_pair

    async def main():
        drained = []
        out = Output(master, 0.005, lambda: drained.append(out.buffered))
        out.reply_now(PROMPT)
        written_at_once = out.written  # before the loop ran anything
        reads = await asyncio.to_thread(_read_until, slave, b">", 2.0)
        return written_at_once, drained, out.buffered, reads, out._final_at is not None

    written, drained, buffered, reads, final = _run(main())
    assert written == len(PROMPT)
    assert drained == [0] and buffered == 0
    assert b"".join(r for _, r in reads) == PROMPT
    assert final  # a final result went out: the URC gap counts from it


def test_behind_a_lingering_reply_or_a_queued_message_the_order_holds(pty_pair):
    master, slave = pty_pair

    async def main():
        out = Output(master, 0.0, lambda: None)
        out.reply(b"\r\nbusy p...\r\n", linger=5.0)  # queued, not scheduled: lingering
        out.reply_now(RECV_OK)
        assert out.written == 0  # not ahead of the lingering reply
        out.urc(b"\r\n+IPD,0,2:hi")
        out.reply_now(b"\r\nSEND OK\r\n")
        want = b"\r\nbusy p...\r\n" + RECV_OK + b"\r\n+IPD,0,2:hi\r\nSEND OK\r\n"
        return await asyncio.to_thread(_read_until_size, slave, len(want), 2.0), want

    reads, want = _run(main())
    assert b"".join(r for _, r in reads) == want


def test_a_port_that_takes_part_keeps_the_rest_in_order(pty_pair):
    """A full port (the host not reading): the rest waits for it, and what follows goes behind."""
    master, slave = pty_pair

    async def main():
        out = Output(master, 0.0, lambda: None)
        big = bytes(range(256)) * 1024  # more than the pty takes at once
        out.reply_now(big, final=False)
        assert 0 < out.written < len(big) and out.buffered == len(big) - out.written
        out.reply_now(RECV_OK)
        reads = await asyncio.to_thread(_read_until_size, slave, len(big) + len(RECV_OK), 5.0)
        return b"".join(r for _, r in reads), big, out.buffered

    got, big, buffered = _run(main())
    assert got == big + RECV_OK
    assert buffered == 0


def test_a_failed_write_queues_it_for_the_pump_to_report():
    """The port is gone (EBADF here): reply_now queues the bytes, the pump meets the error and
    reports it through on_failed, as for a queued reply; nothing is lost."""
    import os

    r, w = os.pipe()
    os.close(r)  # a write fails with EPIPE

    async def main():
        failures = []
        out = Output(w, 0.0, lambda: None, on_failed=failures.append)
        out.reply_now(PROMPT)
        await asyncio.sleep(0.05)
        return failures, out.buffered, out.suspended

    try:
        failures, buffered, suspended = _run(main())
    finally:
        os.close(w)
    assert len(failures) == 1 and isinstance(failures[0], OSError)
    assert buffered == len(PROMPT) and suspended


def test_bytes_written_at_once_count_as_batched(pty_pair):
    """The injected-fault offsets count every byte joined into a write (Output.batched): one
    written at once counts as a batch the pump writes does, once."""
    master, slave = pty_pair

    async def main():
        out = Output(master, 0.0, lambda: None)
        out.reply_now(PROMPT)
        out.reply(b"\r\nOK\r\n")
        out.reply_now(RECV_OK)  # queued behind the reply: batched by the pump
        await asyncio.to_thread(_read_until_size, slave, len(PROMPT) + 6 + len(RECV_OK), 2.0)
        return out.batched

    assert _run(main()) == len(PROMPT) + 6 + len(RECV_OK)
