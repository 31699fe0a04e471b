"""Output on a real pty under uvloop: ordering, the URC gap, no busy waiting."""

from __future__ import annotations

import asyncio
import os
import time
import tty

import uvloop

from bridged.uart.output import Output

GAP = 0.005


class CountingOutput(Output):
    """Counts how often the writer ran (a held message must not spin the loop)."""

    pumps = 0

    def _pump(self) -> None:
        self.pumps += 1
        super()._pump()


def _read_until(fd: int, wanted: bytes, timeout: float) -> list[tuple[float, bytes]]:
    """(time, bytes) of each read from the host's side until ``wanted`` has arrived."""
    import select
    import time

    reads: list[tuple[float, bytes]] = []
    got = b""
    deadline = time.monotonic() + timeout
    while wanted not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"only {got!r} arrived"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            reads.append((time.monotonic(), chunk))
            got += chunk
    return reads


def _run(coro):
    return uvloop.run(coro)


async def _until(predicate, timeout: float = 2.0) -> None:
    """Until ``predicate()`` holds (a callback the loop runs soon), ``timeout`` at most."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


def test_held_message_waits_the_gap_with_one_timer_not_a_spin(pty_pair):
    master, slave = pty_pair
    rounds = 20

    async def main():
        out = CountingOutput(master, GAP, lambda: None)
        for i in range(rounds):
            out.reply(b"\r\nSEND OK\r\n")
            out.urc(b"\r\n+IPD,0,1:%d" % (i % 10))
            await asyncio.to_thread(_read_until, slave, b"+IPD,0,1:%d" % (i % 10), 2.0)
            await asyncio.sleep(0.0013 * (i % 3))  # start the next round at another clock phase
        return out.pumps

    pumps = _run(main())
    # Per round one pump writes SEND OK and a timer (a tick more at most)
    # writes +IPD. A timer shorter than uvloop's 1 ms tick fires at once,
    # so a hold that ended "almost" would spin the loop until the tick.
    assert pumps <= 4 * rounds, f"the writer ran {pumps} times for {rounds} held messages"


def test_held_message_goes_after_the_gap_not_in_the_same_read(pty_pair):
    master, slave = pty_pair
    # A gap far above scheduling delays: under load the reader may wake late,
    # and with a 5 ms gap it then found OK and CLOSED in one read.
    gap = 0.05

    async def main():
        out = Output(master, gap, lambda: None)
        t0 = time.monotonic()
        out.reply(b"\r\nOK\r\n")
        out.urc(b"\r\nCLOSED\r\n")
        reads = await asyncio.to_thread(_read_until, slave, b"CLOSED\r\n", 2.0)
        return t0, reads

    t0, reads = _run(main())
    first, last = reads[0], reads[-1]
    assert first[1] == b"\r\nOK\r\n"
    # Arrival can only be later than the write: a lower bound that load cannot break.
    assert last[1].endswith(b"\r\nCLOSED\r\n") and last[0] - t0 >= gap - 0.002


def test_replies_overtake_a_held_message_which_keeps_its_order(pty_pair):
    master, slave = pty_pair

    async def main():
        # A gap no scheduling delay reaches: with 5 ms, a loaded machine let the
        # gap run out before the OK was queued, and +IPD rightly went first.
        out = Output(master, 0.5, lambda: None)
        out.reply(b"\r\nSEND OK\r\n")
        out.urc(b"\r\n+IPD,0,1:a")
        out.urc(b"\r\n0,CLOSED\r\n")
        await asyncio.sleep(0)
        out.reply(b"\r\nOK\r\n")  # the next command's answer does not wait for +IPD
        return await asyncio.to_thread(_read_until, slave, b"0,CLOSED\r\n", 2.0)

    got = b"".join(r for _, r in _run(main()))
    assert got == b"\r\nSEND OK\r\n\r\nOK\r\n\r\n+IPD,0,1:a\r\n0,CLOSED\r\n"


def test_messages_queued_behind_a_held_one_go_in_its_write(pty_pair):
    """A message held for the gap takes the ones queued behind it along in its write, though
    a later final result would hold those longer on their own: one write, not one each."""
    master, slave = pty_pair
    gap = 0.2

    async def main():
        out = WriteCountingOutput(master, gap, lambda: None)
        t0 = time.monotonic()
        out.reply(b"\r\nSEND OK\r\n")
        out.urc(b"\r\n+IPD,0,1:a")  # held: due by its own wait, gap after t0
        await asyncio.sleep(gap / 4)
        out.reply(b"\r\nOK\r\n")  # a later final (goes at once): +IPD b alone would wait gap after it
        await asyncio.sleep(0.01)
        out.urc(b"\r\n+IPD,1,1:b")
        reads = await asyncio.to_thread(_read_until, slave, b"+IPD,1,1:b", 2.0)
        return t0, reads, out.writes

    t0, reads, writes = _run(main())
    assert b"".join(r for _, r in reads) == b"\r\nSEND OK\r\n\r\nOK\r\n\r\n+IPD,0,1:a\r\n+IPD,1,1:b"
    assert reads[-1][0] - t0 >= gap - 0.002  # the held one still kept its gap
    assert writes == 3, f"{writes} writes: the message behind the held one went on its own"


def test_drained_callback_after_every_write(pty_pair):
    master, slave = pty_pair

    async def main():
        calls = []
        out = Output(master, 0.0, lambda: calls.append(out.buffered))
        out.urc(b"\r\n+IPD,0,3:abc")
        await asyncio.to_thread(_read_until, slave, b"abc", 2.0)
        await _until(lambda: calls and calls[-1] == 0)
        return calls

    calls = _run(main())
    assert calls and calls[-1] == 0


class WriteCountingOutput(Output):
    """Counts the writes that carried bytes (each one wakes the host's reader)."""

    writes = 0

    def _next_batch(self, now: float) -> bool:
        batch = super()._next_batch(now)
        self.writes += batch
        return batch


def test_a_lingering_reply_shares_the_write_of_the_next(pty_pair):
    master, slave = pty_pair

    async def main():
        out = WriteCountingOutput(master, GAP, lambda: None)
        out.reply(b"\r\nRecv 4 bytes\r\n", linger=0.5)
        await asyncio.sleep(0.02)  # the worker hands the bytes to its socket
        out.reply(b"\r\nSEND OK\r\n")
        reads = await asyncio.to_thread(_read_until, slave, b"SEND OK\r\n", 2.0)
        return out.writes, reads

    writes, reads = _run(main())
    assert writes == 1
    assert b"".join(r for _, r in reads) == b"\r\nRecv 4 bytes\r\n\r\nSEND OK\r\n"


def test_a_lingering_reply_alone_goes_out_when_its_time_is_up(pty_pair):
    master, slave = pty_pair

    async def main():
        out = Output(master, GAP, lambda: None)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out.reply(b"\r\nRecv 4 bytes\r\n", linger=0.05)
        reads = await asyncio.to_thread(_read_until, slave, b"bytes\r\n", 2.0)
        return reads[0][0] - t0, out.buffered

    waited, buffered = _run(main())
    assert 0.04 <= waited < 1.0
    assert buffered == 0


def test_anything_queued_after_a_lingering_reply_takes_it_along_in_order(pty_pair):
    master, slave = pty_pair

    async def main():
        out = Output(master, 0.0, lambda: None)
        out.reply(b"\r\nRecv 4 bytes\r\n", linger=5.0)
        out.urc(b"\r\n+IPD,1,2:hi")
        return await asyncio.to_thread(_read_until, slave, b":hi", 2.0)

    assert b"".join(r for _, r in _run(main())) == b"\r\nRecv 4 bytes\r\n\r\n+IPD,1,2:hi"


def test_a_message_made_at_write_time_says_what_holds_then(pty_pair):
    """A function queued as a message runs when the held message is written,
    after the reply that overtook it, so it can count that reply in."""
    master, slave = pty_pair

    async def main():
        out = Output(master, 0.5, lambda: None)
        unread = [100]
        made_after: list[int] = []

        def notice() -> bytes:
            made_after.append(out.written)
            return b"\r\n+IPD,0,%d\r\n" % unread[0]

        out.reply(b"\r\nOK\r\n")
        out.urc(notice)  # held for the gap after OK
        await asyncio.sleep(0.01)  # a read comes while it is held (the gap is 0.5 s)
        unread[0] = 60  # a read took 40 bytes; its reply overtakes the notice
        reply = b"+CIPRECVDATA:40," + b"x" * 40 + b"\r\nOK\r\n"
        out.reply(reply)
        reads = await asyncio.to_thread(_read_until, slave, b"+IPD,0,60\r\n", 2.0)
        return b"".join(r for _, r in reads), made_after, len(reply)

    got, made_after, reply_len = _run(main())
    assert got == b"\r\nOK\r\n" + b"+CIPRECVDATA:40," + b"x" * 40 + b"\r\nOK\r\n" + b"\r\n+IPD,0,60\r\n"
    assert made_after == [6 + reply_len]  # made once, after both replies were written


def test_a_message_with_nothing_left_to_say_is_dropped(pty_pair):
    """A function returning b"" writes nothing; the output still drains and
    what follows it goes out."""
    master, slave = pty_pair

    async def main():
        drained = []
        out = Output(master, 0.02, lambda: drained.append(out.buffered))
        out.reply(b"\r\nOK\r\n")
        out.urc(lambda: b"")
        out.urc(b"\r\n0,CLOSED\r\n")
        reads = await asyncio.to_thread(_read_until, slave, b"CLOSED\r\n", 2.0)
        empty = asyncio.get_running_loop().create_future()
        out.when_empty(lambda: empty.set_result(True))
        await asyncio.wait_for(empty, 2.0)
        return b"".join(r for _, r in reads), drained, out.buffered

    got, drained, buffered = _run(main())
    assert got == b"\r\nOK\r\n\r\n0,CLOSED\r\n"
    assert buffered == 0 and drained and drained[-1] == 0


def test_a_message_function_that_fails_costs_only_its_message(pty_pair):
    """A function that raises or makes no bytes is logged and dropped; the
    replies and messages around it go out and the output still drains."""
    from structlog.testing import capture_logs

    master, slave = pty_pair

    def broken() -> bytes:
        raise ValueError("a bug in a notice")

    async def main():
        loop = asyncio.get_running_loop()
        handled = []
        loop.set_exception_handler(lambda loop, context: handled.append(context))
        out = Output(master, 0.0, lambda: None)
        out.reply(b"\r\nOK\r\n")
        out.urc(broken)
        out.urc(lambda: None)
        out.urc(lambda: "text")
        out.urc(b"\r\n0,CLOSED\r\n")
        out.reply(b"\r\nERROR\r\n")
        reads = await asyncio.to_thread(_read_until, slave, b"ERROR\r\n", 2.0)
        empty = loop.create_future()
        out.when_empty(lambda: empty.set_result(True))
        await asyncio.wait_for(empty, 2.0)
        return b"".join(r for _, r in reads), out.buffered, handled

    with capture_logs() as logs:
        got, buffered, handled = _run(main())
    assert got == b"\r\nOK\r\n\r\n0,CLOSED\r\n\r\nERROR\r\n"
    assert (buffered, handled) == (0, [])
    assert [e["event"] for e in logs] == ["urc_failed"] * 3


def test_discard_drops_what_the_host_did_not_take(pty_pair):
    """discard() drops the queue a host that does not read has left (a restart): the
    bytes are counted, when_empty waiters are called, what is queued next goes out."""
    master, slave = pty_pair
    queued = 64 * 4096  # more than a pty holds

    async def main():
        out = Output(master, 0.0, lambda: None)
        emptied = []
        for _ in range(64):
            out.urc(b"x" * 4096)
        out.when_empty(lambda: emptied.append(out.buffered))
        await asyncio.sleep(0.05)  # the pty fills; nothing more drains
        assert out.buffered > 0 and not emptied
        dropped = out.discard()
        await _until(lambda: emptied)
        out.reply(b"\r\nready\r\n")
        reads = await asyncio.to_thread(_read_until, slave, b"\r\nready\r\n", 5.0)
        return dropped, emptied, b"".join(chunk for _, chunk in reads)

    dropped, emptied, received = _run(main())
    assert emptied == [0]
    assert received.endswith(b"x\r\nready\r\n") and received.count(b"ready") == 1
    assert dropped > 0 and dropped + len(received) == queued + len(b"\r\nready\r\n")


def test_backlogged_above_high_until_down_to_low_then_eased_once(pty_pair):
    """Above the high-water mark the output is backlogged; on_eased comes once, after it is down to the low one."""
    master, slave = pty_pair

    async def main():
        eased: list[int] = []
        out = Output(master, 0.0, lambda: None, water=(65536, 16384), on_eased=lambda: eased.append(out.buffered))
        for _ in range(100):
            out.reply(b"x" * 1000)  # 100 kB: more than the pty takes
        assert out.backlogged
        await asyncio.sleep(0.05)  # the pty fills; nothing more drains
        assert out.backlogged and eased == [] and out.buffered > 16384  # nobody reads
        got = 0
        while got < 100_000:
            got += len(await asyncio.to_thread(os.read, slave, 1000))
            if not out.backlogged:
                break
        await _until(lambda: eased)
        assert not out.backlogged and len(eased) == 1 and eased[0] <= 16384
        total = got + sum(len(r) for _, r in await asyncio.to_thread(_read_until_size, slave, 100_000 - got, 5.0))
        assert total == 100_000 and len(eased) == 1

    _run(main())


def _read_until_size(fd: int, size: int, timeout: float) -> list[tuple[float, bytes]]:
    import select

    reads: list[tuple[float, bytes]] = []
    deadline = time.monotonic() + timeout
    while size > 0:
        assert select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0], f"{size} bytes missing"
        chunk = os.read(fd, 65536)
        reads.append((time.monotonic(), chunk))
        size -= len(chunk)
    return reads


