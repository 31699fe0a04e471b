"""The front's UART paths through the per-byte faults: hooked in while a kind is on, out once over.

Theory of operation
-------------------
`ByteFaults` (`bridged.faults.uart`) draws; this puts its draws into the
front's two byte paths: ``output.mangle`` (``uart_drop``, ``uart_corrupt``)
and ``rx_fault`` (``uart_overrun``).  A path is hooked only while one of its
kinds is configured or armed, so a daemon without them runs its byte paths
untouched, and unhooked again once an on-demand fault is over (its hits
drawn, an overrun's last run lost): output goes the plain way again, and
AT+CIPSEND's payload is read straight into its ring (`bridged.uart.direct`
reads only without an input hook).

Offsets (in the fault's log line and transcript mark) count the whole
stream from the first hook on, hooked or not: at unhooking the path's own
counter is noted (the front's ``rx_bytes``, the output's ``batched``, both
counting every byte that reached the hook's place), and at hooking again the
bytes since are added.
"""

from __future__ import annotations

from typing import Any

import structlog

from bridged.faults.uart import ByteFaults

__all__ = ["LineHooks"]

log = structlog.get_logger()


class LineHooks:
    """The front's byte paths and `ByteFaults`; `install` after a kind is configured or armed."""

    def __init__(self, faults: ByteFaults, front: Any) -> None:
        self.faults = faults
        self.front = front
        self._rx_unhooked: int | None = None  # the front's rx_bytes when the input hook was removed
        self._tx_unhooked: int | None = None  # the output's bytes batched when its hook was removed

    def install(self) -> None:
        """Hook each path one of whose kinds is enabled, if not hooked yet."""
        front, faults = self.front, self.faults
        if faults.wants_output() and front.output.mangle is None:
            if self._tx_unhooked is not None:  # offsets count on as if it had stayed: what went out meanwhile too
                faults.sent += front.output.batched - self._tx_unhooked
            front.output.mangle = self._outgoing
        if faults.wants_input() and front.rx_fault is None:
            if self._rx_unhooked is not None:  # ... and what was read meanwhile
                faults.received += front.counters.rx_bytes - self._rx_unhooked
            front.rx_fault = self._incoming

    def hooked(self) -> dict[str, bool]:
        """Which paths go through a fault hook now (``bridged status``: faults.uart_hooks)."""
        return {"input": self.front.rx_fault is not None, "output": self.front.output.mangle is not None}

    def _incoming(self, data: bytes) -> bytes:
        """The input hook: the overrun's draw; removed once an on-demand fault is over."""
        kept = self.faults.incoming(data)
        if self.faults.input_over():
            self.front.rx_fault = None
            self._rx_unhooked = self.front.counters.rx_bytes  # it counted this read already: offsets go on from here
            log.info("uart_input_fault_over", received=self.faults.received)
        return kept

    def _outgoing(self, data: bytes) -> bytes:
        """The output hook: drops and corruptions drawn; removed once on-demand ones are over."""
        mangled = self.faults.outgoing(data)
        if self.faults.output_over():
            output = self.front.output
            output.mangle = None
            self._tx_unhooked = output.batched  # it counted this batch already: offsets resume from here
            log.info("uart_output_fault_over", sent=self.faults.sent)
        return mangled
