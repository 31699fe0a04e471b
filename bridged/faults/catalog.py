"""Every fault bridged can inject: its name, what it is drawn against, its keys.

Theory of operation
-------------------
A fault kind says *when* it is drawn (`Per`) and *what* it takes (`Param`s).
The one table below feeds everything else: the ``[faults]`` config section has
one key per kind, ``bridged fault --list`` prints it, ``bridged fault NAME
k=v`` checks its keys against it, and the code that injects a fault asks the
`bridged.faults.plan.FaultPlan` of its process by name.

Three shapes of fault, by `Per`:

- *occasions* (a command, a connection, a byte, a datagram, a lookup, a
  handshake, a join): each occasion inside an active window is hit with
  probability ``rate``;
- *events* (`Per.SECOND`): something happens at an instant (a reset, a Wi-Fi
  drop): at the start of each scheduled window, or as a random process of
  ``rate`` events per second;
- *conditions* (`Per.CONDITION`): a shaping that applies to everything while
  its window is active (latency, a bandwidth cap).

`Where` says which process draws it: the front (AT, Wi-Fi, UART, DNS) or the
link workers (connections, datagrams, TLS).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Area", "CATALOG", "FaultKind", "Param", "Per", "Where", "kind"]


class Area(str, enum.Enum):
    AT = "at"
    WIFI = "wifi"
    NET = "net"
    DNS = "dns"
    TLS = "tls"
    UART = "uart"


class Per(str, enum.Enum):
    COMMAND = "command"  # an AT command line the session is about to run
    JOIN = "join"  # an AT+CWJAP (or a reconnection attempt)
    CONNECTION = "connection"  # a link's connect
    BYTE = "byte"  # a byte on the path the fault names
    DATAGRAM = "datagram"  # a UDP datagram from the network
    LOOKUP = "lookup"  # a name resolution
    HANDSHAKE = "handshake"  # a TLS handshake
    SECOND = "second"  # an event in time
    CONDITION = "condition"  # a shaping, in force while active

    @property
    def is_occasion(self) -> bool:
        return self not in (Per.SECOND, Per.CONDITION)


class Where(str, enum.Enum):
    FRONT = "front"
    WORKER = "worker"


@dataclass(frozen=True, slots=True)
class Param:
    """One key of a fault beyond its rate and schedule."""

    name: str
    kind: type  # int or float
    lo: float
    hi: float
    default: float
    doc: str

    def check(self, value: object) -> int | float:
        """The value as stored; ValueError when it is not a number in range."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(self.name)
        if self.kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(self.name)
        if not self.lo <= value <= self.hi:  # NaN fails too
            raise ValueError(self.name)
        return int(value) if self.kind is int else float(value)

    def allowed(self) -> str:
        def show(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else str(v)

        return f"{show(self.lo)} to {show(self.hi)}"


@dataclass(frozen=True, slots=True)
class FaultKind:
    name: str
    area: Area
    per: Per
    where: Where
    doc: str
    params: tuple[Param, ...] = ()

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_MS = 600_000.0  # ten minutes: the longest delay any fault may add
_LINK = Param("link", int, -1, 4, -1, "the link it applies to; -1 for every link")

CATALOG: tuple[FaultKind, ...] = (
    FaultKind("at_busy", Area.AT, Per.COMMAND, Where.FRONT,
              "the command is not run: busy p... (as while another command runs)"),
    FaultKind("at_delay", Area.AT, Per.COMMAND, Where.FRONT,
              "the command's reply waits ms, plus or minus up to jitter_ms",
              (Param("ms", float, 0, _MS, 100, "the added delay"),
               Param("jitter_ms", float, 0, _MS, 0, "uniform spread around ms"))),
    FaultKind("at_errcode", Area.AT, Per.COMMAND, Where.FRONT,
              "the command fails: ERR CODE:0x<code> then ERROR",
              (Param("code", int, 0, 0xFFFFFFFF, 0x01090000, "the ERR CODE value"),)),
    FaultKind("at_reset", Area.AT, Per.SECOND, Where.FRONT,
              "a spontaneous reset: links closed, settings reloaded as after AT+RST, ready after the boot"),
    FaultKind("wifi_drop", Area.WIFI, Per.SECOND, Where.FRONT,
              "the station loses its AP: WIFI DISCONNECT, links CLOSED; back after duration_ms"
              " as AT+CWRECONNCFG says",
              (Param("duration_ms", float, 0, 3_600_000, 5000, "how long the AP is gone"),)),
    FaultKind("wifi_join_fail", Area.WIFI, Per.JOIN, Where.FRONT,
              "a join fails with +CWJAP:<code> (1 timeout, 2 wrong password, 3 no AP, 4 failed)",
              (Param("code", int, 1, 4, 1, "the +CWJAP error code"),)),
    FaultKind("net_connect_refused", Area.NET, Per.CONNECTION, Where.WORKER,
              "the connect is refused as by a RST", (_LINK,)),
    FaultKind("net_connect_timeout", Area.NET, Per.CONNECTION, Where.WORKER,
              "the connect gets no answer until the link's connect timeout", (_LINK,)),
    FaultKind("net_latency", Area.NET, Per.CONDITION, Where.WORKER,
              "data is delivered ms later each way (a round trip 2 x ms), plus or minus up to jitter_ms",
              (Param("ms", float, 0, _MS, 100, "the added delay"),
               Param("jitter_ms", float, 0, _MS, 0, "uniform spread around ms"), _LINK)),
    FaultKind("net_bandwidth", Area.NET, Per.CONDITION, Where.WORKER,
              "each link moves at most bytes_per_s each way",
              (Param("bytes_per_s", int, 1, 1_000_000_000, 10_000, "the cap, each way"), _LINK)),
    FaultKind("net_udp_loss", Area.NET, Per.DATAGRAM, Where.WORKER,
              "a datagram is lost", (_LINK,)),
    FaultKind("net_udp_reorder", Area.NET, Per.DATAGRAM, Where.WORKER,
              "a datagram is held back and delivered after the next `depth` ones",
              (Param("depth", int, 1, 64, 1, "how many datagrams overtake it"), _LINK)),
    FaultKind("net_tcp_reset", Area.NET, Per.BYTE, Where.WORKER,
              "the connection is reset in mid-stream (drawn per byte received)", (_LINK,)),
    FaultKind("dns_fail", Area.DNS, Per.LOOKUP, Where.FRONT,
              "a name does not resolve"),
    FaultKind("dns_slow", Area.DNS, Per.LOOKUP, Where.FRONT,
              "a lookup's answer comes ms later",
              (Param("ms", float, 0, _MS, 2000, "the added delay"),)),
    FaultKind("tls_fail", Area.TLS, Per.HANDSHAKE, Where.WORKER,
              "a TLS handshake fails", (_LINK,)),
    FaultKind("uart_drop", Area.UART, Per.BYTE, Where.FRONT,
              "a byte towards the MCU is lost on the line"),
    FaultKind("uart_corrupt", Area.UART, Per.BYTE, Where.FRONT,
              "a byte towards the MCU arrives with one bit flipped"),
    FaultKind("uart_overrun", Area.UART, Per.BYTE, Where.FRONT,
              "the receiver overruns: bytes from the MCU are lost, `bytes` in a row",
              (Param("bytes", int, 1, 4096, 16, "how many bytes one overrun loses"),)),
)

_BY_NAME = {k.name: k for k in CATALOG}


def kind(name: str) -> FaultKind:
    """The kind called `name`; KeyError listing the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown fault {name!r}; known: {', '.join(_BY_NAME)}") from None