def test_a_failed_write_keeps_the_queue_for_the_reopened_port():
    """A write failing with EIO (the device hung up) suspends the output and
    tells the owner once; what the port had not taken, and what is queued
    meanwhile, is written in order to the port given to resume."""
    import errno

    old_master, old_slave = os.openpty()
    new_master, new_slave = os.openpty()
    for fd in (old_slave, new_slave):
        tty.setraw(fd)
        os.set_blocking(fd, False)

    async def main():
        failures: list[OSError] = []
        out = Output(old_slave, 0.0, lambda: None, on_failed=failures.append)
        os.close(old_master)  # unplugged: the slave hangs up
        out.reply(b"\r\nOK\r\n")
        out.urc(b"\r\n+IPD,0,3:abc")
        await _until(lambda: failures)
        assert [f.errno for f in failures] == [errno.EIO] and out.suspended
        out.urc(b"\r\n0,CLOSED\r\n")  # while away: queued, no write, no second failure
        await asyncio.sleep(0.05)  # a second failure would come within this
        assert len(failures) == 1 and out.buffered == 6 + 14 + 12
        out.resume(new_slave)
        return await asyncio.to_thread(_read_until, new_master, b"CLOSED\r\n", 2.0)

    try:
        got = b"".join(r for _, r in _run(main()))
    finally:
        for fd in (old_slave, new_master, new_slave):
            os.close(fd)
    assert got == b"\r\nOK\r\n\r\n+IPD,0,3:abc\r\n0,CLOSED\r\n"
