"""What command handlers see: the session state and the front's services.

``SessionState`` is the ESP's RAM: everything AT commands set, at the values a
freshly booted ESP32 has.  ``load_persisted`` overlays what AT+SYSSTORE=1 (the
ESP's NVS) kept.  AT+RST and AT+RESTORE build a new one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Protocol

from bridged.commands.options import LINKS, SslClientConf, SysMsg, TcpOptions, decode_stored, encode_stored
from bridged.firmware import Personality, personality
from bridged.tasks import Spawn

if TYPE_CHECKING:
    from bridged.config import Config
    from bridged.store import Store

__all__ = [
    "UartSettings",
    "SntpSettings",
    "SessionState",
    "ConnectSpec",
    "LinkView",
    "Links",
    "Context",
    "OtaProgress",
    "PERSISTED",
]


@dataclass(frozen=True, slots=True)
class UartSettings:
    """AT+UART_CUR's five values: flow 0 none, 1 RTS, 2 CTS, 3 both."""

    baud: int
    data_bits: int
    stop_bits: int  # ESP-AT's code: 1 = 1, 2 = 1.5, 3 = 2
    parity: int  # 0 none, 1 odd, 2 even
    flow: int

    def fields(self) -> tuple[int, int, int, int, int]:
        return (self.baud, self.data_bits, self.stop_bits, self.parity, self.flow)


@dataclass(frozen=True, slots=True)
class SntpSettings:
    """What AT+CIPSNTPCFG set: RAM only, a restart forgets it."""

    servers: tuple[str, ...] = ()  # () = not configured (<enable> 0)
    timezone: int = 0  # as given: whole hours, or [+|-]hhmm


# Keys the ESP keeps in NVS when AT+SYSSTORE=1 (esp-at-behavior.md 1.8).
PERSISTED = ("sysmsg", "cwmode", "cipv6", "wifi_ssid", "wifi_password", "cwdhcp", "tcpopts", "reconnintv", "sslconf",
             "reconncfg")


@dataclass(slots=True)
class SessionState:
    echo: bool = True
    sysstore: bool = True
    sysmsg: SysMsg = SysMsg(0)
    syslog: bool = False
    rfpower: tuple[int, int, int, int] = (84, 5, 5, 5)
    cwmode: int = 1
    cwautoconn: bool = True
    cwdhcp: int = 3
    cwlapopt: tuple[int, int] = (0, 0x7FF)
    hostname: str = "espressif"
    wifi_ssid: str = ""  # stored credentials (CWJAP / CWJAP?)
    wifi_password: str = ""
    wifi_state: int = 0  # AT+CWSTATE: 0 not started, 2 got IP, 3 connecting, 4 disconnected
    wifi_epoch: int = 0  # bumped at each change of wifi_state: a station reconnection sees it was overtaken
    # AT+CWRECONNCFG: <interval_second> (0: no reconnection), <repeat_count> (0: for ever);
    # AT+CWJAP's <reconn_interval> (default 1) sets the interval too.
    reconncfg: tuple[int, int] = (0, 0)
    had_link: bool = False  # for AT+CIPSTATUS's "all links disconnected"
    cipmux: int = 0
    cipmode: int = 0
    cipdinfo: bool = False
    cipv6: bool = False
    recv_modes: list[int] = field(default_factory=lambda: [0] * 5)  # per link: 0 active (+IPD), 1 passive
    transintvl: int = 20  # AT+TRANSINTVL, ms
    reconnintv: int = 1  # AT+CIPRECONNINTV, 100 ms units
    sendl_cfg: tuple[int, int] = (1024, 2920)  # AT+CIPSENDLCFG: report size, transmit size
    # SSL client settings per link (AT+CIPSSLCCONF, CIPSSLCCN, CIPSSLCSNI,
    # CIPSSLCALPN, CIPSSLCPSK/CIPSSLCPSKHEX): they apply to the next connection.
    sslconf: list[SslClientConf] = field(default_factory=lambda: [SslClientConf()] * LINKS)
    sslcn: list[str] = field(default_factory=lambda: [""] * LINKS)
    sslsni: list[str] = field(default_factory=lambda: [""] * LINKS)
    sslalpn: list[tuple[str, ...]] = field(default_factory=lambda: [()] * LINKS)
    sslpsk: list[tuple[str, str]] = field(default_factory=lambda: [("", "")] * LINKS)  # hex psk, hint
    # AT+CIPTCPOPT per link; keep_alive is shared with AT+CIPSTART's: the later of the two wins.
    tcpopts: list[TcpOptions] = field(default_factory=lambda: [TcpOptions()] * LINKS)
    sntp: SntpSettings = SntpSettings()
    sntp_interval: int = 3600  # AT+CIPSNTPINTV, s (ESP-IDF's CONFIG_LWIP_SNTP_UPDATE_DELAY)

    @property
    def wifi_connected(self) -> bool:
        return self.wifi_state == 2

    def load_persisted(self, store: "Store") -> None:
        for key in PERSISTED:
            value = store.get(key)
            if value is not None:
                value = decode_stored(key, value)  # typed values from their stored form (bridged.commands.options)
            if value is not None:
                setattr(self, key, value)
        self.cwautoconn = bool(store.get("cwautoconn", True))

    def persist(self, store: "Store", *keys: str) -> None:
        """Save keys to NVS, as ESP-AT does only while AT+SYSSTORE=1."""
        if self.sysstore:
            store.update({k: encode_stored(getattr(self, k)) for k in keys})


@dataclass(slots=True)
class OtaProgress:
    """AT+CIUPDATE in this session: its state as AT+CIUPDATE? shows it, and whether one runs."""

    state: int = 0
    running: bool = False


