"""``[links] allow / deny`` where it is enforced: check, log and count refusals.

The decision is ``bridged.net.policy``'s; this adds what a link worker and
the front's AT+CIPSERVER listener need around it.  Each refusal is counted
(``refused``, the running count in each log line) and logged as
``link_refused``, a warning (so ``bridged status`` counts it among the
process's warnings and shows the latest), with the address, port, deciding
rule and what was refused:

* ``connect``: an address AT+CIPSTART's host resolved to (each one tried),
  a passthrough reconnect's, AT+SAVETRANSLINK's; every one is logged.
* ``send`` / ``receive`` / ``accept``: a datagram to or from a refused
  address, a server client from one.  A flood must not flood the log: in each ``_LOG_EVERY`` seconds, one line
  per address and direction, carrying the running count, for at most
  ``_REMEMBERED`` addresses (a flood from many forged senders is counted,
  not logged line by line).
  Verdicts are remembered for ``_VERDICT_TTL`` (a second; "self" may
  change), so a stream of datagrams costs a dictionary lookup each; at
  most ``_REMEMBERED`` of them, all forgotten when full.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from bridged.net.policy import Policy, Refusal

__all__ = ["Fence"]

log = structlog.get_logger()

_VERDICT_TTL = 1.0
_LOG_EVERY = 10.0
_REMEMBERED = 64  # verdicts kept, addresses logged per window


class Fence:
    """One process's checks against a Policy, with its refusal count and log limits."""

    def __init__(self, policy: Policy, clock: Callable[[], float]) -> None:
        self.policy = policy
        self.clock = clock
        self.refused = 0  # over the process's life
        self._verdicts: dict[tuple[str, int], tuple[Refusal | None, float]] = {}
        self._logged: set[tuple[str, str]] = set()  # logged in the window that began at _window
        self._window = float("-inf")

    @property
    def open(self) -> bool:
        """True when nothing can be refused (no deny entry): skip every check."""
        return self.policy.open

    def check(self, address: str, port: int) -> Refusal | None:
        """A connect's address: None to go ahead, else the refusal (logged and counted)."""
        refusal = self.policy.check(address, port)
        if refusal is not None:
            self.note(refusal, "connect")
        return refusal

    def admit(self, peer: tuple, what: str) -> bool:
        """Whether a datagram may go to (``what`` "send") or come from ("receive")
        ``peer``, or a server client from there connect ("accept")."""
        key = (peer[0], peer[1])
        now = self.clock()
        known = self._verdicts.get(key)
        if known is not None and known[1] > now:
            refusal = known[0]
        else:
            refusal = self.policy.check(peer[0], peer[1])
            if len(self._verdicts) >= _REMEMBERED:
                self._verdicts.clear()
            self._verdicts[key] = (refusal, now + _VERDICT_TTL)
        if refusal is None:
            return True
        self.note(refusal, what, limited=True)
        return False

    def note(self, refusal: Refusal, what: str, limited: bool = False) -> None:
        """Count a refusal and log it (``limited``: once per address in each _LOG_EVERY s window)."""
        self.refused += 1
        if limited:
            now = self.clock()
            if now - self._window >= _LOG_EVERY:
                self._window, self._logged = now, set()
            key = (refusal.address, what)
            if key in self._logged or len(self._logged) >= _REMEMBERED:
                return
            self._logged.add(key)
        log.warning("link_refused", what=what, address=refusal.address, port=refusal.port, rule=refusal.rule,
                    refused=self.refused)
