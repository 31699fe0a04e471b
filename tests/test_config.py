"""Tests for bridged.config: layering, validation messages, profiles, state dir."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests import forkserver

from bridged import config as config_module
from bridged.config import paths as config_paths  # what state_dir and profile_dirs read
from bridged.config import (
    Config,
    WatchdogConfig,
    ConfigError,
    DnsConfig,
    FirmwareConfig,
    LinksConfig,
    LogConfig,
    OtaConfig,
    SntpConfig,
    StateConfig,
    UartConfig,
    WifiConfig,
    changed_keys,
    default_config,
    find_profile,
    instance_name,
    load_config,
    profile_dirs,
    state_dir,
    to_toml,
)
from bridged.net.hosts import HostsFile, HostTable

REPO = Path(__file__).resolve().parent.parent
PROFILES = sorted((REPO / "config" / "profiles").glob("*.toml"))


@pytest.fixture(autouse=True)
def _no_profile_path(monkeypatch):
    monkeypatch.delenv("BRIDGED_PROFILE_PATH", raising=False)


def write(tmp_path: Path, text: str, name: str = "bridged.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def toml_value(value: object) -> str:
    if isinstance(value, dict):
        pairs = [f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()]
        return "{ " + ", ".join(pairs) + " }" if pairs else "{}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    return repr(value)


# --------------------------------------------------------------------------
# Every key: the edges of its range accepted, one step outside refused.

ACCEPTED = [
    ("uart", "port", ""), ("uart", "port", "/dev/ttyAMA0"),
    ("uart", "pty_link", ""), ("uart", "pty_link", "/tmp/ttyBRIDGED"),
    ("uart", "baud", 80), ("uart", "baud", 5_000_000),
    ("uart", "data_bits", 5), ("uart", "data_bits", 8),
    ("uart", "stop_bits", 1), ("uart", "stop_bits", 2),
    ("uart", "parity", "none"), ("uart", "parity", "odd"), ("uart", "parity", "even"),
    ("uart", "flow_control", "none"), ("uart", "flow_control", "rts"),
    ("uart", "flow_control", "cts"), ("uart", "flow_control", "rtscts"),
    ("uart", "urc_gap_ms", 0), ("uart", "urc_gap_ms", 1000), ("uart", "urc_gap_ms", 0.5),
    ("uart", "max_line", 16), ("uart", "max_line", 65536),
    ("uart", "pace", True), ("uart", "pace", False),
    ("wifi", "station_interface", ""), ("wifi", "station_interface", "eth0"),
    ("wifi", "ap_interface", "wlan0"), ("wifi", "eth_interface", "enp1s0f0"),
    ("wifi", "ssid", "x"), ("wifi", "ssid", "s" * 32), ("wifi", "ssid", "é" * 16),
    ("wifi", "bssid", ""), ("wifi", "bssid", "aa:bb:cc:dd:ee:ff"),
    ("wifi", "channel", 1), ("wifi", "channel", 14),
    ("wifi", "rssi", -100), ("wifi", "rssi", 0),
    ("wifi", "ecn", 0), ("wifi", "ecn", 8),
    ("wifi", "check_credentials", True), ("wifi", "check_credentials", False),
    ("wifi", "password", ""), ("wifi", "password", "p" * 64),
    ("wifi", "connect_delay_ms", 0), ("wifi", "connect_delay_ms", 60000),
    ("links", "count", 1), ("links", "count", 5),
    ("links", "cipsend_max", 1), ("links", "cipsend_max", 65536),
    ("links", "recv_window", 536), ("links", "recv_window", 1_048_576),
    ("links", "chunk", 1), ("links", "chunk", 65536),
    ("links", "ring_size", 4096), ("links", "ring_size", 16_777_216),
    ("links", "connect_timeout_ms", 1), ("links", "connect_timeout_ms", 600_000),
    ("links", "read_window_ms", 0), ("links", "read_window_ms", 100),
    ("links", "allow", []), ("links", "allow", ["127.0.0.1:1883", "[::1]/128:8080", "self:1-1023"]),
    ("links", "deny", []), ("links", "deny", ["self", "0.0.0.0/0:1-1023", "fe80::/10", "169.254.169.254"]),
    ("links", "local_ports", "1024-65535"), ("links", "local_ports", "1"), ("links", "local_ports", "123,1024-65535"),
    ("log", "level", "debug"), ("log", "level", "info"),
    ("log", "level", "warning"), ("log", "level", "error"),
    ("log", "format", "auto"), ("log", "format", "json"), ("log", "format", "console"),
    ("log", "transcript", True), ("log", "transcript", False),
    ("log", "transcript_path", ""), ("log", "transcript_path", "/var/lib/bridged/ttyAMA0/transcript"),
    ("log", "transcript_max_bytes", 4096), ("log", "transcript_max_bytes", 1_099_511_627_776),
    ("log", "transcript_files", 1), ("log", "transcript_files", 100),
    ("state", "dir", ""), ("state", "dir", "/var/lib/bridged/x"),
    ("firmware", "at_version", "4.1.1.0"), ("firmware", "at_version", "2.2.0.0"),
    ("firmware", "at_version", "4.1.255.255"), ("firmware", "at_version", "3.0.10.100"),
    ("firmware", "sdk_version", "v5.0.8"), ("firmware", "module", "WROOM-32"),
    ("firmware", "boot_ms", 0), ("firmware", "boot_ms", 10000),
    ("firmware", "boot_banner", True), ("firmware", "boot_banner", False),
    ("firmware", "boot_banner_baud", 80), ("firmware", "boot_banner_baud", 5_000_000),
    ("ota", "server", ""), ("ota", "server", "http://127.0.0.1:8080"),
    ("ota", "server", "https://updates.example/esp/v2"),
    ("ota", "token", ""), ("ota", "token", "t" * 256),
    ("ota", "max_size", 1), ("ota", "max_size", 4_294_967_296),
    ("ota", "install_command", ""), ("ota", "install_command", "/usr/bin/install-fw --now 'a b'"),
    ("ota", "timeout_ms", 1000), ("ota", "timeout_ms", 3_600_000),
    ("dns", "hosts", {}), ("dns", "hosts", {"example.com": ["127.0.0.2", "::1"], "a.test": "127.0.0.1"}),
    ("dns", "hosts_file", ""), ("dns", "hosts_file", "/etc/hosts"),
    ("sntp", "source", "servers"), ("sntp", "source", "host"),
    ("watchdog", "heartbeat_ms", 100), ("watchdog", "heartbeat_ms", 60_000),
    ("watchdog", "missed_heartbeats", 1), ("watchdog", "missed_heartbeats", 100),
    ("ota", "insecure_http", True), ("ota", "insecure_http", False),
    ("ota", "ca_file", ""), ("ota", "ca_file", "/etc/bridged/ota-ca.pem"),
    ("ota", "public_key", []), ("ota", "public_key", "/etc/bridged/ota.pub"),
    ("ota", "public_key", [f"/etc/bridged/k{i}.pub" for i in range(8)]),
    ("ota", "allow_unsigned", True), ("ota", "allow_unsigned", False),
    ("ota", "allow_downgrade", True), ("ota", "allow_downgrade", False),
    ("ota", "current_version", ""), ("ota", "current_version", "v4.1.2.0"),
    ("ota", "current_version", "A-z.0_9+" + "x" * 56),
    ("ota", "partitions", ["ota"]), ("ota", "partitions", "client_ca"),
    ("ota", "partitions", [f"p{i}" for i in range(15)] + ["_" + "p" * 63]),
]

HOSTS_TABLE = ('a table from host names to an address or a list of addresses (IPv4 or IPv6), '
               'e.g. { "example.com" = ["127.0.0.1", "::1"] }')
HOSTS_PATH = '"" (none) or an absolute path to a readable file in /etc/hosts format'

LINK_RULES = ('a list of at most 256 strings, each "self", an IPv4 or IPv6 address or network '
              '("10.0.0.0/8", "::1", "fd00::/8"), optionally followed by :PORT or :LOW-HIGH '
              '(IPv6 in brackets then: "[::1]/128:8080", "192.168.1.10:1883", "self:1-1023")')
LOCAL_PORTS = 'ports and ranges from 1 to 65535, comma separated, e.g. "1024-65535" or "123,1024-65535"'

# (section, key, value, allowed) for values just outside what is allowed.
OTA_SERVER = '"" (no update server) or an http:// or https:// base URL (ASCII, port 1 to 65535)'
AT_VERSION = ("an ESP-AT version from 2.2.0.0 to 4.1.255.255: four dot-separated numbers 0 to 255 "
              "in ASCII digits, no leading zero")
OTA_CA_FILE = '"" (the system CA store) or an absolute path to a PEM file'
OTA_PUBLIC_KEY = "an absolute path to an Ed25519 public key, or a list of up to 8 distinct ones"
OTA_VERSION = '"" or 1 to 64 of A-Z a-z 0-9 . _ + -'
OTA_PARTITIONS = ("a list of 1 to 16 distinct partition names (1 to 64 of A-Z a-z 0-9 _ . -,"
                  " not starting with . or -)")

REFUSED = [
    ("uart", "port", 5, '"" (create a pseudo-terminal) or a serial device path'),
    ("uart", "pty_link", False, '"" or a path for a symlink to the pty'),
    ("uart", "baud", 79, "an integer from 80 to 5000000"),
    ("uart", "baud", 5_000_001, "an integer from 80 to 5000000"),
    ("uart", "baud", 115200.0, "an integer from 80 to 5000000"),
    ("uart", "baud", "115200", "an integer from 80 to 5000000"),
    ("uart", "baud", True, "an integer from 80 to 5000000"),
    ("uart", "data_bits", 4, "an integer from 5 to 8"),
    ("uart", "data_bits", 9, "an integer from 5 to 8"),
    ("uart", "stop_bits", 0, "1, 2"),
    ("uart", "stop_bits", 3, "1, 2"),
    ("uart", "parity", "odd2", "none, odd, even"),
    ("uart", "parity", "NONE", "none, odd, even"),
    ("uart", "flow_control", "xonxoff", "none, rts, cts, rtscts"),
    ("uart", "urc_gap_ms", -0.1, "a number from 0 to 1000"),
    ("uart", "urc_gap_ms", 1000.5, "a number from 0 to 1000"),
    ("uart", "urc_gap_ms", "5", "a number from 0 to 1000"),
    ("uart", "max_line", 15, "an integer from 16 to 65536"),
    ("uart", "max_line", 65537, "an integer from 16 to 65536"),
    ("uart", "pace", 1, "true, false"),
    ("uart", "pace", "yes", "true, false"),
    ("wifi", "station_interface", "a" * 16, '"" or an interface name of 1 to 15 characters'),
    ("wifi", "ap_interface", "wl an0", '"" or an interface name of 1 to 15 characters'),
    ("wifi", "eth_interface", "../eth0", '"" or an interface name of 1 to 15 characters'),
    ("wifi", "ssid", "", "a string of 1 to 32 bytes"),
    ("wifi", "ssid", "s" * 33, "a string of 1 to 32 bytes"),
    ("wifi", "ssid", "é" * 17, "a string of 1 to 32 bytes"),
    ("wifi", "ssid", "a\nb", "a string of 1 to 32 bytes"),
    ("wifi", "bssid", "aa:bb:cc:dd:ee", '"" or a MAC address aa:bb:cc:dd:ee:ff'),
    ("wifi", "bssid", "aa-bb-cc-dd-ee-ff", '"" or a MAC address aa:bb:cc:dd:ee:ff'),
    ("wifi", "channel", 0, "an integer from 1 to 14"),
    ("wifi", "channel", 15, "an integer from 1 to 14"),
    ("wifi", "rssi", -101, "an integer from -100 to 0"),
    ("wifi", "rssi", 1, "an integer from -100 to 0"),
    ("wifi", "ecn", -1, "an integer from 0 to 8"),
    ("wifi", "ecn", 9, "an integer from 0 to 8"),
    ("wifi", "check_credentials", 1, "true, false"),
    ("wifi", "check_credentials", "yes", "true, false"),
    ("wifi", "password", "p" * 65, "a string of 0 to 64 bytes"),
    ("wifi", "connect_delay_ms", -1, "an integer from 0 to 60000"),
    ("wifi", "connect_delay_ms", 60001, "an integer from 0 to 60000"),
    ("links", "count", 0, "an integer from 1 to 5"),
    ("links", "count", 6, "an integer from 1 to 5"),
    ("links", "cipsend_max", 0, "an integer from 1 to 65536"),
    ("links", "cipsend_max", 65537, "an integer from 1 to 65536"),
    ("links", "recv_window", 535, "an integer from 536 to 1048576"),
    ("links", "recv_window", 1_048_577, "an integer from 536 to 1048576"),
    ("links", "chunk", 0, "an integer from 1 to 65536"),
    ("links", "chunk", 65537, "an integer from 1 to 65536"),
    ("links", "ring_size", 2048, "a power of two from 4096 to 16777216"),
    ("links", "ring_size", 33_554_432, "a power of two from 4096 to 16777216"),
    ("links", "ring_size", 65535, "a power of two from 4096 to 16777216"),
    ("links", "connect_timeout_ms", 0, "an integer from 1 to 600000"),
    ("links", "connect_timeout_ms", 600_001, "an integer from 1 to 600000"),
    ("links", "read_window_ms", -1, "an integer from 0 to 100"),
    ("links", "read_window_ms", 101, "an integer from 0 to 100"),
    ("links", "deny", "127.0.0.0/8", LINK_RULES),
    ("links", "allow", {"self": 1}, LINK_RULES),
    ("links", "local_ports", 1024, LOCAL_PORTS),
    ("log", "level", "trace", "debug, info, warning, error"),
    ("log", "format", "text", "auto, json, console"),
    ("log", "transcript", "false", "true, false"),
    ("log", "transcript_path", "transcript.log", '"" (to the log) or an absolute file path'),
    ("log", "transcript_path", 1, '"" (to the log) or an absolute file path'),
    ("log", "transcript_max_bytes", 4095, "an integer from 4096 to 1099511627776"),
    ("log", "transcript_max_bytes", 1_099_511_627_777, "an integer from 4096 to 1099511627776"),
    ("log", "transcript_files", 0, "an integer from 1 to 100"),
    ("log", "transcript_files", 101, "an integer from 1 to 100"),
    ("state", "dir", "relative/dir", '"" (automatic) or an absolute directory path'),
    ("firmware", "at_version", "4.1.1", AT_VERSION),
    ("firmware", "at_version", "4.1.1.x", AT_VERSION),
    ("firmware", "at_version", "2.1.255.255", AT_VERSION),  # just before 2.2.0.0
    ("firmware", "at_version", "4.1.256.0", AT_VERSION),  # each number is a byte of the core's version
    ("firmware", "at_version", "4.1.99999999999999999999.0", AT_VERSION),
    ("firmware", "at_version", "04.1.1.0", AT_VERSION),  # AT+GMR would print the zero
    ("firmware", "at_version", "4.1.1.00", AT_VERSION),
    ("firmware", "at_version", "4.1.1.0 ", AT_VERSION),
    ("firmware", "at_version", " 4.1.1.0", AT_VERSION),
    ("firmware", "at_version", "4.1.1.0\n", AT_VERSION),
    ("firmware", "at_version", "4.1.1.0.0", AT_VERSION),
    ("firmware", "at_version", "4.1.-1.0", AT_VERSION),
    ("firmware", "at_version", "+4.1.1.0", AT_VERSION),
    ("firmware", "at_version", "4_1.1.1.0", AT_VERSION),  # int() takes underscores
    ("firmware", "at_version", "4.1.1_0.0", AT_VERSION),
    ("firmware", "at_version", "\u0664.1.1.0", AT_VERSION),  # Arabic-Indic 4: int() and \d take it
    ("firmware", "at_version", "\uff14.1.1.0", AT_VERSION),  # fullwidth 4
    ("firmware", "at_version", 4, AT_VERSION),
    ("firmware", "at_version", 4.1, AT_VERSION),
    ("firmware", "at_version", [4, 1, 1, 0], AT_VERSION),
    ("firmware", "at_version", "4.2.0.0", AT_VERSION),
    ("firmware", "at_version", "5.0.1.0", AT_VERSION),  # AT+CIPCONNPERSIST, +ERRNO: not emulated
    ("firmware", "at_version", "1.7.4.0", AT_VERSION),  # ESP8266 NonOS
    ("firmware", "sdk_version", "", "a string of 1 to 64 bytes"),
    ("firmware", "module", "m" * 65, "a string of 1 to 64 bytes"),
    ("firmware", "boot_ms", -1, "an integer from 0 to 10000"),
    ("firmware", "boot_ms", 10001, "an integer from 0 to 10000"),
    ("firmware", "boot_ms", 400.0, "an integer from 0 to 10000"),
    ("firmware", "boot_banner", 1, "true, false"),
    ("firmware", "boot_banner_baud", 79, "an integer from 80 to 5000000"),
    ("ota", "server", "ftp://host/x", OTA_SERVER),
    ("ota", "server", "http://", OTA_SERVER),
    ("ota", "server", "http://h/x?y=1", OTA_SERVER),
    ("ota", "server", "http://u:p@h/", OTA_SERVER),
    ("ota", "server", "http://h:99999", OTA_SERVER),
    ("ota", "server", "http://h /x", OTA_SERVER),
    ("ota", "server", "http://h:0", OTA_SERVER),  # not quietly port 80
    ("ota", "server", "http://h/\u20ac", OTA_SERVER),  # goes into the request line
    ("ota", "server", "http://b\u00fccher.example", OTA_SERVER),
    ("ota", "token", "t" * 257, "0 to 256 printable ASCII characters"),
    ("ota", "token", "t\u20ac", "0 to 256 printable ASCII characters"),  # a header is latin-1 at most
    ("ota", "token", "t\u00e9", "0 to 256 printable ASCII characters"),
    ("ota", "max_size", 0, "an integer from 1 to 4294967296"),
    ("ota", "max_size", 4_294_967_297, "an integer from 1 to 4294967296"),
    ("ota", "install_command", "install 'unclosed", '"" or a command line (shell quoting, no shell features)'),
    ("ota", "install_command", "   ", '"" or a command line (shell quoting, no shell features)'),
    ("ota", "timeout_ms", 999, "an integer from 1000 to 3600000"),
    ("ota", "timeout_ms", 3_600_001, "an integer from 1000 to 3600000"),
    ("dns", "hosts", "127.0.0.1", HOSTS_TABLE),
    ("dns", "hosts", ["example.com", "127.0.0.1"], HOSTS_TABLE),
    ("dns", "hosts_file", "etc/hosts", HOSTS_PATH),
    ("dns", "hosts_file", 1, HOSTS_PATH),
    ("sntp", "source", "ntp", "servers, host"),
    ("watchdog", "heartbeat_ms", 99, "an integer from 100 to 60000"),
    ("watchdog", "missed_heartbeats", 0, "an integer from 1 to 100"),
    ("ota", "insecure_http", "yes", "true, false"),
    ("ota", "ca_file", "ca.pem", OTA_CA_FILE),
    ("ota", "public_key", "ota.pub", OTA_PUBLIC_KEY),
    ("ota", "public_key", [f"/k{i}" for i in range(9)], OTA_PUBLIC_KEY),
    ("ota", "public_key", ["/k", "/k"], OTA_PUBLIC_KEY),
    ("ota", "public_key", [1], OTA_PUBLIC_KEY),
    ("ota", "allow_unsigned", 1, "true, false"),
    ("ota", "allow_downgrade", "false", "true, false"),
    ("ota", "current_version", "v" * 65, OTA_VERSION),
    ("ota", "current_version", "$(id)", OTA_VERSION),
    ("ota", "current_version", "../v1", OTA_VERSION),
    ("ota", "current_version", "v1\nx", OTA_VERSION),
    ("ota", "partitions", [], OTA_PARTITIONS),
    ("ota", "partitions", ["ota", "ota"], OTA_PARTITIONS),
    ("ota", "partitions", ["../nvs"], OTA_PARTITIONS),
    ("ota", "partitions", [".hidden"], OTA_PARTITIONS),
    ("ota", "partitions", ["p" * 65], OTA_PARTITIONS),
    ("ota", "partitions", [f"p{i}" for i in range(17)], OTA_PARTITIONS),
    ("ota", "partitions", 5, OTA_PARTITIONS),
]
SECRET = {("ota", "token"), ("wifi", "password")}


def _as_toml(value: object) -> object:
    """A stored [dns] value as the TOML that gave it (others are stored as given)."""
    if isinstance(value, HostsFile):
        return value.path
    if isinstance(value, HostTable):
        return {name: list(addresses) for name, addresses in value.entries}
    return value


@pytest.mark.parametrize(("section", "key", "value"), ACCEPTED)
def test_edge_value_accepted_from_file(tmp_path, section, key, value):
    """A value at the edge of a key's range loads from a file and is kept."""
    path = write(tmp_path, f"[{section}]\n{key} = {toml_value(value)}\n")
    config = load_config(str(path), None, {})
    stored = _as_toml(getattr(getattr(config, section), key))
    if isinstance(value, dict):  # one address may be given without a list
        value = {name: addresses if isinstance(addresses, list) else [addresses] for name, addresses in value.items()}
    if isinstance(stored, tuple):  # list keys: a lone string is a list of one; kept as a tuple
        value = (value,) if isinstance(value, str) else tuple(value)
    assert stored == value


