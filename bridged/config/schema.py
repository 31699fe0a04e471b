"""The schema: one frozen dataclass per section, `Config` holding them all.

Each field carries its default (real ESP-AT's) and its check (`_field`, with
the checks of `bridged.config.checks`); nothing else declares a key. What
walks the schema for other code is here too: `changed_keys` (a reload) and
`RESTART_ONLY`, the keys a reload cannot apply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bridged.config.checks import (OTA_PARTITION, OTA_VERSION, _at_version, _base_url, _bool, _Check,
                                   _choice, _command_line, _fault, _float, _hosts_file, _hosts_table,
                                   _int, _int_of, _link_rules, _local_ports, _ota_list, _path, _pattern,
                                   _power_of_two, _text)
from bridged.faults.catalog import CATALOG as FAULT_KINDS
from bridged.faults.spec import FaultSpec
from bridged.net.hosts import HostsFile, HostTable

__all__ = [
    "DEFAULT_PROFILE",
    "RESTART_ONLY",
    "Config",
    "DnsConfig",
    "FaultsConfig",
    "FirmwareConfig",
    "LinksConfig",
    "LogConfig",
    "OtaConfig",
    "SntpConfig",
    "StateConfig",
    "UartConfig",
    "WatchdogConfig",
    "WifiConfig",
    "changed_keys",
    "default_config",
]

DEFAULT_PROFILE = "esp32"


def _field(default: Any, check: _Check, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"check": check}, repr=not secret)


_IFNAME = _pattern(r"[A-Za-z0-9_.:@-]{1,15}", "an interface name of 1 to 15 characters",
                   empty=True)
_MAC = r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}"


# --------------------------------------------------------------------------
# The schema.


@dataclass(frozen=True, slots=True)
class UartConfig:
    """[uart]: the serial line to the MCU."""

    port: str = _field("", _path('"" (create a pseudo-terminal) or a serial device path'))
    pty_link: str = _field("", _path('"" or a path for a symlink to the pty'))
    baud: int = _field(115200, _int(80, 5_000_000))
    data_bits: int = _field(8, _int(5, 8))
    stop_bits: int = _field(1, _int_of(1, 2))
    parity: str = _field("none", _choice("none", "odd", "even"))
    flow_control: str = _field("rts", _choice("none", "rts", "cts", "rtscts"))
    urc_gap_ms: float = _field(5.0, _float(0, 1000))
    max_line: int = _field(256, _int(16, 65536))
    pace: bool = _field(True, _bool())  # a pty keeps the line rate both ways (a real port: ignored)


@dataclass(frozen=True, slots=True)
class WifiConfig:
    """[wifi]: the emulated radio, mapped onto host interfaces."""

    station_interface: str = _field("", _IFNAME)
    ap_interface: str = _field("", _IFNAME)
    eth_interface: str = _field("", _IFNAME)
    ssid: str = _field("bridged", _text(1, 32))
    bssid: str = _field("", _pattern(_MAC, "a MAC address aa:bb:cc:dd:ee:ff",
                                     empty=True, normalise=str.lower))
    channel: int = _field(6, _int(1, 14))
    rssi: int = _field(-45, _int(-100, 0))
    ecn: int = _field(3, _int(0, 8))
    check_credentials: bool = _field(False, _bool())
    password: str = _field("", _text(0, 64), secret=True)
    # AT+CWJAP's association time (the esp32 profile says where the figure comes from).
    connect_delay_ms: int = _field(3000, _int(0, 60000))


@dataclass(frozen=True, slots=True)
class LinksConfig:
    """[links]: the link slots (one worker process each) and their buffers."""

    count: int = _field(5, _int(1, 5))
    cipsend_max: int = _field(8192, _int(1, 65536))
    recv_window: int = _field(5760, _int(536, 1_048_576))
    chunk: int = _field(2920, _int(1, 65536))
    ring_size: int = _field(65536, _power_of_two(4096, 16_777_216))
    connect_timeout_ms: int = _field(10000, _int(1, 600_000))
    read_window_ms: int = _field(20, _int(0, 100))
    # Where links may go (bridged.net.policy); the built-in default allows everything.
    allow: tuple[str, ...] = _field((), _link_rules(True))
    deny: tuple[str, ...] = _field((), _link_rules(False))
    local_ports: str = _field("1024-65535", _local_ports())


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]: structured logs on stdout and the optional AT transcript."""

    level: str = _field("info", _choice("debug", "info", "warning", "error"))
    format: str = _field("auto", _choice("auto", "json", "console"))
    transcript: bool = _field(False, _bool())
    transcript_path: str = _field("", _path('"" (to the log) or an absolute file path', absolute=True))
    transcript_max_bytes: int = _field(10_485_760, _int(4096, 1_099_511_627_776))
    transcript_files: int = _field(5, _int(1, 100))


@dataclass(frozen=True, slots=True)
class StateConfig:
    """[state]: where AT+SYSSTORE=1 settings are kept (see `state_dir`)."""

    dir: str = _field("", _path('"" (automatic) or an absolute directory path',
                                absolute=True))


@dataclass(frozen=True, slots=True)
class FirmwareConfig:
    """[firmware]: the emulated ESP-AT version (AT+GMR's text and every
    behaviour that differs between versions: bridged.firmware) and how long a
    (re)boot takes."""

    at_version: str = _field("4.1.1.0", _at_version())
    sdk_version: str = _field("v5.0.8", _text(1, 64))
    module: str = _field("WROOM-32", _text(1, 64))
    # The silence between a restart and ready (see bridged.uart.boot; the
    # esp32 profile says where the figure comes from).
    boot_ms: int = _field(400, _int(0, 10000))
    boot_banner: bool = _field(False, _bool())
    boot_banner_baud: int = _field(115200, _int(80, 5_000_000))


