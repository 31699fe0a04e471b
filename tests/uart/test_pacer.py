"""The UART pacer (sans I/O): rate, framing, speed changes, no drift; a fake clock, no sleeps."""

from __future__ import annotations

import random

import pytest

from bridged.uart.pacer import CATCH_UP, LEAD, Pacer, char_bits2

T0 = 81234.567  # a monotonic clock's value: large, as on a machine that has been up for a day


def _drain(pacer: Pacer, total: int, now: float, late=lambda: 0.0, limit: int = 10_000_000):
    """Send ``total`` bytes as the writer does: what may go, then sleep to the deadline.

    Returns:
        (the time the last slice went, number of slices).
    """
    left, slices, woken = total, 0, False
    while left:
        n = min(pacer.allowance(now), left)
        if n:
            left -= n
            pacer.charge(n, now, CATCH_UP if left else 0.0)
            slices += 1
            assert slices < limit
        else:
            assert not woken, "woken at the deadline with nothing allowed: the writer would spin"
        woken = False
        if left:
            now, woken = max(now, pacer.deadline(left)) + late(), True
    return now, slices


@pytest.mark.parametrize("data_bits, stop_bits, parity, bits", [
    (8, 1, 0, 10), (8, 1, 2, 11), (8, 3, 0, 11), (8, 3, 1, 12), (7, 1, 2, 10), (5, 1, 0, 7), (8, 2, 0, 10.5),
])
def test_framing_bits(data_bits, stop_bits, parity, bits):
    """A character is a start bit, the data bits, a parity bit if any and the stop bits."""
    assert char_bits2(data_bits, stop_bits, parity) == 2 * bits


@pytest.mark.parametrize("baud", [80, 9600, 115200, 921600, 3_000_000, 5_000_000])
@pytest.mark.parametrize("framing", [(8, 1, 0), (8, 1, 2), (8, 3, 0)])
def test_rate_is_the_line_rate(baud, framing):
    """N bytes take N * bits / baud seconds (within one lead), at every speed and framing."""
    bits2 = char_bits2(*framing)
    total = max(20, baud // 20)  # about half a second of line time
    pacer = Pacer(baud, bits2, T0)
    end, _ = _drain(pacer, total, T0)
    expected = total * bits2 / 2 / baud
    assert expected - pacer.lead - 1e-9 <= end - T0 <= expected


def test_slices_follow_the_lead():
    """At 3 Mbaud a slice is about half a lead of bytes, not one byte a wake-up."""
    pacer = Pacer(3_000_000, char_bits2(8, 1, 0), T0)
    _, slices = _drain(pacer, 300_000, T0)  # one second of line time
    assert 1 / LEAD <= slices <= 2.2 / LEAD  # about 250..550 wake-ups, not 300 000


def test_no_drift_over_many_slices():
    """A million slices with timers firing late (within the catch-up) end exactly on time."""
    rng = random.Random(13)
    pacer = Pacer(921600, char_bits2(8, 1, 0), T0)
    total = 92_160 * 60  # a minute of line time
    end, slices = _drain(pacer, total, T0, late=lambda: rng.uniform(0, 0.003))
    assert slices > 10_000
    expected = total * 10 / 921600
    assert expected - LEAD - 0.004 <= end - T0 <= expected
    assert pacer.charged == total


def test_late_timers_are_made_up_while_backlogged():
    """A writer woken 10 ms late each time still gets the line rate (credit up to CATCH_UP)."""
    assert CATCH_UP > 0.012
    pacer = Pacer(115200, char_bits2(8, 1, 0), T0)
    end, _ = _drain(pacer, 11520, T0, late=lambda: 0.010)  # one second of line time
    assert 1.0 - 0.02 <= end - T0 <= 1.0 + 0.011


def test_idle_line_keeps_no_credit():
    """After a second of silence at most one lead of bytes goes at once, and the rest at line rate."""
    pacer = Pacer(9600, char_bits2(8, 1, 0), T0)
    pacer.charge(4, T0)
    now = T0 + 1.0
    burst = pacer.allowance(now)
    assert burst == int(LEAD * 960)  # 3 bytes at 960 bytes a second
    end, _ = _drain(pacer, 96, now)
    assert end - now >= 96 / 960 - LEAD - 1e-9


def test_stale_backlog_gives_no_burst_after_silence():
    """A line charged with bytes 'still waiting' that then fell silent gives no catch-up burst."""
    pacer = Pacer(9600, char_bits2(8, 1, 0), T0)
    pacer.charge(3, T0, CATCH_UP)
    assert pacer.allowance(T0 + 1.0) == int(LEAD * 960)


def test_held_line_keeps_no_credit():
    """Time the line is held by flow control (hold_off) is idle time: no burst when it is released."""
    pacer = Pacer(9600, char_bits2(8, 1, 0), T0)
    pacer.charge(pacer.allowance(T0), T0, CATCH_UP)
    assert pacer.allowance(T0 + 0.1) > 90  # a late wake-up with bytes waiting: 0.1 s made up
    pacer.hold_off()
    assert pacer.allowance(T0 + 0.1) == int(LEAD * 960)


def test_rate_change_mid_stream():
    """Bytes charged before AT+UART_CUR keep the old rate, bytes after it take the new one."""
    pacer = Pacer(9600, char_bits2(8, 1, 0), T0)
    now, _ = _drain(pacer, 96, T0)  # 0.1 s at 9600
    line = pacer.deadline(1) + LEAD - 10 / 9600  # when the line is free
    assert line == pytest.approx(T0 + 0.1)
    pacer.set_line(115200, char_bits2(8, 1, 2), now)  # 8E1: 11 bits
    end, _ = _drain(pacer, 11520, now)
    assert end - T0 == pytest.approx(0.1 + 11520 * 11 / 115200, abs=LEAD + 1e-6)


def test_one_character_always_fits():
    """At 80 baud a character takes longer than the lead: it still may go, one at a time."""
    pacer = Pacer(80, char_bits2(8, 1, 0), T0)
    assert pacer.allowance(T0) == 1
    pacer.charge(1, T0, CATCH_UP)
    assert pacer.allowance(T0) == 0
    assert pacer.deadline(5) == pytest.approx(T0 + 0.125)


def test_deadline_allows_a_slice():
    """At the deadline the writer finds at least the slice it waited for: no wake-up for nothing."""
    for baud in (9600, 115200, 921600, 3_000_000):
        pacer = Pacer(baud, char_bits2(8, 1, 0), T0)
        pacer.charge(pacer.allowance(T0), T0, CATCH_UP)
        assert pacer.allowance(T0) == 0
        deadline = pacer.deadline(10**6)
        assert deadline > T0
        assert pacer.allowance(deadline) >= max(1, int(LEAD / 2 * baud / 10))


def test_bad_line_is_refused():
    """A zero speed is a programming error, said at once."""
    with pytest.raises(ValueError):
        Pacer(0, 20, T0)
