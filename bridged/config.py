"""Configuration: TOML files -> frozen dataclasses, validated once at load.

Theory of operation
-------------------
A `Config` is built from layers, each overriding the one before:

1. built-in defaults (the field defaults below, which are real ESP-AT's),
2. the profile (``--profile NAME``; default ``esp32``),
3. the config files: ``--config PATH`` alone when given; else, for the
   command line (``system=True``), ``/etc/bridged/bridged.toml`` and then the
   instance's ``/etc/bridged/<instance>.toml``, each when present
   (``$BRIDGED_CONFIG_DIR`` relocates /etc/bridged, for tests),
4. command-line overrides (dotted keys such as ``uart.port``).

Every value is checked where it appears, so an error names the file (or
"command line") it came from, the dotted key and what is allowed::

    config/bridged.toml: uart.parity: 'odd2' is not allowed; allowed: none, odd, even

Unknown sections and keys are errors too, listing the allowed ones. Nothing
else in bridged validates configuration: code that holds a `Config` may trust
it.

The schema lives in one place: each dataclass field carries its default and
its check (`_field`). A config file may also carry a top-level
``profile = "NAME"``, used when no profile is given on the command line (the
last file that names one wins).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import site
import stat
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bridged import firmware
from bridged.faults.catalog import CATALOG as FAULT_KINDS
from bridged.faults.spec import ALLOWED as FAULT_ALLOWED
from bridged.faults.spec import FaultError, FaultSpec, parse_spec
from bridged.net.hosts import (PATH_ALLOWED, TABLE_ALLOWED, HostsError, HostsFile, HostTable,
                               read_hosts_file, table_from_toml)
from bridged.net.policy import (ENTRIES_ALLOWED, LOCAL_PORTS_ALLOWED, MAX_ENTRIES, PolicyError,
                                parse_local_ports, parse_rule)

__all__ = [
    "DEFAULT_PROFILE",
    "Config",
    "ConfigError",
    "DnsConfig",
    "FaultsConfig",
    "FirmwareConfig",
    "LinksConfig",
    "LogConfig",
    "OTA_PARTITION",
    "OTA_VERSION",
    "OtaConfig",
    "SntpConfig",
    "WatchdogConfig",
    "StateConfig",
    "UartConfig",
    "WifiConfig",
    "default_config",
    "find_profile",
    "load_config",
    "profile_dirs",
    "state_dir",
    "to_toml",
    "profile_header",
    "changed_keys",
    "config_dir",
    "instance_name",
    "RESTART_ONLY",
]

DEFAULT_PROFILE = "esp32"
COMMAND_LINE = "command line"

#: Where `state_dir` puts state when neither the config nor systemd says.
_SYSTEM_STATE_DIR = Path("/var/lib/bridged")
#: The system configuration directory; $BRIDGED_CONFIG_DIR replaces it.
_SYSTEM_CONFIG_DIR = Path("/etc/bridged")
_REPO_PROFILE_DIR = Path(__file__).resolve().parent.parent / "config" / "profiles"


class ConfigError(Exception):
    """A configuration file, profile or override is invalid.

    The message names the source, the dotted key and what is allowed.
    """


class _Refused(Exception):
    """Raised by a check: the value is not allowed; carries what is, and
    what is wrong when that is more than "<value> is not allowed"."""

    def __init__(self, allowed: str, problem: str | None = None, subkey: str = "") -> None:
        super().__init__(allowed)
        self.allowed = allowed
        self.problem = problem
        self.subkey = subkey  # a key inside a table value ([faults.NAME] rate)


# --------------------------------------------------------------------------
# Checks. Each takes a TOML value and returns the value to store, or raises
# _Refused. `kind` tells how to parse a command-line string for it.


@dataclass(frozen=True, slots=True)
class _Check:
    kind: type  # int, float, bool or str
    allowed: str
    accept: Callable[[Any], Any]

    def __call__(self, value: Any) -> Any:
        result = self.accept(value)
        if result is _NO:
            raise _Refused(self.allowed)
        return result


_NO = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(lo: int, hi: int) -> _Check:
    return _Check(int, f"an integer from {lo} to {hi}",
                  lambda v: v if _is_int(v) and lo <= v <= hi else _NO)


def _int_of(*values: int) -> _Check:
    allowed = ", ".join(str(v) for v in values)
    return _Check(int, allowed, lambda v: v if _is_int(v) and v in values else _NO)


def _power_of_two(lo: int, hi: int) -> _Check:
    def accept(v: Any) -> Any:
        ok = _is_int(v) and lo <= v <= hi and v & (v - 1) == 0
        return v if ok else _NO

    return _Check(int, f"a power of two from {lo} to {hi}", accept)


def _float(lo: float, hi: float) -> _Check:
    def accept(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return _NO
        v = float(v)
        return v if math.isfinite(v) and lo <= v <= hi else _NO

    return _Check(float, f"a number from {lo:g} to {hi:g}", accept)


def _bool() -> _Check:
    return _Check(bool, "true, false", lambda v: v if isinstance(v, bool) else _NO)


def _choice(*names: str) -> _Check:
    return _Check(str, ", ".join(names), lambda v: v if v in names else _NO)


def _text(lo: int, hi: int, what: str = "a string") -> _Check:
    """A string of lo..hi UTF-8 bytes without control characters."""

    def accept(v: Any) -> Any:
        if not isinstance(v, str) or not lo <= len(v.encode()) <= hi:
            return _NO
        return _NO if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v) else v

    return _Check(str, f"{what} of {lo} to {hi} bytes", accept)


def _pattern(regex: str, allowed: str, *, empty: bool = False,
             normalise: Callable[[str], str] = str) -> _Check:
    compiled = re.compile(regex)

    def accept(v: Any) -> Any:
        if not isinstance(v, str):
            return _NO
        if empty and v == "":
            return v
        return normalise(v) if compiled.fullmatch(v) else _NO

    return _Check(str, ('"" or ' if empty else "") + allowed, accept)


def _path(allowed: str, *, absolute: bool = False) -> _Check:
    def accept(v: Any) -> Any:
        if not isinstance(v, str) or "\0" in v:
            return _NO
        return _NO if absolute and v and not v.startswith("/") else v

    return _Check(str, allowed, accept)


def _base_url() -> _Check:
    """"" or an http:// / https:// URL with a host and no query, fragment or user."""

    def accept(v: Any) -> Any:
        if not isinstance(v, str):
            return _NO
        if v == "":
            return v
        # ASCII only: it goes into the request line and Host header as is.
        if not v.isascii() or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in v):
            return _NO
        try:
            parts = urlsplit(v)
            if parts.port == 0:  # "or 80" would quietly make it port 80
                return _NO
        except ValueError:  # a port out of range or not a number
            return _NO
        if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query
                or parts.fragment or "@" in parts.netloc or v.endswith("?") or v.endswith("#")):
            return _NO
        return v.rstrip("/")

    return _Check(str, '"" (no update server) or an http:// or https:// base URL (ASCII, port 1 to 65535)', accept)


