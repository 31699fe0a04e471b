"""Output's inlined checks (reply/urc queueing, the URC gap in _next_batch) on a real pty under
uvloop: the same decisions as the helpers they replaced."""

from __future__ import annotations

import asyncio

from bridged.uart.output import Output
from tests.uart.test_output import _read_until_size, _run


def test_a_batch_takes_a_held_message_exactly_when_urc_due_says_it_is_due(pty_pair):
    """_next_batch's inline gap check agrees with _urc_due over a grid of gaps, last-final times,
    queue times and a final ahead in the same batch (the timer after a write uses _urc_due)."""
    master, _ = pty_pair
    half = 0.0005  # half the output's 1 ms tick

    async def main() -> list[tuple]:
        wrong = []
        out = Output(master, 0.0, lambda: None)
        for gap in (0.0, 0.05):
            for final_at in (None, 10.0, 10.03, 10.06):
                for queued_at in (10.0, 10.02, 10.05):
                    for final_first in (False, True):
                        now = 10.07
                        out.gap, out._final_at, out._pending = gap, final_at, None
                        out._replies.clear()
                        out._urcs.clear()
                        if final_first:
                            out._replies.append((0, b"\r\nOK\r\n", True, 6))
                        out._urcs.append((1, b"X", queued_at, 1))
                        out._next_batch(now)
                        taken = bytes(out._pending or b"").endswith(b"X")
                        due = out._urc_due(queued_at, final_first, now) < half
                        if taken != due:
                            wrong.append((gap, final_at, queued_at, final_first, taken))
        return wrong

    assert _run(main()) == []


def test_unsolicited_messages_above_high_backlog_the_output_too(pty_pair):
    """+IPD-sized unsolicited messages count towards the high-water mark as replies do (a flood of
    received data holds the next command), and all 100 kB of them arrive."""
    master, slave = pty_pair

    async def main():
        out = Output(master, 0.0, lambda: None, water=(65536, 16384))
        for _ in range(100):
            out.urc(b"x" * 1000)
        assert out.backlogged and out.buffered == 100_000
        got = sum(len(r) for _, r in await asyncio.to_thread(_read_until_size, slave, 100_000, 5.0))
        assert got == 100_000 and not out.backlogged

    _run(main())
