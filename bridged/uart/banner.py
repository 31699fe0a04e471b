"""The ROM boot banner, as the host's UART receives it (sans I/O).

Theory of operation.  An ESP32 prints its ROM banner on UART0 at every
reset, at the ROM's own speed: 115200 baud with the 40 MHz crystal of an
ESP32-WROOM-32 (74880 is the ESP8266's, with its 26 MHz crystal).  ESP-AT's
command port is UART1 and never carries it (esp-at-behavior.md 1.5); a host
wired to UART0 does see it, and when its own UART runs at another speed it
does not see the text but what its receiver makes of the waveform.  This
module computes exactly that, so the noise is faithful and the same on
every boot:

* ``waveform``: the text as the ROM sends it, 8N1, frames back to back, the
  line idle (1) before and after;
* ``receive``: a UART receiver at the host's speed and framing.  It waits
  for a falling edge, checks the start bit half a bit later (high again: a
  glitch, it hunts on), samples each data bit (LSB first), the parity bit
  and the first stop bit in their middles.  Every frame is delivered, as
  Linux does in raw mode (INPCK off: no parity check, a framing error keeps
  its data).  After a stop bit that reads 0 the receiver takes that low for
  the next start bit, as a 16550 does; after a break (a whole frame low) it
  waits for the line to go high first.

Time is kept in integers: one sent bit lasts ``2 * host_baud`` units and one
received bit ``2 * sent_baud``, so every sampling instant is exact.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Framing", "Reset", "rom_banner", "waveform", "receive", "as_received"]


class Reset(enum.Enum):
    """Why the chip booted, as the ROM names it on its ``rst:`` line."""

    POWER_ON = b"0x1 (POWERON_RESET)"  # bridged's first start
    SOFTWARE = b"0xc (SW_CPU_RESET)"  # esp_restart(): AT+RST, AT+RESTORE, an update


def rom_banner(reset: Reset) -> bytes:
    """An ESP32's first-stage (ROM) boot messages, booting ESP-AT from flash."""
    return (
        b"ets Jun  8 2016 00:22:57\r\n\r\n"
        b"rst:" + reset.value + b",boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n"
        b"configsip: 0, SPIWP:0xee\r\n"
        b"clk_drv:0x00,q_drv:0x00,d_drv:0x00,cs0_drv:0x00,hd_drv:0x00,wp_drv:0x00\r\n"
        b"mode:DIO, clock div:2\r\n"
        b"load:0x3fff0030,len:7040\r\n"
        b"load:0x40078000,len:15588\r\n"
        b"ho 0 tail 12 room 4\r\n"
        b"load:0x40080400,len:3848\r\n"
        b"entry 0x4008064c\r\n"
    )


@dataclass(frozen=True, slots=True)
class Framing:
    """A receiver's settings; parity as ESP-AT numbers it (0 none, 1 odd, 2 even).
    Stop bits do not matter: a receiver checks only the first."""

    baud: int
    data_bits: int = 8
    parity: int = 0


def waveform(data: bytes) -> bytes:
    """The line levels (one byte 0 or 1 per bit) of ``data`` sent 8N1."""
    bits = bytearray()
    for byte in data:
        bits.append(0)  # start
        bits.extend((byte >> i) & 1 for i in range(8))
        bits.append(1)  # stop
    return bytes(bits)


class _Line:
    """The level of a waveform over time; idle (1) outside it."""

    def __init__(self, bits: bytes, bit_time: int) -> None:
        self.bits = bits
        self.bit_time = bit_time

    def level(self, t: int) -> int:
        i = t // self.bit_time
        return self.bits[i] if 0 <= i < len(self.bits) else 1

    def next_fall(self, t: int) -> int | None:
        """The first instant >= t at which the line goes from 1 to 0."""
        bits = self.bits
        for j in range(max(0, -(-t // self.bit_time)), len(bits)):
            if bits[j] == 0 and (j == 0 or bits[j - 1] == 1):
                return j * self.bit_time
        return None


def receive(bits: bytes, sent_baud: int, framing: Framing) -> bytes:
    """What a UART set to ``framing`` delivers for a waveform sent at ``sent_baud``."""
    line = _Line(bits, 2 * framing.baud)
    half = sent_baud  # half a received bit, in the same units
    slots = framing.data_bits + (1 if framing.parity else 0)  # bits between start and stop
    out = bytearray()
    start = line.next_fall(0)
    while start is not None:
        if line.level(start + half):  # the start bit is gone by its middle: a glitch
            start = line.next_fall(start + half)
            continue
        sample = [line.level(start + (2 * k + 1) * half) for k in range(1, slots + 2)]
        value = sum(bit << i for i, bit in enumerate(sample[: framing.data_bits]))
        out.append(value)
        stop_at = start + (2 * slots + 3) * half
        if not sample[-1] and any(sample):  # framing error: that low is the next start bit
            start = stop_at - half
        else:  # stop bit, or a break: the next falling edge (after a break, the line rises first)
            start = line.next_fall(stop_at)
    return bytes(out)


def as_received(data: bytes, sent_baud: int, framing: Framing) -> bytes:
    """``data`` sent 8N1 at ``sent_baud``, as a receiver set to ``framing`` delivers it."""
    return receive(waveform(data), sent_baud, framing)