def _command_line() -> _Check:
    """"" or a command line (split as a shell would, without running a shell)."""

    def accept(v: Any) -> Any:
        if not isinstance(v, str) or "\0" in v:
            return _NO
        try:
            words = shlex.split(v)
        except ValueError:  # an unclosed quote
            return _NO
        return v if v == "" or words else _NO

    return _Check(str, '"" or a command line (shell quoting, no shell features)', accept)


def _hosts_table() -> _Check:
    """[dns] hosts: a table of host names to addresses (bridged.net.hosts)."""

    def accept(v: Any) -> Any:
        if not isinstance(v, dict):
            return _NO
        try:
            return table_from_toml(v)
        except HostsError as exc:
            raise _Refused(exc.allowed, exc.problem) from None

    return _Check(dict, TABLE_ALLOWED, accept)


def _hosts_file() -> _Check:
    """[dns] hosts_file: read and parsed here, so a bad line is a config error."""
    path = _path(PATH_ALLOWED, absolute=True)

    def accept(v: Any) -> Any:
        if path.accept(v) is _NO:
            return _NO
        if not v:
            return HostsFile()
        try:
            return read_hosts_file(v)
        except HostsError as exc:
            raise _Refused(exc.allowed, exc.problem) from None

    return _Check(str, PATH_ALLOWED, accept)


def _at_version() -> _Check:
    """An ESP-AT version bridged can emulate (bridged.firmware's range)."""
    allowed = (f"an ESP-AT version from {firmware.RANGE_TEXT}: four dot-separated numbers 0 to 255 "
               "in ASCII digits, no leading zero")
    return _Check(str, allowed,
                  lambda v: v if isinstance(v, str) and firmware.version_problem(v) is None else _NO)