@pytest.mark.parametrize(("section", "key", "value", "allowed"), REFUSED)
def test_out_of_range_refused_from_file(tmp_path, section, key, value, allowed):
    """A value just outside a key's range names the file, the key and what is allowed."""
    path = write(tmp_path, f"[{section}]\n{key} = {toml_value(value)}\n")
    shown = repr(value) if not isinstance(value, bool) else toml_value(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if (section, key) in SECRET_KEYS:
        shown = "the value given (secret, not shown)"
    with pytest.raises(ConfigError) as info:
        load_config(str(path), None, {})
    assert str(info.value) == (
        f"{path}: {section}.{key}: {shown} is not allowed; allowed: {allowed}")


def _parsed_on_command_line(section: str, key: str, value: object) -> bool:
    kind = type(getattr(getattr(default_config(), section), key))
    return isinstance(value, str) and kind is not str


# Strings given for integer, number and boolean keys are parsed on the command
# line ("115200" is fine there), so those rows do not apply to it.
REFUSED_ON_COMMAND_LINE = [row for row in REFUSED if not _parsed_on_command_line(*row[:3])]


@pytest.mark.parametrize(("section", "key", "value", "allowed"), REFUSED_ON_COMMAND_LINE)
def test_out_of_range_refused_from_command_line(section, key, value, allowed):
    """An override is validated the same way, with "command line" as its source."""
    with pytest.raises(ConfigError) as info:
        load_config(None, None, {f"{section}.{key}": value})
    message = str(info.value)
    assert message.startswith(f"command line: {section}.{key}: ")
    assert message.endswith(f" is not allowed; allowed: {allowed}")


def test_parity_message_shape(tmp_path):
    """The message reads exactly as documented."""
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "bridged.toml").write_text('[uart]\nparity = "odd2"\n')
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ConfigError) as info:
            load_config("config/bridged.toml", None, {})
    finally:
        os.chdir(cwd)
    assert str(info.value) == (
        "config/bridged.toml: uart.parity: 'odd2' is not allowed; allowed: none, odd, even")