@dataclass(frozen=True, slots=True)
class OtaConfig:
    """[ota]: where AT+CIUPDATE and AT+CIPFWVER? find firmware (see bridged.net.ota)."""

    server: str = _field("", _base_url())
    token: str = _field("", _pattern(r"[\x20-\x7e]{0,256}", "0 to 256 printable ASCII characters"), secret=True)
    max_size: int = _field(16_777_216, _int(1, 4_294_967_296))
    install_command: str = _field("", _command_line())
    timeout_ms: int = _field(180_000, _int(1000, 3_600_000))
    insecure_http: bool = _field(False, _bool())
    ca_file: str = _field("", _path('"" (the system CA store) or an absolute path to a PEM file',
                                    absolute=True))
    public_key: tuple[str, ...] = _field((), _ota_list(
        r"/[^\x00]*", "an absolute path to an Ed25519 public key, or a list of up to 8 distinct ones", 8))
    allow_unsigned: bool = _field(False, _bool())
    allow_downgrade: bool = _field(False, _bool())
    current_version: str = _field("", _pattern(OTA_VERSION, "1 to 64 of A-Z a-z 0-9 . _ + -", empty=True))
    partitions: tuple[str, ...] = _field(("ota",), _ota_list(
        OTA_PARTITION, "a list of 1 to 16 distinct partition names (1 to 64 of A-Z a-z 0-9 _ . -,"
        " not starting with . or -)", 16, one=True))


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """[dns]: host name overrides, consulted before any DNS server (bridged.net.hosts)."""

    hosts: HostTable = _field(HostTable(), _hosts_table())
    hosts_file: HostsFile = _field(HostsFile(), _hosts_file())


@dataclass(frozen=True, slots=True)
class SntpConfig:
    """[sntp]: where AT+CIPSNTPTIME's time comes from (see bridged.commands.sntp)."""

    source: str = _field("servers", _choice("servers", "host"))


@dataclass(frozen=True, slots=True)
class WatchdogConfig:
    """[watchdog]: how the supervisor tells a stuck child from a busy one (bridged.liveness)."""

    heartbeat_ms: int = _field(1000, _int(100, 60_000))
    missed_heartbeats: int = _field(3, _int(1, 100))


def _configured_faults(self: Any) -> tuple[FaultSpec, ...]:
    """The configured faults, in catalog order."""
    return tuple(getattr(self, k.name) for k in FAULT_KINDS if getattr(self, k.name) is not None)


# [faults]: `seed` (None: the supervisor draws one at start and logs it) and one
# key per fault kind (bridged.faults.catalog), each a table or absent. Made from
# the catalog so a new kind is a config key with nothing else to write.
FaultsConfig = dataclasses.make_dataclass(
    "FaultsConfig",
    [("seed", "int | None", _field(None, _int(0, 2**63 - 1)))]
    + [(k.name, "FaultSpec | None", _field(None, _fault(k.name))) for k in FAULT_KINDS],
    namespace={"specs": _configured_faults,
               "__doc__": "[faults]: faults to inject, seeded and reproducible (bridged.faults)."},
    frozen=True, slots=True)
FaultsConfig.__module__ = __name__


_SECTIONS: dict[str, type] = {
    "uart": UartConfig,
    "wifi": WifiConfig,
    "links": LinksConfig,
    "log": LogConfig,
    "state": StateConfig,
    "firmware": FirmwareConfig,
    "ota": OtaConfig,
    "dns": DnsConfig,
    "sntp": SntpConfig,
    "watchdog": WatchdogConfig,
    "faults": FaultsConfig,
}


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, one frozen dataclass per section.

    `profile` is the profile asked for (name or path); `sources` lists what
    was applied over the built-in defaults, in order: the profile file, the
    config files, "command line"; `origins` says which of them set each
    dotted key that is not a built-in default (`bridged check` shows it).
    `instance` is the service instance (`instance_name`), "" for none.
    `profile_file` is the profile file read ("" for none): a relative
    `profile` in a config file is found from that file, not from here.
    """

    uart: UartConfig = field(default_factory=UartConfig)
    wifi: WifiConfig = field(default_factory=WifiConfig)
    links: LinksConfig = field(default_factory=LinksConfig)
    log: LogConfig = field(default_factory=LogConfig)
    state: StateConfig = field(default_factory=StateConfig)
    firmware: FirmwareConfig = field(default_factory=FirmwareConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    sntp: SntpConfig = field(default_factory=SntpConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)  # type: ignore[valid-type]
    profile: str = DEFAULT_PROFILE
    sources: tuple[str, ...] = ()
    instance: str = ""
    origins: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)
    profile_file: str = field(default="", compare=False)  # the profile's file as read ("": none was)


def _keys(section: str) -> dict[str, _Check]:
    return {f.name: f.metadata["check"] for f in dataclasses.fields(_SECTIONS[section])}


def _is_secret(section: str, key: str) -> bool:
    """A key declared with ``secret=True``: its value is never shown."""
    return any(f.name == key and not f.repr for f in dataclasses.fields(_SECTIONS[section]))


# Keys a reload cannot apply: the supervisor holds the port, the state
# directory and one worker and ring pair per link, sized at start-up.
RESTART_ONLY = ("uart.port", "uart.pty_link", "state.dir", "links.count", "links.ring_size")


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ, in schema order."""
    changed = []
    for name, cls in _SECTIONS.items():
        before, after = getattr(old, name), getattr(new, name)
        for f in dataclasses.fields(cls):
            if getattr(before, f.name) != getattr(after, f.name):
                changed.append(f"{name}.{f.name}")
    return changed


def default_config() -> Config:
    """The built-in defaults alone (real ESP-AT's), without reading any file."""
    return Config()
