"""The ROM banner as a UART at another speed receives it (bridged.uart.banner)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridged.uart.banner import Framing, Reset, as_received, receive, rom_banner, waveform


def test_waveform_is_8n1_lsb_first():
    """Each byte is a start bit, eight data bits from the lowest, a stop bit."""
    assert waveform(b"\x01\x80") == bytes([0, 1, 0, 0, 0, 0, 0, 0, 0, 1,
                                           0, 0, 0, 0, 0, 0, 0, 0, 1, 1])


@given(st.binary(max_size=64), st.sampled_from([9600, 74880, 115200, 921600]))
def test_same_speed_and_framing_receives_the_text(data, baud):
    """A receiver at the sender's speed and framing gets every byte back."""
    assert as_received(data, baud, Framing(baud)) == data


@given(st.binary(max_size=64), st.integers(80, 5_000_000), st.integers(80, 5_000_000),
       st.integers(5, 8), st.integers(0, 2))
def test_any_speeds_give_whole_bytes_of_the_receivers_width(data, sent, host, width, parity):
    """Whatever the speeds, the receiver ends and delivers only values of its data width."""
    out = as_received(data, sent, Framing(host, width, parity))
    assert all(b < 1 << width for b in out)
    assert len(out) <= len(data) * 10 * host // sent + 1  # at most one byte per received frame time


def test_twice_as_fast_receiver_by_hand():
    """0x55 received at twice the speed: 0x66 with a framing error, whose low stop
    sample starts the next frame (0x33)."""
    assert as_received(b"\x55", 1, Framing(2)) == b"\x66\x33"


def test_a_frame_all_low_is_one_break():
    """0x00 at half the receiver's speed keeps the line low a whole frame: one NUL
    (a break), then the receiver waits for the line to rise instead of reading zeros."""
    assert as_received(b"\x00", 1, Framing(2)) == b"\x00"
    assert as_received(b"\x00\x00", 1, Framing(2)) == b"\x00\x00"


def test_a_start_bit_too_short_for_the_receiver_is_a_glitch():
    """0xFF at twice the receiver's speed: its start bit is over before the receiver
    samples it, so nothing is received."""
    assert as_received(b"\xff\xff", 2, Framing(1)) == b""


def test_a_glitch_does_not_stop_the_hunt():
    """After a false start the receiver still finds the next real frame."""
    pulse = bytes([1, 0, 1, 1, 1, 1, 1, 1])  # low for a quarter of a received bit
    frame = bytes(level for level in waveform(b"A") for _ in range(4))  # 'A' at the receiver's speed
    assert receive(pulse + frame, 4, Framing(1)) == b"A"
    assert receive(frame, 4, Framing(1)) == b"A"


def test_banner_at_74880_is_noise_at_115200():
    """An ESP8266-speed banner read at 115200 8N1: not the text, not even printable, and
    the same bytes every time."""
    banner = rom_banner(Reset.POWER_ON)
    noise = as_received(banner, 74880, Framing(115200))
    assert noise == as_received(banner, 74880, Framing(115200))
    assert b"ets" not in noise and b"ready" not in noise
    assert 0.5 * len(banner) < len(noise) < 1.6 * len(banner)
    assert sum(not (0x20 <= b < 0x7F or b in b"\r\n") for b in noise) > len(noise) // 4
    with pytest.raises(UnicodeDecodeError):
        noise.decode("ascii")


def test_banner_names_the_reset():
    """The ROM's rst: line says power-on for a first start and a software reset after esp_restart()."""
    assert rom_banner(Reset.POWER_ON).startswith(
        b"ets Jun  8 2016 00:22:57\r\n\r\nrst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n")
    assert b"\r\nrst:0xc (SW_CPU_RESET),boot:0x13" in rom_banner(Reset.SOFTWARE)
    assert rom_banner(Reset.SOFTWARE).endswith(b"\r\nentry 0x4008064c\r\n")


@pytest.mark.parametrize("parity", [1, 2])
def test_parity_is_not_checked(parity):
    """With a parity bit the receiver samples it but, INPCK off, delivers the data anyway."""
    out = as_received(b"AB", 9600, Framing(9600, 8, parity))
    assert out[:1] == b"A"
