"""The faults a link worker injects: the `Where.WORKER` kinds of bridged.faults.

Theory of operation
-------------------
Each worker holds one `LinkFaults`: a `FaultPlan` scoped to its link
(``link<N>``: its own seeded streams, and only the faults whose ``link`` key
is -1 or N), plus the seeded streams net_latency's jitter draws from.  The
worker asks it at a few hook points, each cheap when nothing is configured:

* ``before_connect``: once per TCP or SSL connect (UDP has no handshake to
  fail): net_connect_refused fails it at once as ECONNREFUSED does,
  net_connect_timeout waits out the connect timeout (AT+CIPSTART's <timeout>,
  else ``[links] connect_timeout_ms``) and fails as a timeout does.  The MCU
  gets exactly what the real failure gives it: ERROR.
* ``handshake_fails``: once per TLS handshake, client (AT+CIPSTART "SSL") or
  server (an AT+CIPSERVER "SSL" client): the TCP connection is closed before
  the handshake, so the client answers ERROR and a server's client is never
  announced, as with a certificate the other side refuses.
* ``shapes``: at connect, whether the connection needs a
  `bridged.links.shaping.Shaper` (latency, bandwidth, UDP loss and reorder,
  TCP reset); without one the worker's zero-copy paths run untouched.
* ``demand``: a ``FireFault`` from the front (``bridged fault``).

Every injected fault goes to the worker's report callback (log line,
``FaultFired`` to the front) through `Batches`: a per-datagram kind may hit
every datagram of a flood, so its first hit is reported at once and the
following ones at most once a second, as one report carrying their number
(the front's per-byte kinds are logged the same way): neither the journal nor
the control socket the worker's replies share floods.

`Bucket` is net_bandwidth's token bucket, one each way in a ``Shaper``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from bridged.faults import Demand, FaultPlan, FaultSpec, Report, Where, kind, parse_demand
from bridged.faults.catalog import Per
from bridged.faults.spec import FaultError
from bridged.ipc.messages import Connect, FireFault
from bridged.links.tls import TlsError

__all__ = ["Batches", "Bucket", "DATAGRAM_KINDS", "LinkFaults", "STREAM_KINDS"]

#: The kinds that act on a connection's bytes (bridged.links.shaping), by link type.
STREAM_KINDS = ("net_latency", "net_bandwidth", "net_tcp_reset")
DATAGRAM_KINDS = ("net_latency", "net_bandwidth", "net_udp_loss", "net_udp_reorder")
_REPORT_EVERY = 1.0  # seconds between two reports of one per-datagram kind
_BURST = 0.02  # a bucket holds this many seconds' worth of bytes

#: (name, details of the last hit, hits since the last report)
Send = Callable[[str, dict[str, Any], int], None]


@dataclass(slots=True)
class _Batch:
    hits: int = 0
    last: float = -math.inf
    handle: asyncio.TimerHandle | None = None
    details: dict[str, Any] | None = None


class Batches:
    """Reports of injected faults, per-datagram kinds batched (see the module's docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Send) -> None:
        self.loop = loop
        self.send = send
        self._batches: dict[str, _Batch] = {}

    def fired(self, name: str, details: dict[str, Any]) -> None:
        if kind(name).per is not Per.DATAGRAM:
            self.send(name, details, 1)
            return
        batch = self._batches.setdefault(name, _Batch())
        batch.hits += 1
        batch.details = details
        if self.loop.time() - batch.last >= _REPORT_EVERY:
            self.flush(name)
        elif batch.handle is None:
            batch.handle = self.loop.call_at(batch.last + _REPORT_EVERY, self.flush, name)

    def flush(self, name: str) -> None:
        batch = self._batches[name]
        if batch.handle is not None:
            batch.handle.cancel()
            batch.handle = None
        if batch.hits:
            self.send(name, batch.details or {}, batch.hits)
        batch.hits, batch.last = 0, self.loop.time()

    def close(self) -> None:
        """Report what is gathered (the worker is stopping)."""
        for name in list(self._batches):
            self.flush(name)


class LinkFaults:
    """The faults of link `link_id`'s worker."""

    def __init__(self, specs: Iterable[FaultSpec], seed: int, link_id: int, start: float,
                 report: Report | None = None) -> None:
        scope = f"link{link_id}"
        self.plan = FaultPlan(specs, seed, where=Where.WORKER, scope=scope, start=start, link=link_id,
                              report=report)
        # Streams of their own: jitter draws move no fault's hit sequence, and
        # the uplink's (bridged.links.outbox) not the downlink's.
        self.jitter = random.Random(f"{seed}/net_latency/{scope}/jitter")
        self.jitter_up = random.Random(f"{seed}/net_latency/{scope}/jitter/up")

    def shapes(self, datagram: bool) -> bool:
        """A data-path kind of this link type is configured or armed: the connection needs a Shaper."""
        return any(self.plan.enabled(name) for name in (DATAGRAM_KINDS if datagram else STREAM_KINDS))

    async def before_connect(self, msg: Connect, default_timeout_ms: int, now: float) -> None:
        """Fail a TCP or SSL connect as a refusal or a timeout would, when one hits.

        Raises:
            ConnectionRefusedError: net_connect_refused hit.
            TimeoutError: net_connect_timeout hit (after the connect timeout).
        """
        plan = self.plan
        if plan.enabled("net_connect_refused") and plan.hit("net_connect_refused", now) is not None:
            plan.fired("net_connect_refused", host=msg.host, port=msg.port)
            raise ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
        if plan.enabled("net_connect_timeout") and plan.hit("net_connect_timeout", now) is not None:
            timeout_ms = msg.timeout_ms or default_timeout_ms
            plan.fired("net_connect_timeout", host=msg.host, port=msg.port, timeout_ms=timeout_ms)
            await asyncio.sleep(timeout_ms / 1000)
            raise TimeoutError

    def handshake_fails(self, now: float, side: str) -> TlsError | None:
        """The error to fail this TLS handshake with, when tls_fail hits."""
        plan = self.plan
        if not plan.enabled("tls_fail") or plan.hit("tls_fail", now) is None:
            return None
        plan.fired("tls_fail", side=side)
        return TlsError("handshake failed (fault tls_fail)")

    def demand(self, msg: FireFault, now: float) -> Demand | None:
        """Arm a fault fired on demand; None when it names another link.

        Raises:
            FaultError: a bad key or value, or not a link worker's kind.
            KeyError: an unknown fault.
        """
        given: dict[str, object] = {}
        for item in msg.params:
            key, sep, value = item.partition("=")
            if not sep or not key or key in ("count", "for"):
                raise FaultError(item, "not a key=value of the fault's own keys", "key=value")
            given[key] = value
        given["count"] = msg.count
        given["for"] = msg.for_ms / 1000
        demand = parse_demand(msg.name, given)
        if kind(demand.name).where is not Where.WORKER:
            raise FaultError("", f"{demand.name} is not a link worker's fault", "a net_* or tls_* fault")
        if not self.plan.wants(demand.params):
            return None
        self.plan.demand(demand, now)
        return demand


class Bucket:
    """A token bucket of `rate` bytes per second, empty at first."""

    def __init__(self, rate: int, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate * _BURST)
        self.step = max(1.0, self.burst / 2)  # wake up for this much, not for every byte
        self.tokens = 0.0
        self.stamp = now

    def allowance(self, now: float) -> int:
        """Bytes that may move now; 0 until at least `step` have gathered."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return int(self.tokens) if self.tokens >= self.step else 0

    def spend(self, n: int) -> None:
        self.tokens -= n

    def wait(self) -> float:
        """Seconds until `allowance` is no longer 0."""
        return max(0.001, (self.step - self.tokens) / self.rate)