def _link_rules(allow: bool) -> _Check:
    """[links] allow / deny: a list of entries (bridged.net.policy), kept as written."""

    def accept(v: Any) -> Any:
        if not isinstance(v, list):
            return _NO
        if len(v) > MAX_ENTRIES:
            raise _Refused(ENTRIES_ALLOWED, f"{len(v)} entries, at most {MAX_ENTRIES}")
        for number, entry in enumerate(v, 1):
            try:
                parse_rule(entry, allow)
            except PolicyError as exc:
                raise _Refused(ENTRIES_ALLOWED, f"entry {number} {_show(entry)}: {exc.problem}") from None
        return tuple(v)

    return _Check(list, ENTRIES_ALLOWED, accept)


def _local_ports() -> _Check:
    def accept(v: Any) -> Any:
        if not isinstance(v, str):
            return _NO
        try:
            parse_local_ports(v)
        except PolicyError as exc:
            raise _Refused(LOCAL_PORTS_ALLOWED, f"{_show(v)}: {exc.problem}") from None
        return v

    return _Check(str, LOCAL_PORTS_ALLOWED, accept)


def _ota_list(item: str, allowed: str, most: int, *, one: bool = False) -> _Check:
    """A list of 0..most (1..most when `one`) distinct strings matching `item`, as a tuple;
    a lone string stands for a list of one."""
    compiled = re.compile(item)

    def accept(v: Any) -> Any:
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list | tuple) or not (1 if one else 0) <= len(items) <= most:
            return _NO
        if not all(isinstance(i, str) and compiled.fullmatch(i) for i in items):
            return _NO
        return tuple(items) if len(set(items)) == len(items) else _NO

    return _Check(list, allowed, accept)


def _fault(name: str) -> _Check:
    """[faults] NAME: a table checked by bridged.faults.spec (the problem names the key)."""

    def accept(v: Any) -> Any:
        try:
            return parse_spec(name, v)
        except FaultError as exc:
            raise _Refused(exc.allowed, exc.problem, exc.key) from None

    return _Check(dict, FAULT_ALLOWED, accept)


#: An OTA version (AT+CIUPDATE's, the server's, [ota] current_version): nothing
#: a shell, a path or an environment variable reads specially.
OTA_VERSION = r"[A-Za-z0-9._+-]{1,64}"
#: A partition name becomes a file name (<state dir>/ota/<name>.bin); 64 as ESP-AT.
OTA_PARTITION = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"


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


# --------------------------------------------------------------------------
# Loading.


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _error(source: str, key: str, problem: str, allowed: Iterable[str] | str) -> ConfigError:
    if not isinstance(allowed, str):
        allowed = ", ".join(allowed)
    return ConfigError(f"{source}: {key}: {problem}; allowed: {allowed}")


def _is_secret(section: str, key: str) -> bool:
    """A key declared with ``secret=True``: its value is never shown."""
    return any(f.name == key and not f.repr for f in dataclasses.fields(_SECTIONS[section]))


def _check(source: str, section: str, key: str, value: Any) -> Any:
    checks = _keys(section)
    if key not in checks:
        raise _error(source, f"{section}.{key}", "unknown key", checks)
    try:
        return checks[key](value)
    except _Refused as exc:
        if _is_secret(section, key):  # it ends up in logs: say what is wrong, never the value
            problem = "the value given (secret, not shown) is not allowed"
        else:
            problem = exc.problem or f"{_show(value)} is not allowed"
        dotted = f"{section}.{key}" + (f".{exc.subkey}" if exc.subkey else "")
        raise _error(source, dotted, problem, exc.allowed) from None


def _apply(values: dict[str, dict[str, Any]], doc: Mapping[str, Any], source: str,
           *, top_level: Iterable[str] = (), origins: dict[str, str] | None = None,
           label: str | None = None) -> None:
    """Check every key of a parsed TOML document and store it into `values`
    (and `label`, else `source`, into `origins` by dotted key)."""
    allowed = [*top_level, *_SECTIONS]
    for section, table in doc.items():
        if section in top_level:
            continue
        if section not in _SECTIONS:
            kind = "unknown section" if isinstance(table, dict) else "unknown key"
            raise _error(source, section, kind, allowed)
        if not isinstance(table, dict):
            raise _error(source, section, f"{_show(table)} is not allowed",
                         f"a table [{section}]")
        for key, value in table.items():
            values[section][key] = _check(source, section, key, value)
            if origins is not None:
                origins[f"{section}.{key}"] = label or source


