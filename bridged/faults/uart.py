"""UART line faults: bytes towards the MCU lost or with a bit flipped, bytes from it overrun.

Theory of operation
-------------------
Per-byte kinds are drawn as *gaps* (`FaultPlan.gap`): the number of bytes
that pass before the next hit, so a clean stretch costs one comparison per
write or read, not one draw per byte.  ``_left[name]`` is how many bytes are
left until the next candidate (1: the very next byte); when a write or a read
reaches it, ``hit(rate_drawn=True)`` checks the fault's window (and consumes
an armed on-demand hit) and a new gap is drawn.  Positions count bytes of the
stream, not writes, so how the output happens to be batched changes nothing:
the same seed and the same bytes hit the same bytes.

- ``uart_corrupt``: the byte goes out with one bit flipped (which bit: a
  stream of its own, so the hit sequence is that of uart_drop's shape);
- ``uart_drop``: the byte is not written;
- ``uart_overrun``: from the hit on, ``bytes`` bytes from the MCU are lost
  (a run may reach into the next read), as a receiver FIFO overrun loses them.

`bridged.faults.line` hooks `outgoing` into the output path and `incoming`
into the input path only while one of their kinds is enabled: a daemon
without UART faults runs its byte paths untouched.  Each is taken out again
once over: the input's at `input_over` (an on-demand overrun drawn and its
run lost), the output's at `output_over` (an on-demand drop or corruption
drawn).
"""

from __future__ import annotations

import random
from typing import Callable

from bridged.faults.plan import FaultPlan

__all__ = ["ByteFaults", "OUTGOING", "INCOMING"]

OUTGOING = ("uart_corrupt", "uart_drop")
INCOMING = ("uart_overrun",)


class ByteFaults:
    def __init__(self, plan: FaultPlan, clock: Callable[[], float]) -> None:
        self.plan = plan
        self.clock = clock
        self._left: dict[str, int] = {}
        self._overrun_rest = 0  # bytes of the current overrun still to lose
        self._bits = random.Random(f"{plan.seed}/uart_corrupt/{plan.scope}/bit")
        self.sent = 0  # stream offsets, for the transcript marks
        self.received = 0

    def wants_output(self) -> bool:
        return any(self.plan.enabled(name) for name in OUTGOING)

    def wants_input(self) -> bool:
        return self.plan.enabled("uart_overrun")

    def input_over(self) -> bool:
        """Nothing more to lose: uart_overrun neither configured nor armed, no run going on."""
        return not self._overrun_rest and not self.plan.enabled("uart_overrun")

    def output_over(self) -> bool:
        """Nothing more to mangle: uart_drop and uart_corrupt neither configured nor armed."""
        return not self.wants_output()

    def rearm(self, name: str) -> None:
        """A fault armed on demand hits the next byte: forget the gap drawn before."""
        self._left[name] = self.plan.gap(name)

    # -- towards the MCU ----------------------------------------------------------------

    def outgoing(self, data: bytes) -> bytes:
        """``data`` as the MCU receives it; may return ``data`` itself."""
        n = len(data)
        now = self.clock()
        corrupt = self._positions("uart_corrupt", n, now) if self.plan.enabled("uart_corrupt") else ()
        drop = self._positions("uart_drop", n, now) if self.plan.enabled("uart_drop") else ()
        base, self.sent = self.sent, self.sent + n
        if not corrupt and not drop:
            return data
        buf = bytearray(data)
        for i in corrupt:
            was = buf[i]
            buf[i] ^= 1 << self._bits.randrange(8)
            self.plan.fired("uart_corrupt", offset=base + i, byte=f"0x{was:02x}", to=f"0x{buf[i]:02x}")
        for i in reversed(drop):
            self.plan.fired("uart_drop", offset=base + i, byte=f"0x{buf[i]:02x}")
            del buf[i]
        return bytes(buf)

    def _positions(self, name: str, n: int, now: float) -> list[int]:
        """The indexes in the next ``n`` bytes that ``name`` hits."""
        left = self._left.get(name)
        if left is None:
            left = self._left[name] = self.plan.gap(name)
        if left > n:
            self._left[name] = left - n
            return []
        out = []
        pos = left - 1
        while pos < n:
            if self.plan.hit(name, now, rate_drawn=True) is not None:
                out.append(pos)
            pos += self.plan.gap(name)
        self._left[name] = pos - n + 1
        return out

    # -- from the MCU -------------------------------------------------------------------

    def incoming(self, data: bytes) -> bytes:
        """What the receiver keeps of ``data`` (an overrun loses a run of bytes)."""
        name, n, pos = "uart_overrun", len(data), 0
        base, self.received = self.received, self.received + n
        kept: list[bytes] = []
        if name not in self._left:
            self._left[name] = self.plan.gap(name)
        while pos < n:
            if self._overrun_rest:
                k = min(self._overrun_rest, n - pos)
                self._overrun_rest -= k
                pos += k
                continue
            left = self._left[name]
            if pos + left > n:
                self._left[name] = left - (n - pos)
                kept.append(data[pos:])
                break
            hit_at = pos + left - 1
            kept.append(data[pos:hit_at])
            pos = hit_at
            self._left[name] = self.plan.gap(name)
            params = self.plan.hit(name, self.clock(), rate_drawn=True)
            if params is None:
                kept.append(data[pos:pos + 1])
                pos += 1
                continue
            self._overrun_rest = int(params["bytes"])
            self.plan.fired(name, offset=base + pos, bytes=self._overrun_rest)
        if len(kept) == 1 and len(kept[0]) == n:
            return data
        return b"".join(kept)