def test_every_key_is_covered():
    """The tables above exercise every key of every section."""
    sections = {"uart": UartConfig, "wifi": WifiConfig, "links": LinksConfig,
                "log": LogConfig, "state": StateConfig, "firmware": FirmwareConfig,
                "ota": OtaConfig, "dns": DnsConfig, "sntp": SntpConfig, "watchdog": WatchdogConfig}
    every = {(s, f.name) for s, cls in sections.items() for f in dataclasses.fields(cls)}
    assert {(s, k) for s, k, _ in ACCEPTED} == every
    assert {(s, k) for s, k, _, _ in REFUSED} == every


# --------------------------------------------------------------------------
# Defaults, types, normalisation.


def test_defaults_are_esp_at():
    """Without files, the configuration is real ESP-AT's factory defaults."""
    config = default_config()
    assert config.uart == UartConfig(port="", pty_link="", baud=115200, data_bits=8,
                                     stop_bits=1, parity="none", flow_control="rts",
                                     urc_gap_ms=5.0, max_line=256)
    assert (config.links.count, config.links.cipsend_max, config.links.recv_window,
            config.links.chunk, config.links.ring_size,
            config.links.connect_timeout_ms) == (5, 8192, 5760, 2920, 65536, 10000)
    assert config.wifi.ssid == "bridged"
    assert config.firmware.at_version == "4.1.1.0"
    assert (config.firmware.boot_ms, config.firmware.boot_banner, config.firmware.boot_banner_baud) == (
        400, False, 115200)  # an ESP32's boot; its ROM banner is on UART0, at 115200
    assert config.log == LogConfig(level="info", format="auto", transcript=False)
    assert config.state.dir == ""
    assert config.ota == OtaConfig(server="", token="", max_size=16_777_216, install_command="",
                                   timeout_ms=180_000, insecure_http=False, ca_file="", public_key=(),
                                   allow_unsigned=False, allow_downgrade=False, current_version="",
                                   partitions=("ota",))
    assert config.sntp == SntpConfig(source="servers")