_MAX_FILE = 16 << 20  # bytes of a config or profile file
_AT_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")


def _read_toml(path: Path | str) -> dict[str, Any]:
    """Parse a TOML file; any failure is a ConfigError naming file and line."""
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_FILE + 1)  # bounded: --config /dev/zero must not eat the memory
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE:
        raise ConfigError(f"{path}: larger than {_MAX_FILE >> 20} MiB: not a configuration file")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        line = getattr(exc, "lineno", None)
        match = _AT_LINE.search(message)
        if line is None:
            line = int(match.group(1)) if match else text.count("\n") + 1
        reason = _AT_LINE.sub("", message).replace("(at end of document)", "").strip()
        column = getattr(exc, "colno", None) or (int(match.group(2)) if match else None)
        where = f"line {line}" + (f", column {column}" if column else "")
        raise ConfigError(f"{path}: {where}: TOML syntax error: {reason}") from None


def profile_dirs() -> list[Path]:
    """Directories searched for a profile given by name, in order.

    $BRIDGED_PROFILE_PATH, the system config directory's profiles/, the source
    tree's, then ``share/bridged/profiles`` of a pip install: under sys.prefix
    (a virtualenv or system install) and under the user base (``pip install
    --user``).
    """
    dirs = [Path(p) for p in os.environ.get("BRIDGED_PROFILE_PATH", "").split(":") if p]
    dirs += [config_dir() / "profiles", _REPO_PROFILE_DIR,
             Path(sys.prefix) / "share" / "bridged" / "profiles"]
    user_base = site.getuserbase()
    if user_base:
        dirs.append(Path(user_base) / "share" / "bridged" / "profiles")
    return dirs


def _not_a_file(path: Path) -> str:
    """Why ``path`` is no profile file: missing, a directory, a FIFO, a symbolic link loop..."""
    try:
        info = path.stat()
    except OSError as exc:
        return "no such file" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc)).lower()
    return "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"


def _is_path(profile: str) -> bool:
    return "/" in profile or profile.endswith(".toml")


def find_profile(profile: str, source: str = COMMAND_LINE) -> Path:
    """Return the file for a profile given by path or by name.

    `source` is where the profile was named, for the error message.

    Raises:
        ConfigError: the file does not exist or the name is not valid.
    """
    if _is_path(profile):
        path = Path(profile)
        if not path.is_file():
            raise ConfigError(f"{source}: profile: {profile!r}: {_not_a_file(path)}")
        return path
    dirs = profile_dirs()
    allowed = ("a path to a .toml file, or the name of one in: "
               + ", ".join(str(d) for d in dirs))
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", profile):
        raise _error(source, "profile", f"{profile!r} is not allowed", allowed)
    for directory in dirs:
        candidate = directory / f"{profile}.toml"
        if candidate.is_file():
            return candidate
    raise _error(source, "profile", f"{profile!r} not found", allowed)


def _coerce(text: str, kind: type) -> Any:
    """Parse a command-line string for a non-string key; unparsable stays text."""
    try:
        if kind is int:
            return int(text, 0)
        if kind is float:
            return float(text)
    except ValueError:
        return text
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
    return text


def _apply_overrides(values: dict[str, dict[str, Any]], overrides: Mapping[str, Any],
                     origins: dict[str, str]) -> bool:
    applied = False
    for dotted, value in overrides.items():
        if value is None:  # an option not given on the command line
            continue
        section, _, key = dotted.partition(".")
        if section not in _SECTIONS or not key:
            raise _error(COMMAND_LINE, dotted, "unknown key",
                         [f"{s}.<key>" for s in _SECTIONS])
        checks = _keys(section)
        if isinstance(value, str) and key in checks and checks[key].kind is not str:
            value = _coerce(value, checks[key].kind)
        values[section][key] = _check(COMMAND_LINE, section, key, value)
        origins[dotted] = COMMAND_LINE
        applied = True
    return applied