@dataclass(frozen=True, slots=True)
class ConnectSpec:
    """AT+CIPSTART's parameters, checked."""

    type: str  # "TCP", "TCPv6", ...
    host: str
    port: int
    local_ip: str = ""
    timeout_ms: int = 0
    local_port: int = 0
    udp_mode: int = 0
    tls_auth: int = 0
    tls_pki: int = 0
    tls_ca: int = 0
    tls_cn: str = ""
    tls_sni: str = ""
    tls_alpn: tuple[str, ...] = ()
    tls_psk: str = field(default="", repr=False)  # hex; a key: never in a logged repr
    tls_psk_hint: str = ""
    dns_servers: tuple[str, ...] = ()  # AT+CIPDNS's manual servers; () = the host's resolver
    tls_time: int | None = None  # verifying SSL: certificate dates at this Unix time (device clock); None: host clock


@dataclass(frozen=True, slots=True)
class LinkView:
    """A link as AT+CIPSTATE shows it."""

    link_id: int
    type: str
    remote_ip: str
    remote_port: int
    local_port: int
    server: bool


class Links(Protocol):
    count: int

    def view(self, link_id: int) -> LinkView | None: ...

    def is_busy(self, link_id: int) -> bool: ...

    def is_ready(self, link_id: int) -> bool: ...

    async def wait_ready(self, link_id: int, timeout: float) -> None: ...

    def can_send(self, link_id: int) -> bool: ...

    def set_passive(self, link_id: int, passive: bool) -> None: ...

    def is_passive(self, link_id: int) -> bool: ...

    def spec(self, link_id: int) -> "ConnectSpec | None": ...

    def unread(self, link_id: int) -> int: ...

    def read(self, link_id: int, limit: int) -> bytes: ...

    def after_read(self, link_id: int) -> None: ...

    async def connect(self, link_id: int, spec: ConnectSpec) -> LinkView: ...

    async def close(self, link_id: int) -> None: ...

    def server_links(self) -> list[int]: ...

    def set_options(self, link_id: int, linger: int, nodelay: int, keep_alive: int) -> None: ...

    def free_ids(self) -> list[int]: ...

    def refused(self, link_id: int, refusal: Any) -> None: ...


async def _nothing() -> None:
    """Context.before_close without a front (unit tests): nothing waits."""


@dataclass
class Context:
    """Everything a handler may use; built by the UART front."""

    config: "Config"
    state: SessionState
    store: "Store"
    links: Links
    urc: Callable[[bytes], None]  # queue an unsolicited message
    restart: Callable[[bool], Any]  # AT+RST (False) / AT+RESTORE (True)
    apply_uart: Callable[[UartSettings], None]  # reconfigure the port now
    uart: UartSettings
    uart_factory: UartSettings  # [uart]'s settings: AT+UART_DEF? until one is stored
    spawn: Spawn  # the front's TaskScope.spawn: every task a command starts is made there
    server: Any = None  # the front's AT+CIPSERVER listener (bridged.uart.server.Server)
    mdns: Any = None  # the front's AT+MDNS responder (bridged.net.mdns.Advertiser)
    sntp: Any = None  # the front's SNTP client and device clock (bridged.net.sntp_client.SntpClient)
    ota: OtaProgress = field(default_factory=OtaProgress)  # AT+CIUPDATE in this session
    # AT+CIPDNS's manual servers as set in this boot ([]: disabled); None: not set since
    # the boot, what the store held then applies.
    cipdns: list[str] | None = None
    # Called after each join, leave or mode change of this session (bridged.commands.wifi.watch_station).
    station_watchers: list[Callable[[], None]] = field(default_factory=list)
    # Part of the running command's answer, written now and in order with its
    # final result (AT+CIUPDATE's progress lines before OK or ERROR).
    answer_part: Callable[[bytes], None] = lambda data: None
    # Work a command left running after its answer (a nonblocking AT+CIUPDATE):
    # a restart cancels it, as a reboot would.
    background: set[asyncio.Task] = field(default_factory=set)
    # The front's injected faults (bridged.faults.front.FrontFaults); None: none (unit tests).
    faults: Any = None
    # A restart's answer is queued (the restart itself waits for it to be written):
    # from now on nothing of the links or the server reaches the MCU.
    silence_links: Callable[[], Any] = lambda: None
    # AT+CIPCLOSE of a link: what a +++ left of its stream goes into its ring first (uart.leftovers).
    before_close: Callable[[int], Coroutine[Any, Any, None]] = field(default=lambda link_id: _nothing())
    # AT+CIPSEND/CIPSENDEX/CIPSENDL lines answered with a prompt to a TCP link in this
    # session: raw line -> (AT+CIPMUX then, SendRequest, command name) (bridged.commands.send.quick_send).
    quick_sends: dict[bytes, tuple[int, Any, str]] = field(default_factory=dict)
    # AT+CIPRECVDATA lines bound in this session: raw line -> (AT+CIPMUX then, link id,
    # length) (bridged.commands.recv.quick_recv).
    quick_reads: dict[bytes, tuple[int, int, int]] = field(default_factory=dict)

    def in_background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run ``work`` past the command's answer; a restart cancels it (``background``)."""
        task = self.spawn(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    @property
    def personality(self) -> Personality:
        """How the configured ESP-AT version answers where versions differ."""
        return personality(self.config.firmware.at_version)

    @property
    def mux(self) -> bool:
        return self.state.cipmux == 1

    def link_arg(self, link_id: int) -> int | None:
        """The id as messages print it: None in single-connection mode."""
        return link_id if self.mux else None