def test_config_is_frozen():
    """Code holding a Config cannot change it."""
    config = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.uart.baud = 9600  # type: ignore[misc]


def test_integer_number_becomes_float(tmp_path):
    """urc_gap_ms = 5 (a TOML integer) is stored as 5.0."""
    config = load_config(str(write(tmp_path, "[uart]\nurc_gap_ms = 5\n")), None, {})
    assert config.uart.urc_gap_ms == 5.0
    assert isinstance(config.uart.urc_gap_ms, float)


def test_bssid_lowercased(tmp_path):
    """A BSSID in capitals is normalised to lower case."""
    path = write(tmp_path, '[wifi]\nbssid = "AA:BB:CC:0D:EE:FF"\n')
    assert load_config(str(path), None, {}).wifi.bssid == "aa:bb:cc:0d:ee:ff"


def test_ota_server_trailing_slash_dropped():
    """A base URL ending in / gives the same request paths as without it."""
    config = load_config(None, None, {"ota.server": "http://127.0.0.1:8080/esp/"})
    assert config.ota.server == "http://127.0.0.1:8080/esp"


SECRET_KEYS = {("wifi", "password"), ("ota", "token")}


@pytest.mark.parametrize(("section", "key", "value"), [
    ("wifi", "password", "Zq9-wifi-SECRET-" * 5),  # too long
    ("wifi", "password", "Zq9-wifi-SECRET\x07"),  # a control character
    ("ota", "token", "Zq9-ota-SECRET-\u20ac"),  # not ASCII
    ("ota", "token", ["Zq9-ota-SECRET"]),  # not a string
])
def test_a_refused_secret_is_named_never_shown(tmp_path, section, key, value):
    """A malformed password or token is refused naming the file and the key, never showing the value."""
    path = write(tmp_path, f"[{section}]\n{key} = {toml_value(value)}\n")
    for source, overrides in ((str(path), {}), (None, {f"{section}.{key}": value})):
        with pytest.raises(ConfigError) as info:
            load_config(source, None, overrides)
        message = str(info.value)
        assert "Zq9" not in message and "SECRET" not in message
        assert f"{section}.{key}: the value given (secret, not shown) is not allowed; allowed: " in message


def test_secret_keys_are_the_ones_declared_secret():
    """The test's list of secret keys is the config's (a new secret key gets the same tests)."""
    config = default_config()
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    declared = {(name, f.name) for name, section in sections.items() if dataclasses.is_dataclass(section)
                for f in dataclasses.fields(section) if not f.repr}
    assert declared == SECRET_KEYS


def test_ota_token_not_in_repr():
    """The update server's token never shows in a logged config."""
    config = load_config(None, None, {"ota.token": "s3cret-token"})
    assert config.ota.token == "s3cret-token"
    assert "s3cret-token" not in repr(config)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("ota", "token", "S3CRET-" + "x" * 300),
    ("ota", "token", "S3CRET-\u00e9"),
    ("ota", "token", "S3CRET-\x01tab"),
    ("wifi", "password", "S3CRET-" + "p" * 64),
])
def test_malformed_secret_is_never_echoed(tmp_path, section, key, value):
    """A secret the config refuses is named by key, never shown (the error reaches logs,
    reload_refused and bridged check); from a file and from the command line."""
    path = write(tmp_path, f"[{section}]\n{key} = {toml_value(value)}\n")
    for args in ((str(path), None, {}), (None, None, {f"{section}.{key}": value})):
        with pytest.raises(ConfigError) as info:
            load_config(*args)
        assert "S3CRET" not in str(info.value)
        assert str(info.value).endswith(f"{section}.{key}: the value given (secret, not shown) is not allowed;"
                                        f" allowed: {'0 to 256 printable ASCII characters' if key == 'token' else 'a string of 0 to 64 bytes'}")


def test_ota_lists_are_tuples_and_shown_as_toml(tmp_path):
    """public_key and partitions load as tuples (frozen) and bridged check prints TOML arrays."""
    path = write(tmp_path, '[ota]\npublic_key = ["/a.pub", "/b.pub"]\npartitions = "ota"\n')
    config = load_config(str(path), None, {})
    assert config.ota.public_key == ("/a.pub", "/b.pub") and config.ota.partitions == ("ota",)
    text = config_module.to_toml(config)
    assert 'public_key = ["/a.pub", "/b.pub"]' in text and 'partitions = ["ota"]' in text
    assert load_config(str(write(tmp_path, text, "again.toml")), None, {}).ota == config.ota


def test_password_not_in_repr(tmp_path):
    """The Wi-Fi password never shows in a logged config."""
    config = load_config(None, None, {"wifi.password": "hunter22"})
    assert config.wifi.password == "hunter22"
    assert "hunter22" not in repr(config)


# --------------------------------------------------------------------------
# Unknown keys and sections, syntax errors, unreadable files.