def load_config(config_path: str | os.PathLike[str] | None = None,
                profile: str | None = None,
                overrides: Mapping[str, Any] | None = None,
                *, instance: str | None = None, system: bool = False) -> Config:
    """Build the configuration: defaults <- profile <- config files <- overrides.

    Args:
        config_path: the config file, or None for none. When given it is the
            only config file: the system files are not read.
        profile: a profile name or a path to a .toml file; None means the
            last config file's top-level ``profile`` key (a relative path there
            is relative to that file), else "esp32". A missing "esp32"
            profile is not an error when it was not asked for explicitly (the
            built-in defaults are the same values).
        overrides: dotted keys to values (``{"uart.port": "/dev/ttyAMA0"}``).
            None values are skipped; strings are parsed for integer, number and
            boolean keys.
        instance: the service instance (``--instance``; see `instance_name`):
            its system file applies over bridged.toml, and `state_dir` puts
            its state in a directory of its own.
        system: without `config_path`, read `system_files` (the command line
            does; library callers and tests get the defaults alone).

    Raises:
        ConfigError: the message names the file, the dotted key and what is allowed.
    """
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    sources: list[str] = []
    instance = instance_name(instance) if instance else ""
    if config_path is not None:
        paths: list[Path | str | os.PathLike[str]] = [config_path]
    else:
        paths = list(system_files(instance)) if system else []
    docs = [(str(path), _read_toml(path)) for path in paths]

    explicit, named_in = profile is not None, COMMAND_LINE
    if profile is None:
        for source, doc in docs:
            if "profile" in doc:
                profile, named_in = doc["profile"], source
        if not isinstance(profile, str | None) or profile == "":
            raise _error(named_in, "profile", f"{_show(profile)} is not allowed",
                         "a profile name or a path to a .toml file")
        explicit = profile is not None
    profile = profile or DEFAULT_PROFILE

    wanted = profile
    if named_in != COMMAND_LINE and _is_path(profile) and not profile.startswith("/"):
        wanted = str(Path(named_in).parent / profile)  # relative to the config file
    try:
        profile_file: Path | None = find_profile(wanted, named_in)
    except ConfigError:
        if explicit:
            raise
        profile_file = None
    origins: dict[str, str] = {}
    if profile_file is not None:
        _apply(values, _read_toml(profile_file), str(profile_file), origins=origins,
               label=f"profile {profile}")
        sources.append(str(profile_file))
    for source, doc in docs:
        _apply(values, doc, source, top_level=("profile",), origins=origins)
        sources.append(source)
    if _apply_overrides(values, overrides or {}, origins):
        sources.append(COMMAND_LINE)

    sections = {name: cls(**values[name]) for name, cls in _SECTIONS.items()}
    return Config(**sections, profile=profile, sources=tuple(sources), instance=instance,
                  origins=tuple(origins.items()),
                  profile_file=str(profile_file) if profile_file is not None else "")


# --------------------------------------------------------------------------
# System files and service instances.

#: What an instance name (after `instance_name`) may hold: systemd-escape's
#: output alphabet.
_INSTANCE = re.compile(r"[A-Za-z0-9:_.\\-]{1,200}")
_INSTANCE_ALLOWED = ("a systemd instance name such as ttyAMA0 or serial-by\\x2did-usb\\x2d...,"
                     " or a device path such as /dev/serial/by-id/usb-...")


def config_dir() -> Path:
    """The system configuration directory: $BRIDGED_CONFIG_DIR, else /etc/bridged."""
    given = os.environ.get("BRIDGED_CONFIG_DIR", "")
    return Path(given) if given else _SYSTEM_CONFIG_DIR


def _escape_path(path: str) -> str:
    """systemd-escape --path: "serial/by-id/usb-X" -> "serial-by\\x2did-usb\\x2dX"."""
    parts = [p for p in path.split("/") if p and p != "."]
    out = []
    for i, char in enumerate("/".join(parts)):
        if char == "/":
            out.append("-")
        elif char.isascii() and (char.isalnum() or char in ":_") or (char == "." and i > 0):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out) or "-"


def instance_name(text: str, source: str = COMMAND_LINE) -> str:
    """The instance ``--instance`` names, spelt as systemd's %i.

    The unit passes %i (``ttyAMA0``, ``serial-by\\x2did-usb\\x2d...``); a
    person may give the device path instead (``/dev/serial/by-id/usb-...`` or
    ``serial/by-id/usb-...``, anything with a "/"), escaped here as
    systemd-escape --path does, so both name the same files and directory.

    Raises:
        ConfigError: not a usable name (it becomes a file and directory name).
    """
    name = text
    if "/" in text and "\0" not in text:
        name = _escape_path(text.removeprefix("/dev/"))
    if not _INSTANCE.fullmatch(name) or name.startswith(".") or name == "bridged":
        raise _error(source, "instance", f"{_show(text)} is not allowed", _INSTANCE_ALLOWED)
    return name


