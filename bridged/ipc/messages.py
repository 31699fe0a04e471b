"""The control messages between processes.

front -> worker (the link's control socket): ``Connect``, ``Adopt`` (with the
fd of a client the front's AT+CIPSERVER listener accepted), ``Close``,
``SetOptions`` (AT+CIPTCPOPT / keep_alive),
``SetRecvWindow`` (passive receive mode: keep at most that many bytes unread),
``Refused`` (a datagram remote the front refused by [links] allow/deny before
AT+CIPSEND's prompt: the worker logs and counts it with its own refusals).
worker -> front: ``Hello`` (ready for work), ``Connected``, ``ConnectFailed``,
``Ended`` (the socket is gone; sends can no longer succeed), ``RemoteChanged``
(a UDP link's remote moved, AT+CIPSTART <mode> 1 or 2).
supervisor -> front (the supervisor channel): ``WorkerStarted`` (with the
front end of the new worker's control socket), ``Shutdown``.
front -> supervisor: ``FrontReady`` (once per front process, at its first
``ready``: the supervisor's READY=1 and its count of failures before ready;
an AT+RST's boot tells it nothing), ``PortFailed`` (the serial
port cannot be opened: the one line saying why; the front then exits with
``bridged.uart.main.PORT_FAILED`` and the supervisor ends the daemon, exit 1),
``WorkerRefused`` (the front refused that worker's downlink ring: the
supervisor kills it, if it is that link's live worker, so that one ignoring its
control socket's EOF does not hold the link for good; ``Children.kill_refused``).
supervisor -> front and each worker (the front's supervisor channel, each
worker's heartbeat channel): ``Ping``; the child answers ``Pong`` from its
event loop (``bridged.liveness``).
front -> worker: ``StatsRequest``; worker -> front: ``LinkStats`` (for
``bridged status``, ``bridged.ops``).
front -> worker: ``FireFault`` (``bridged fault`` for a worker's kind);
worker -> front: ``FaultFired`` (an injected fault, for the front's counts and
the AT transcript; ``bridged.faults``).

A connection's end is not a control message: the worker puts an EOF record
in the downlink ring behind the last data, so the front reports ``CLOSED``
only after every byte received before it (``bridged.ipc.records``).  Every
message about a connection carries ``conn_id``, the front's number for that
connection, so nothing about an old connection is taken for a new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bridged.ipc.control import message

__all__ = [
    "Connect",
    "Adopt",
    "Close",
    "SetRecvWindow",
    "SetOptions",
    "Refused",
    "Ended",
    "RemoteChanged",
    "Hello",
    "Connected",
    "ConnectFailed",
    "WorkerStarted",
    "Shutdown",
    "FrontReady",
    "Ping",
    "Pong",
    "StatsRequest",
    "LinkStats",
    "PortFailed",
    "WorkerRefused",
    "FireFault",
    "FaultFired",
]


@message
@dataclass(frozen=True)
class Connect:
    conn_id: int
    link_type: str
    host: str
    port: int
    local_ip: str = ""
    timeout_ms: int = 0
    local_port: int = 0
    udp_mode: int = 0
    # SSL links (AT+CIPSSLCCONF, CIPSSLCCN, CIPSSLCSNI, CIPSSLCALPN, CIPSSLCPSK)
    tls_auth: int = 0
    tls_pki: int = 0
    tls_ca: int = 0
    tls_cn: str = ""
    tls_sni: str = ""
    tls_alpn: tuple[str, ...] = ()
    tls_psk: str = field(default="", repr=False)  # hex; a key: never in a logged repr
    tls_psk_hint: str = ""
    # The worker resolves a host name through these (AT+CIPDNS manual), else the host's resolver.
    dns_servers: tuple[str, ...] = ()
    # Auth modes 2/3 check certificate dates at this Unix time (the device's
    # SNTP clock), else OpenSSL checks them against the host's clock.
    tls_time: int | None = None


@message
@dataclass(frozen=True)
class Adopt:
    conn_id: int
    link_type: str
    ca_enable: int = 0  # an SSL server verifies its clients against server_ca.0


@message
@dataclass(frozen=True)
class Close:
    conn_id: int
    flush: bool = True  # hand the socket what the uplink ring holds first (not for a restart)


@message
@dataclass(frozen=True)
class SetRecvWindow:
    window: int  # 0: active mode, no limit beyond the ring


@message
@dataclass(frozen=True)
class SetOptions:
    """AT+CIPTCPOPT's socket options, for the current and the next TCP sockets."""

    linger: int = -1  # -1 off, else seconds (0: reset on close)
    nodelay: int = 0
    keep_alive: int = 0  # seconds; 0 off


@message
@dataclass(frozen=True)
class Refused:
    conn_id: int
    address: str
    port: int
    rule: str


@message
@dataclass(frozen=True)
class Ended:
    conn_id: int
    reason: str


@message
@dataclass(frozen=True)
class RemoteChanged:
    conn_id: int
    remote_ip: str
    remote_port: int


@message
@dataclass(frozen=True)
class Hello:
    link_id: int
    pid: int


@message
@dataclass(frozen=True)
class Connected:
    conn_id: int
    remote_ip: str
    remote_port: int
    local_ip: str
    local_port: int


@message
@dataclass(frozen=True)
class ConnectFailed:
    conn_id: int
    reason: str


@message
@dataclass(frozen=True)
class WorkerStarted:
    link_id: int
    pid: int


@message
@dataclass(frozen=True)
class Shutdown:
    reason: str = ""


@message
@dataclass(frozen=True)
class FrontReady:
    port: str


@message
@dataclass(frozen=True)
class Ping:
    """Are you there?  To the front it also carries what only the supervisor knows."""

    seq: int
    uptime_ms: int = 0  # since the supervisor started
    restarts: tuple[int, ...] = ()  # the front's, then each link worker's
    events: tuple[str, ...] = ()  # the supervisor's recent warnings (JSON), when they changed


@message
@dataclass(frozen=True)
class Pong:
    seq: int
    summary: str = ""  # the front's one-line status (systemd's STATUS=)


@message
@dataclass(frozen=True)
class StatsRequest:
    seq: int


@message
@dataclass(frozen=True)
class LinkStats:
    """A worker's counters: its connection's bytes, the warnings it logged."""

    seq: int
    pid: int
    conn_id: int  # -1: no connection
    bytes_up: int
    bytes_down: int
    errors: int  # warning and error events since the worker started
    events: tuple[str, ...] = ()  # the last of them (JSON)


@message
@dataclass(frozen=True)
class PortFailed:
    reason: str


@message
@dataclass(frozen=True)
class WorkerRefused:
    link_id: int
    pid: int  # as the supervisor's WorkerStarted announced it (a worker's Hello may lie)


@message
@dataclass(frozen=True)
class FireFault:
    """A fault fired on demand (a `bridged.faults.Demand`, already checked by the front)."""

    name: str
    params: tuple[str, ...]  # "key=value", the kind's keys
    count: int = 1
    for_ms: int = 10_000


@message
@dataclass(frozen=True)
class FaultFired:
    """A worker injected a fault (it logged it already)."""

    name: str
    conn_id: int  # -1: no connection
    details: str = "{}"  # JSON object: what the fault did (the last one, when hits > 1)
    hits: int = 1  # faults this report stands for (a per-datagram kind's are batched)