def test_unknown_key(tmp_path):
    """An unknown key lists the keys of its section."""
    path = write(tmp_path, "[uart]\nbaudrate = 9600\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), None, {})
    assert str(info.value) == (
        f"{path}: uart.baudrate: unknown key; allowed: port, pty_link, baud, data_bits, "
        "stop_bits, parity, flow_control, urc_gap_ms, max_line, pace")


def test_unknown_section(tmp_path):
    """An unknown section lists the allowed sections."""
    path = write(tmp_path, "[serial]\nbaud = 9600\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), None, {})
    assert str(info.value) == (
        f"{path}: serial: unknown section; allowed: profile, uart, wifi, links, log, "
        "state, firmware, ota, dns, sntp, watchdog, faults")


def test_unknown_top_level_key(tmp_path):
    """A bare key outside any section is refused too."""
    path = write(tmp_path, "baud = 9600\n")
    with pytest.raises(ConfigError, match=r": baud: unknown key; allowed: profile, uart"):
        load_config(str(path), None, {})


def test_section_must_be_a_table(tmp_path):
    """uart = 5 is refused: a section is a table."""
    path = write(tmp_path, "uart = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), None, {})
    assert str(info.value) == f"{path}: uart: 5 is not allowed; allowed: a table [uart]"


def test_unknown_key_in_profile(tmp_path):
    """A profile is checked like a config file, without the profile key."""
    profile = write(tmp_path, "profile = 'x'\n", "p.toml")
    with pytest.raises(ConfigError) as info:
        load_config(None, str(profile), {})
    assert str(info.value).startswith(f"{profile}: profile: unknown key; allowed: uart, ")


def test_syntax_error_names_line(tmp_path):
    """A TOML syntax error gives the file and the line."""
    path = write(tmp_path, '[uart]\nbaud = 9600\nparity = \n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), None, {})
    assert str(info.value).startswith(f"{path}: line 3, column ")
    assert "TOML syntax error" in str(info.value)


def test_duplicate_table_names_line(tmp_path):
    """A table declared twice is a syntax error on its second line."""
    path = write(tmp_path, "[uart]\nbaud = 9600\n\n[uart]\n")
    with pytest.raises(ConfigError, match=r": line 4, column \d+: TOML syntax error: "):
        load_config(str(path), None, {})


def test_not_utf8_names_line(tmp_path):
    """Bytes that are not UTF-8 are refused with their line."""
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[uart]\nport = \"\xff\"\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: line 2: not UTF-8 text"):
        load_config(str(path), None, {})


def test_missing_config_file(tmp_path):
    """A config file that does not exist is named in the error."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path), None, {})
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


# --------------------------------------------------------------------------
# Profiles.


def test_default_profile_is_esp32():
    """Without --profile, the shipped esp32 profile is applied."""
    config = load_config(None, None, {})
    assert config.profile == "esp32"
    assert config.sources == (str(REPO / "config" / "profiles" / "esp32.toml"),)
    assert dataclasses.replace(config, sources=()) == default_config()


def test_profile_by_name_from_repo():
    """A profile name finds config/profiles/NAME.toml beside the package."""
    config = load_config(None, "fast", {})
    assert config.profile == "fast"
    assert config.uart.baud == 3_000_000
    assert config.uart.flow_control == "rtscts"
    assert config.uart.urc_gap_ms == 0.0
    assert config.links.ring_size == 1 << 20


def test_profile_by_path(tmp_path):
    """A profile given as a path to a .toml file is read from there."""
    path = write(tmp_path, "[uart]\nbaud = 9600\n", "slow.toml")
    config = load_config(None, str(path), {})
    assert config.uart.baud == 9600
    assert config.sources == (str(path),)


def test_profile_path_env_searched_first(tmp_path, monkeypatch):
    """$BRIDGED_PROFILE_PATH directories come before the shipped ones."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (second / "esp32.toml").write_text("[uart]\nbaud = 9600\n")
    (second / "lab.toml").write_text("[uart]\nbaud = 19200\n")
    monkeypatch.setenv("BRIDGED_PROFILE_PATH", f"{first}::{second}")
    assert profile_dirs()[:2] == [first, second]
    assert find_profile("lab") == second / "lab.toml"
    assert load_config(None, None, {}).uart.baud == 9600


def test_profile_search_order(monkeypatch):
    """Names are looked up in /etc, then the source tree, then sys.prefix, then the user base."""
    import site
    import sys

    monkeypatch.delenv("BRIDGED_CONFIG_DIR")
    dirs = profile_dirs()
    assert dirs == [Path("/etc/bridged/profiles"), REPO / "config" / "profiles",
                    Path(sys.prefix) / "share" / "bridged" / "profiles",
                    Path(site.getuserbase()) / "share" / "bridged" / "profiles"]


def test_unknown_profile_name():
    """An unknown profile name says where it was looked for."""
    with pytest.raises(ConfigError) as info:
        load_config(None, "nosuch", {})
    message = str(info.value)
    assert message.startswith("command line: profile: 'nosuch' not found; allowed: ")
    assert str(REPO / "config" / "profiles") in message


def test_missing_profile_path(tmp_path):
    """A profile path that does not exist is an error."""
    with pytest.raises(ConfigError, match=r"profile: '.*nosuch\.toml': no such file"):
        load_config(None, str(tmp_path / "nosuch.toml"), {})


def test_profile_name_refused():
    """A profile name with odd characters is refused, not looked up."""
    with pytest.raises(ConfigError, match=r"^command line: profile: 'a b' is not allowed"):
        load_config(None, "a b", {})


def test_missing_default_profile_falls_back(tmp_path, monkeypatch):
    """When esp32.toml is nowhere, the built-in defaults (the same values) apply."""
    monkeypatch.setenv("BRIDGED_CONFIG_DIR", str(tmp_path / "etc"))
    monkeypatch.setattr(config_paths, "_REPO_PROFILE_DIR", tmp_path / "repo")
    monkeypatch.setattr(config_paths.sys, "prefix", str(tmp_path / "prefix"))
    monkeypatch.setattr(config_paths.site, "USER_BASE", str(tmp_path / "user"))
    config = load_config(None, None, {})
    assert config.sources == ()
    assert config == default_config()
    with pytest.raises(ConfigError, match="'esp32' not found"):
        load_config(None, "esp32", {})


def test_profile_key_in_config_file(tmp_path):
    """The config file's profile key is used when --profile is not given."""
    path = write(tmp_path, 'profile = "fast"\n[uart]\nbaud = 921600\n')
    config = load_config(str(path), None, {})
    assert config.profile == "fast"
    assert config.uart.baud == 921600  # the file over the profile
    assert config.uart.flow_control == "rtscts"  # the profile over the defaults
    assert load_config(str(path), "esp32", {}).uart.flow_control == "rts"


def test_profile_path_relative_to_config_file(tmp_path):
    """A relative profile path in the config file is relative to that file."""
    (tmp_path / "profiles").mkdir()
    write(tmp_path, "[uart]\nbaud = 57600\n", "profiles/mine.toml")
    path = write(tmp_path, 'profile = "profiles/mine.toml"\n')
    assert load_config(str(path), None, {}).uart.baud == 57600


def test_bad_profile_key_in_config_file(tmp_path):
    """profile = 5 is refused naming the config file."""
    path = write(tmp_path, "profile = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), None, {})
    assert str(info.value) == (f"{path}: profile: 5 is not allowed; allowed: "
                               "a profile name or a path to a .toml file")


# --------------------------------------------------------------------------
# Layering and overrides.


def test_layering_order(tmp_path):
    """defaults <- profile <- config file <- command line, key by key."""
    profile = write(tmp_path, "[uart]\nbaud = 9600\ndata_bits = 7\nparity = 'even'\n",
                    "p.toml")
    path = write(tmp_path, "[uart]\ndata_bits = 6\nparity = 'odd'\n")
    config = load_config(str(path), str(profile), {"uart.parity": "none"})
    assert (config.uart.baud, config.uart.data_bits, config.uart.parity,
            config.uart.stop_bits) == (9600, 6, "none", 1)
    assert config.sources == (str(profile), str(path), "command line")


def test_overrides_parse_strings():
    """Command-line strings are parsed for integer, number and boolean keys."""
    config = load_config(None, None, {"uart.baud": "921600", "uart.urc_gap_ms": "2.5",
                                      "wifi.check_credentials": "true",
                                      "wifi.rssi": "-60", "uart.port": "/dev/ttyAMA0"})
    assert config.uart.baud == 921600
    assert config.uart.urc_gap_ms == 2.5
    assert config.wifi.check_credentials is True
    assert config.wifi.rssi == -60
    assert config.uart.port == "/dev/ttyAMA0"


def test_overrides_none_skipped():
    """An option left unset on the command line (None) changes nothing."""
    config = load_config(None, None, {"uart.port": None})
    assert config.uart.port == ""
    assert "command line" not in config.sources


def test_override_unknown_key():
    """An unknown override key lists the keys of its section."""
    with pytest.raises(ConfigError, match=r"^command line: uart\.bogus: unknown key; "
                                          r"allowed: port, pty_link, baud"):
        load_config(None, None, {"uart.bogus": 1})


def test_override_unknown_section():
    """An override without a known section lists the sections."""
    with pytest.raises(ConfigError) as info:
        load_config(None, None, {"baud": 9600})
    assert str(info.value) == (
        "command line: baud: unknown key; allowed: uart.<key>, wifi.<key>, links.<key>, "
        "log.<key>, state.<key>, firmware.<key>, ota.<key>, dns.<key>, sntp.<key>, watchdog.<key>, "
            "faults.<key>")


def test_override_unparsable_string():
    """A string that does not parse is shown as given."""
    with pytest.raises(ConfigError) as info:
        load_config(None, None, {"uart.baud": "fast"})
    assert str(info.value) == ("command line: uart.baud: 'fast' is not allowed; "
                               "allowed: an integer from 80 to 5000000")


# --------------------------------------------------------------------------
# Shipped files.


def test_shipped_example_loads():
    """config/bridged.toml loads and, all commented out, changes nothing."""
    path = REPO / "config" / "bridged.toml"
    config = load_config(str(path), None, {})
    assert dataclasses.replace(config, sources=()) == default_config()


def test_shipped_example_documents_every_key():
    """Each key appears in config/bridged.toml with its default."""
    text = (REPO / "config" / "bridged.toml").read_text()
    defaults = default_config()
    for section in ("uart", "wifi", "links", "log", "state", "firmware", "ota", "dns", "sntp", "watchdog"):
        assert f"[{section}]" in text
        for f in dataclasses.fields(getattr(defaults, section)):
            value = _as_toml(getattr(getattr(defaults, section), f.name))
            assert f"# {f.name} = {toml_value(value)}" in text, (section, f.name)


def test_readme_names_every_key():
    """README.md names each key of every section (and [faults] seed) as code, so none goes undocumented there."""
    text = (REPO / "README.md").read_text()
    defaults = default_config()
    for section in ("uart", "wifi", "links", "log", "state", "firmware", "ota", "dns", "sntp", "watchdog"):
        for f in dataclasses.fields(getattr(defaults, section)):
            assert re.search(rf"`{f.name}\b|`\[{section}\] {f.name}\b|{section}\.{f.name}\b", text), (section, f.name)
    assert "`seed`" in text


def test_example_uncommented_loads(tmp_path):
    """Uncommenting every key of the example gives a valid file of defaults."""
    lines = []
    for line in (REPO / "config" / "bridged.toml").read_text().splitlines():
        stripped = line.removeprefix("# ")
        key = stripped.split("=", 1)[0].strip()
        if "=" in stripped and key.isidentifier() and not line.startswith("#   "):
            lines.append(stripped)
        else:
            lines.append(line)
    path = write(tmp_path, "\n".join(lines) + "\n")
    config = load_config(str(path), None, {})
    assert dataclasses.replace(config, sources=()) == default_config()


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_shipped_profiles_load(profile):
    """Every shipped profile loads by name and by path."""
    by_name = load_config(None, profile.stem, {})
    by_path = load_config(None, str(profile), {})
    assert dataclasses.replace(by_name, profile="", sources=()) == \
        dataclasses.replace(by_path, profile="", sources=())


def test_esp32_profile_is_the_defaults():
    """The esp32 profile states the built-in defaults, nothing else."""
    config = load_config(None, str(REPO / "config" / "profiles" / "esp32.toml"), {})
    assert dataclasses.replace(config, profile="esp32", sources=()) == default_config()


def test_esp32_paces_fast_does_not():
    """The esp32 profile paces the pty at the line rate; the fast profile keeps it as fast as it goes."""
    assert load_config(None, "esp32", {}).uart.pace is True
    assert load_config(None, "fast", {}).uart.pace is False


FIRMWARE_PROFILES = [p for p in PROFILES if p.stem.startswith("esp-at-")]


@pytest.mark.parametrize("profile", FIRMWARE_PROFILES, ids=[p.stem for p in FIRMWARE_PROFILES])
def test_firmware_profiles_repeat_the_esp32_keys(profile):
    """An esp-at-X.Y profile has every esp32 key, the same values but the
    firmware version it is named after and its SDK version."""
    esp32 = tomllib.loads((REPO / "config" / "profiles" / "esp32.toml").read_text())
    mine = tomllib.loads(profile.read_text())
    assert {s: set(t) for s, t in mine.items()} == {s: set(t) for s, t in esp32.items()}
    assert mine["firmware"]["at_version"].startswith(profile.stem.removeprefix("esp-at-") + ".")
    for section, table in esp32.items():
        for key, value in table.items():
            if (section, key) not in (("firmware", "at_version"), ("firmware", "sdk_version")):
                assert mine[section][key] == value, (section, key)


# --------------------------------------------------------------------------
# State directory.


@pytest.fixture
def no_system_state(tmp_path, monkeypatch):
    """Keep state_dir away from the real /var/lib/bridged."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    system = tmp_path / "var" / "lib" / "bridged"
    monkeypatch.setattr(config_paths, "_SYSTEM_STATE_DIR", system)
    return system


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_dir_from_config(tmp_path, no_system_state, monkeypatch):
    """[state] dir wins and is created with mode 0700."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "systemd"))
    wanted = tmp_path / "mine" / "state"
    config = load_config(None, None, {"state.dir": str(wanted)})
    assert state_dir(config) == wanted
    assert mode(wanted) == 0o700


def test_state_dir_from_systemd(tmp_path, no_system_state, monkeypatch):
    """$STATE_DIRECTORY (its first entry) is used when the config says nothing."""
    first, second = tmp_path / "s1", tmp_path / "s2"
    monkeypatch.setenv("STATE_DIRECTORY", f"{first}:{second}")
    assert state_dir(default_config()) == first
    assert first.is_dir() and not second.exists()


def test_state_dir_system(no_system_state):
    """Else the system directory, created when it can be."""
    assert state_dir(default_config()) == no_system_state
    assert mode(no_system_state) == 0o700


def test_state_dir_home_fallback(tmp_path, no_system_state, monkeypatch):
    """When the system directory cannot be made, ~/.local/state/bridged is used."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(config_paths, "_SYSTEM_STATE_DIR", blocker / "bridged")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".local" / "state" / "bridged"
    assert state_dir(default_config()) == expected
    assert mode(expected) == 0o700


def test_state_dir_xdg_state_home(tmp_path, no_system_state, monkeypatch):
    """$XDG_STATE_HOME replaces ~/.local/state when set."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(config_paths, "_SYSTEM_STATE_DIR", blocker / "bridged")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir(default_config()) == tmp_path / "xdg" / "bridged"


def test_config_type_exports():
    """Config holds one dataclass per section plus the profile and sources."""
    names = [f.name for f in dataclasses.fields(Config)]
    assert names == ["uart", "wifi", "links", "log", "state", "firmware", "ota", "dns", "sntp", "watchdog",
                     "faults", "profile", "sources", "instance", "origins", "profile_file"]


# --------------------------------------------------------------------------
# [dns] hosts and hosts_file (the parsers themselves: tests/net/test_hosts.py).


def test_dns_hosts_mistakes_name_the_key_and_the_entry(tmp_path):
    """A bad entry of [dns] hosts names the file, the key, the entry and what is allowed."""
    path = write(tmp_path, '[dns.hosts]\n"example.com" = ["127.0.0.1", "127.0.0.256"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), None, {})
    assert str(info.value) == (f"{path}: dns.hosts: entry 'example.com': '127.0.0.256' is not an IPv4 or "
                               "IPv6 address; allowed: an IPv4 address (dotted quad) or an IPv6 address, not "
                               "IPv4-mapped; an IPv6 zone names an interface: 1 to 15 letters, digits, '.', "
                               "'-' or '_' (fe80::1%eth0)")


def test_dns_hosts_file_mistakes_name_the_file_and_line(tmp_path):
    """A malformed line names the config file, the key, the hosts file and the line; so does a missing file."""
    hosts = tmp_path / "hosts"
    hosts.write_text("# bench\n127.0.0.1 ok.test\n127.0.0.1 not..ok\n")
    path = write(tmp_path, f'[dns]\nhosts_file = "{hosts}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), None, {})
    assert str(info.value).startswith(f"{path}: dns.hosts_file: {hosts}, line 3: 'not..ok' is not a host "
                                      "name; allowed: a host name: labels of 1 to 63 letters")
    hosts.unlink()
    with pytest.raises(ConfigError) as info:
        load_config(str(path), None, {})
    assert str(info.value) == (f"{path}: dns.hosts_file: {hosts}: cannot read: No such file or directory; "
                               f"allowed: {HOSTS_PATH}")


def test_an_edited_hosts_file_is_a_changed_key(tmp_path):
    """The file's table is part of the value, so a reload of the same path sees an edit (and only then)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 example.com\n")
    path = write(tmp_path, f'[dns]\nhosts_file = "{hosts}"\n')
    before = load_config(str(path), None, {})
    assert changed_keys(before, load_config(str(path), None, {})) == []
    hosts.write_text("127.0.0.2 example.com\n")
    after = load_config(str(path), None, {})
    assert changed_keys(before, after) == ["dns.hosts_file"]
    assert after.dns.hosts_file.table.as_dict() == {"example.com": ("127.0.0.2",)}


def test_dns_keys_print_as_toml_that_loads_back(tmp_path):
    """`bridged check`'s printout of [dns] loads back to the same table and file."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 a.test\n")
    path = write(tmp_path, f'[dns]\nhosts = {{ "Example.com" = ["127.0.0.2", "::1"], "t.test" = "127.0.0.1" }}\n'
                           f'hosts_file = "{hosts}"\n')
    config = load_config(str(path), None, {})
    printed = to_toml(config)
    assert 'hosts = { "example.com" = ["127.0.0.2", "::1"], "t.test" = ["127.0.0.1"] }' in printed
    again = load_config(str(write(tmp_path, printed, "printed.toml")), None, {})
    assert again.dns == config.dns


# --------------------------------------------------------------------------
# [links] allow / deny / local_ports: a bad entry is named with the syntax.

BAD_ENTRIES = [
    ("deny", ["self", "10.0.0.1/8"], "entry 2 '10.0.0.1/8': 10.0.0.1/8 has host bits set (write 10.0.0.0/8)"),
    ("deny", ["::ffff:127.0.0.1"], "entry 1 '::ffff:127.0.0.1': an IPv4-mapped network is the IPv4 one: "
                                   "write 127.0.0.1/32"),
    ("deny", ["127.1"], "entry 1 '127.1': '127.1' is not an IPv4 address (write 127.0.0.1)"),
    ("allow", ["1.2.3.4:90-80"], "entry 1 '1.2.3.4:90-80': ports '90-80': need 0 <= LOW <= HIGH <= 65535"),
    ("allow", ["1.2.3.4:65536"], "entry 1 '1.2.3.4:65536': ports '65536': need 0 <= LOW <= HIGH <= 65535"),
    ("deny", ["[::1]/129"], "entry 1 '[::1]/129': prefix /129 is out of range (0 to 128)"),
    ("deny", ["[::1]:"], "entry 1 '[::1]:': ports '' are not PORT or LOW-HIGH"),
    ("deny", ["::1:80:x"], "entry 1 '::1:80:x': '::1:80:x' is not an IPv6 address"),
    ("deny", ["fe80::1%eth0"], "entry 1 'fe80::1%eth0': an IPv6 zone (%...) is not allowed in a rule"),
    ("deny", ["gateway.local"], "entry 1 'gateway.local': 'gateway.local' is not an IPv4 address"),
    ("deny", ["self:"], "entry 1 'self:': ports '' are not PORT or LOW-HIGH"),
    ("deny", [" 10.0.0.0/8"], "entry 1 ' 10.0.0.0/8': ' 10.0.0.0' is not an IPv4 address"),
    ("allow", [1883], "entry 1 1883: 1883 is not a string"),
    ("deny", ["10.0.0.0/8"] * 257, "257 entries, at most 256"),
]


@pytest.mark.parametrize(("key", "entries", "problem"), BAD_ENTRIES)
def test_bad_link_rule_names_file_key_entry_and_syntax(tmp_path, key, entries, problem):
    """A malformed allow/deny entry is a config error naming the file, the key, the entry and the syntax."""
    path = write(tmp_path, f"[links]\n{key} = {toml_value(entries)}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), None, {})
    assert str(info.value) == f"{path}: links.{key}: {problem}; allowed: {LINK_RULES}"


@pytest.mark.parametrize(("value", "problem"), [
    ("0-1023", "'0-1023': port 0 is not a local port (0 asks for any free one, always allowed)"),
    ("1024-", "'1024-': ports '1024-' are not PORT or LOW-HIGH"),
    ("2000-1024", "'2000-1024': ports '2000-1024': need 0 <= LOW <= HIGH <= 65535"),
    ("", "'': '' is not a list of ports"),
    ("1024-65536", "'1024-65536': ports '1024-65536': need 0 <= LOW <= HIGH <= 65535"),
])
def test_bad_local_ports_names_the_problem(tmp_path, value, problem):
    """A malformed local_ports is a config error naming the file, the key and the syntax."""
    path = write(tmp_path, f"[links]\nlocal_ports = {toml_value(value)}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), None, {})
    assert str(info.value) == f"{path}: links.local_ports: {problem}; allowed: {LOCAL_PORTS}"


def test_shipped_gateway_config_fences_the_gateway():
    """config/gateway.toml loads and denies loopback, the host, link-local and metadata addresses."""
    from bridged.net.localaddr import link_policy

    links = load_config(str(REPO / "config" / "gateway.toml"), None, {}).links
    policy = link_policy(links.allow, links.deny, links.local_ports)
    for address in ("127.0.0.1", "127.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "169.254.169.254",
                    "fd00:ec2::254", "fe80::1", "169.254.1.1"):
        assert policy.check(address, 80) is not None, address
    assert policy.check("192.0.2.10", 1883) is None
    assert links.local_ports == "1024-65535"


# --------------------------------------------------------------------------
# System files (/etc/bridged, relocated by $BRIDGED_CONFIG_DIR) and instances.


@pytest.fixture
def etc(tmp_path, monkeypatch):
    """A system config directory of the test's own."""
    directory = tmp_path / "etc-bridged"
    directory.mkdir()
    monkeypatch.setenv("BRIDGED_CONFIG_DIR", str(directory))
    return directory


def test_system_files_layer_in_order(etc):
    """bridged.toml, then <instance>.toml over it, then the command line; each source listed."""
    base = write(etc, '[uart]\nbaud = 9600\n[wifi]\nssid = "base"\n')
    mine = write(etc, "[uart]\nbaud = 19200\n", "ttyAMA0.toml")
    write(etc, "[uart]\nbaud = 38400\n", "ttyUSB0.toml")  # another board's
    config = load_config(None, None, {"wifi.ssid": "cli"}, instance="ttyAMA0", system=True)
    assert config.uart.baud == 19200
    assert config.wifi.ssid == "cli"
    assert config.instance == "ttyAMA0"
    assert config.sources[1:] == (str(base), str(mine), "command line")
    alone = load_config(None, None, {}, system=True)
    assert (alone.uart.baud, alone.wifi.ssid, alone.instance) == (9600, "base", "")


def test_instance_file_without_base_file(etc):
    """An instance file applies even when bridged.toml is absent; neither is required."""
    write(etc, "[uart]\nbaud = 19200\n", "ttyAMA0.toml")
    assert load_config(None, None, {}, instance="ttyAMA0", system=True).uart.baud == 19200
    assert load_config(None, None, {}, instance="ttyS1", system=True).uart.baud == 115200


def test_system_files_only_when_asked(etc):
    """Library callers (system=False, the default) get no system file."""
    write(etc, "[uart]\nbaud = 9600\n")
    assert load_config(None, None, {}).uart.baud == 115200


def test_config_option_replaces_system_files(etc, tmp_path):
    """--config FILE is the only config file: bridged.toml and <instance>.toml are not read."""
    write(etc, '[uart]\nbaud = 9600\n[wifi]\nssid = "base"\n')
    write(etc, "[uart]\nbaud = 19200\n", "ttyAMA0.toml")
    mine = write(tmp_path, "[uart]\nbaud = 57600\n", "mine.toml")
    config = load_config(str(mine), None, {}, instance="ttyAMA0", system=True)
    assert (config.uart.baud, config.wifi.ssid) == (57600, "bridged")
    assert config.sources[1:] == (str(mine),)
    assert config.instance == "ttyAMA0"  # the state directory is still the instance's


def test_system_file_errors_name_the_file(etc):
    """A bad key or bad TOML in a system file is an error naming that file."""
    write(etc, "[uart]\nbaud = 9600\n")
    bad = write(etc, '[uart]\nparity = "odd2"\n', "ttyAMA0.toml")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: uart\.parity: 'odd2' is not allowed"):
        load_config(None, None, {}, instance="ttyAMA0", system=True)
    write(etc, "[uart\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(etc / 'bridged.toml'))}: line 1"):
        load_config(None, None, {}, system=True)


def test_unreadable_system_file_is_an_error(etc):
    """A present but unreadable bridged.toml (here a dangling symlink) is an error, not skipped."""
    (etc / "bridged.toml").symlink_to(etc / "nowhere.toml")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(etc / 'bridged.toml'))}: cannot read"):
        load_config(None, None, {}, system=True)


def test_profile_key_of_the_last_system_file_wins(etc):
    """bridged.toml may name a profile and an instance file another; the instance's applies."""
    write(etc, 'profile = "fast"\n')
    write(etc, 'profile = "esp32"\n', "ttyAMA0.toml")
    assert load_config(None, None, {}, system=True).uart.baud == 3_000_000
    config = load_config(None, None, {}, instance="ttyAMA0", system=True)
    assert (config.profile, config.uart.baud) == ("esp32", 115200)


def test_system_profiles_directory_follows_the_config_dir(etc):
    """Profiles named by name are looked up in <config dir>/profiles first."""
    (etc / "profiles").mkdir()
    (etc / "profiles" / "lab.toml").write_text("[uart]\nbaud = 4800\n")
    assert profile_dirs()[0] == etc / "profiles"
    assert load_config(None, "lab", {}).uart.baud == 4800


def test_instance_names():
    """An instance is the unit's %i as is, or a device path escaped as systemd-escape --path does."""
    assert instance_name("ttyAMA0") == "ttyAMA0"
    by_id = "serial-by\\x2did-usb\\x2dFTDI_FT232R_A5\\x2dif00\\x2dport0"
    assert instance_name(by_id) == by_id
    for path in ("/dev/serial/by-id/usb-FTDI_FT232R_A5-if00-port0",
                 "serial/by-id/usb-FTDI_FT232R_A5-if00-port0"):
        assert instance_name(path) == by_id
    assert instance_name("/dev/tty-odd.1") == "tty\\x2dodd.1"


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="no systemd-escape")
def test_instance_names_match_systemd_escape():
    """Device paths escape exactly as systemd-escape --path escapes them (the unit's %i)."""
    for path in ("/dev/ttyAMA0", "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0",
                 "/dev/serial/by-path/platform-3f980000.usb-usb-0:1.3:1.0-port0", "/dev/tty.x y+z"):
        expected = subprocess.run(["systemd-escape", "--path", path.removeprefix("/dev/")],
                                  capture_output=True, text=True, check=True).stdout.strip()
        assert instance_name(path) == expected


@pytest.mark.parametrize("name", ["..", ".hidden", "bridged", "a b", "x;y", "é", "a" * 201])
def test_bad_instance_names_refused(name):
    """A name that cannot be a file name of its own (or is bridged.toml's) is a config error."""
    with pytest.raises(ConfigError, match=r"^command line: instance: .* is not allowed; allowed: "):
        load_config(None, None, {}, instance=name, system=True)


def test_state_dir_per_instance(no_system_state):
    """An instance keeps its state in <system state dir>/<instance>; the base is made 0755."""
    config = load_config(None, None, {}, instance="ttyAMA0")
    assert state_dir(config) == no_system_state / "ttyAMA0"
    assert mode(no_system_state) == 0o755
    assert mode(no_system_state / "ttyAMA0") == 0o700
    other = load_config(None, None, {}, instance="/dev/serial/by-id/usb-X-if00")
    assert state_dir(other) == no_system_state / "serial-by\\x2did-usb\\x2dX\\x2dif00"


def test_state_dir_instance_under_systemd(tmp_path, no_system_state, monkeypatch):
    """$STATE_DIRECTORY (StateDirectory=bridged/%i) already names the instance's directory."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "lib" / "bridged" / "ttyAMA0"))
    config = load_config(None, None, {}, instance="ttyAMA0")
    assert state_dir(config) == tmp_path / "lib" / "bridged" / "ttyAMA0"


def test_state_dir_instance_home_fallback(tmp_path, no_system_state, monkeypatch):
    """Without a usable system directory an instance gets ~/.local/state/bridged/<instance>."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(config_paths, "_SYSTEM_STATE_DIR", blocker / "bridged")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    config = load_config(None, None, {}, instance="ttyAMA0")
    assert state_dir(config) == tmp_path / "xdg" / "bridged" / "ttyAMA0"


def test_state_dir_instance_existing_directory_kept(tmp_path, monkeypatch):
    """The instance's existing system directory is chosen even when its parent is not writable."""
    base = tmp_path / "lib"
    (base / "ttyAMA0").mkdir(parents=True)
    base.chmod(0o555)
    monkeypatch.setattr(config_paths, "_SYSTEM_STATE_DIR", base)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(config_paths.os, "access", lambda *a, **k: False)  # as an unprivileged user
    try:
        config = load_config(None, None, {}, instance="ttyAMA0")
        assert state_dir(config) == base / "ttyAMA0"
    finally:
        base.chmod(0o755)


def test_check_prints_the_instance_and_its_files(etc, tmp_path):
    """bridged check --instance reads bridged.toml and <instance>.toml, and says which."""
    write(etc, '[wifi]\nssid = "base"\n')
    mine = write(etc, "[uart]\nbaud = 19200\n", "ttyAMA0.toml")
    result = run_cli("check", "--instance", "ttyAMA0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# instance: ttyAMA0\n")
    assert str(mine) in result.stdout.splitlines()[2]
    base = etc / "bridged.toml"
    assert f"baud = 19200  # {mine}\n" in result.stdout and f'ssid = "base"  # {base}\n' in result.stdout
    plain = run_cli("check")
    assert "baud = 115200  # profile esp32\n" in plain.stdout and f'ssid = "base"  # {base}\n' in plain.stdout


def test_check_names_the_bad_system_file(etc):
    """A mistake in an instance file ends bridged check with exit 2 and the file's name."""
    bad = write(etc, "[uart]\nbaud = 1\n", "ttyAMA0.toml")
    result = run_cli("check", "--instance", "ttyAMA0")
    assert result.returncode == 2
    assert result.stderr.startswith(f"bridged: {bad}: uart.baud: 1 is not allowed")
    result = run_cli("check", "--instance", "a b")
    assert (result.returncode, result.stderr[:38]) == (2, "bridged: command line: instance: 'a b'")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return forkserver.run(list(args), timeout=60, cwd=str(REPO))


def test_profiles_of_a_user_install_are_found(tmp_path):
    """pip install --user puts profiles in <user base>/share/bridged/profiles; they are found."""
    profiles = tmp_path / "user" / "share" / "bridged" / "profiles"
    profiles.mkdir(parents=True)
    (profiles / "mine.toml").write_text("[uart]\nbaud = 2400\n")
    code = "from bridged.config import load_config; print(load_config(None, 'mine', {}).uart.baud)"
    env = dict(os.environ, PYTHONUSERBASE=str(tmp_path / "user"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (0, "2400\n", "")