def system_files(instance: str = "") -> list[Path]:
    """The system config files that exist, in the order they apply:
    ``<config_dir>/bridged.toml``, then ``<config_dir>/<instance>.toml``."""
    directory = config_dir()
    names = ["bridged.toml"] + ([f"{instance}.toml"] if instance else [])
    # A dangling symlink or an unreadable file is still "present": reading it
    # reports what is wrong, naming the file.
    return [directory / n for n in names if os.path.lexists(directory / n)]


def _toml_value(value: Any) -> str:
    if isinstance(value, FaultSpec):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.as_table().items()) + " }"
    if isinstance(value, HostsFile):
        return json.dumps(value.path)
    if isinstance(value, HostTable):  # an inline table: TOML 1.0 keeps it on one line
        pairs = [f"{json.dumps(name)} = {_toml_value(list(addresses))}" for name, addresses in value.entries]
        return "{ " + ", ".join(pairs) + " }" if pairs else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # A JSON string is a TOML basic string (\" \\ \n \uXXXX escapes alike).
    return json.dumps(value)


def to_toml(config: Config) -> str:
    """The effective configuration as a TOML file (``bridged check``).

    Every key of every section, so an admin sees what the layers made of
    them; secrets (Wi-Fi password, OTA token) are only said to be set or empty.
    """
    lines = [f"# profile: {config.profile}",
             f"# applied over the built-in defaults: {', '.join(config.sources) or 'nothing'}",
             "# (a key set by one of them says which; the others are built-in defaults)"]
    if config.instance:
        lines.insert(0, f"# instance: {config.instance}")
    origins = dict(config.origins)
    for name, cls in _SECTIONS.items():
        section = getattr(config, name)
        lines += ["", f"[{name}]"]
        for f in dataclasses.fields(cls):
            value = getattr(section, f.name)
            if value is None:  # TOML has no null: an unset seed, a fault not configured
                line = f"# {f.name}: not set"
            elif not f.repr:
                line = f"# {f.name}: {'set' if value else 'empty'} (secret, not shown)"
            else:
                line = f"{f.name} = {_toml_value(value)}"
            origin = origins.get(f"{name}.{f.name}")
            lines.append(f"{line}  # {origin}" if origin else line)
    return "\n".join(lines) + "\n"


def profile_header(path: Path | str) -> str:
    """A profile file's leading comment: what it models and where its figures come from."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


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


# --------------------------------------------------------------------------
# State directory.


def _usable(directory: Path, mode: int = 0o700) -> bool:
    try:
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError:
        return False
    return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)


def state_dir(config: Config) -> Path:
    """Return (and create, mode 0700) the directory holding persistent state.

    In order: ``[state] dir``; ``$STATE_DIRECTORY`` (its first entry, as set by
    systemd's StateDirectory=, which already holds the instance);
    /var/lib/bridged when it exists or can be created and is writable;
    ``$XDG_STATE_HOME/bridged`` (default ~/.local/state/bridged). For the
    last two, a service instance (``config.instance``) gets a directory of its
    own below: /var/lib/bridged/<instance>, as StateDirectory=bridged/%i
    (used whenever it exists, so ``bridged pki --instance`` run by the service
    user or root finds the service's).

    Raises:
        OSError: the chosen directory cannot be created.
    """
    if config.state.dir:
        chosen = Path(config.state.dir)
    elif first := os.environ.get("STATE_DIRECTORY", "").split(":")[0]:
        chosen = Path(first)
    elif config.instance and ((_SYSTEM_STATE_DIR / config.instance).is_dir()
                              or _usable(_SYSTEM_STATE_DIR, 0o755)):
        # The service's directory even when it is not ours (a later error says
        # so, naming it) rather than a quiet other one; a new /var/lib/bridged
        # is 0755 as systemd makes it, for the service user to pass through.
        chosen = _SYSTEM_STATE_DIR / config.instance
    elif not config.instance and _usable(_SYSTEM_STATE_DIR):
        return _SYSTEM_STATE_DIR
    else:
        xdg = os.environ.get("XDG_STATE_HOME", "")
        base = Path(xdg) if xdg.startswith("/") else Path.home() / ".local" / "state"
        chosen = base / "bridged" / config.instance if config.instance else base / "bridged"
    chosen.mkdir(mode=0o700, parents=True, exist_ok=True)
    return chosen
