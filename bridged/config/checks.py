"""Value checks for configuration keys, and the errors a refused value becomes.

Each check takes a TOML value and returns the value to store, or raises
`_Refused` naming what is allowed; `bridged.config.loading` turns that into a
`ConfigError` naming the file (or "command line"), the dotted key and what is
allowed. `_Check.kind` tells how a command-line string is parsed for the key.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bridged import firmware
from bridged.faults.spec import ALLOWED as FAULT_ALLOWED
from bridged.faults.spec import FaultError, parse_spec
from bridged.net.hosts import (PATH_ALLOWED, TABLE_ALLOWED, HostsError, HostsFile, read_hosts_file,
                               table_from_toml)
from bridged.net.policy import (ENTRIES_ALLOWED, LOCAL_PORTS_ALLOWED, MAX_ENTRIES, PolicyError,
                                parse_local_ports, parse_rule)

__all__ = ["COMMAND_LINE", "ConfigError", "OTA_PARTITION", "OTA_VERSION"]

COMMAND_LINE = "command line"


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


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _error(source: str, key: str, problem: str, allowed: Iterable[str] | str) -> ConfigError:
    if not isinstance(allowed, str):
        allowed = ", ".join(allowed)
    return ConfigError(f"{source}: {key}: {problem}; allowed: {allowed}")


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


def _hosts_check(kind: type, allowed: str, fits: Callable[[Any], bool], parse: Callable[[Any], Any]) -> _Check:
    """A [dns] key parsed by bridged.net.hosts: a value that `fits`, parsed; its HostsError is
    refused with what hosts.py says is allowed and wrong."""

    def accept(v: Any) -> Any:
        if not fits(v):
            return _NO
        try:
            return parse(v)
        except HostsError as exc:
            raise _Refused(exc.allowed, exc.problem) from None

    return _Check(kind, allowed, accept)


def _hosts_table() -> _Check:
    """[dns] hosts: a table of host names to addresses (bridged.net.hosts)."""
    return _hosts_check(dict, TABLE_ALLOWED, lambda v: isinstance(v, dict), table_from_toml)


def _hosts_file() -> _Check:
    """[dns] hosts_file: read and parsed here, so a bad line is a config error."""
    path = _path(PATH_ALLOWED, absolute=True)
    return _hosts_check(str, PATH_ALLOWED, lambda v: path.accept(v) is not _NO,
                        lambda v: read_hosts_file(v) if v else HostsFile())


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
