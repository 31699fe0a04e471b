"""Host name overrides: ``[dns] hosts`` and ``[dns] hosts_file``.

Theory of operation
-------------------
Firmware hard-codes its cloud's names (example.com, test.mosquitto.org); a
test bench points them at its own servers by naming them here, without
reflashing.  bridged.config checks and parses both keys when it loads (so a
mistake is a config error naming the key, and for the file, the file and
line), into a `HostTable` each.  The supervisor builds `overrides(...)` once
per configuration and installs it in the resolver of every process it forks
(``resolver.set_overrides``): a child shares its pages with the supervisor
rather than building its own (100 MB for each child with a 16 MB file), and
``resolver.resolve`` consults it before any DNS server, for every lookup
bridged makes for the MCU.  A changed file is a changed ``hosts_file`` value
(its table is part of it), so a reload (SIGHUP) picks it up.

Rules, where the issue left them open:

* names match as a resolver matches them: case-insensitive, one final dot
  ignored (``resolver.normal_name``);
* a name both keys give takes the table's addresses only (no merging): the
  table is the more specific, per-bench setting;
* in the file, a name on several lines gets the addresses of all of them,
  in file order (glibc's nss_files, whose "multi" is on since 2.26);
* an overridden name asked for a family it has no address of is "not found",
  never asked of DNS (nss files with ``hosts: files dns`` behaves alike).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from bridged.net.resolver import MAX_NAME, is_address, normal_name

__all__ = ["HostTable", "HostsFile", "HostsError", "table_from_toml", "parse_hosts",
           "read_hosts_file", "overrides", "TABLE_ALLOWED", "PATH_ALLOWED"]

MAX_FILE = 16 * 1024 * 1024  # bytes; a large ad-blocking hosts file is a few MB
# Addresses of one name.  Every lookup logs them and AT+CIPSTART may try each
# in turn; a DNS answer holds a few, and lwIP keeps one (DNS_MAX_HOST_IP).
MAX_ADDRESSES = 32

# The MCU sends names as bytes, without IDNA: only the ASCII form can match.
NAME_ALLOWED = (f"a host name: labels of 1 to 63 letters, digits, '-' or '_' joined by dots, "
                f"at most {MAX_NAME} bytes (a final dot is ignored), not an address; "
                f"an international name in its ASCII form (xn--...)")
ADDRESS_ALLOWED = ("an IPv4 address (dotted quad) or an IPv6 address, not IPv4-mapped; an IPv6 zone "
                   "names an interface: 1 to 15 letters, digits, '.', '-' or '_' (fe80::1%eth0)")
TABLE_ALLOWED = ('a table from host names to an address or a list of addresses (IPv4 or IPv6), '
                 'e.g. { "example.com" = ["127.0.0.1", "::1"] }')
LINE_ALLOWED = ("lines of an address and one or more host names, separated by blanks; "
                "'#' starts a comment (hosts(5))")
PATH_ALLOWED = '"" (none) or an absolute path to a readable file in /etc/hosts format'
COUNT_ALLOWED = f"at most {MAX_ADDRESSES} different addresses for a name"

_NAME = re.compile(r"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?")  # labels joined by dots
# A Linux interface name (IFNAMSIZ - 1 bytes) or index.  The zone is part of
# the address AT+CIPDOMAIN prints inside quotes: a quote or a line end there
# would forge a reply to the MCU.
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_BLANKS = re.compile(r"[ \t]+")


class HostsError(ValueError):
    """A name, address, entry or file is not allowed; says what is."""

    def __init__(self, problem: str, allowed: str) -> None:
        super().__init__(f"{problem}; allowed: {allowed}")
        self.problem = problem
        self.allowed = allowed


@dataclass(frozen=True, slots=True)
class HostTable:
    """Names (normalised) to their addresses (normalised, in the order given), sorted by name."""

    entries: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def of(cls, table: Mapping[str, Iterable[str]]) -> "HostTable":
        return cls(tuple(sorted((name, tuple(dict.fromkeys(addresses))) for name, addresses in table.items())))

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True, slots=True)
class HostsFile:
    """``[dns] hosts_file``: the path, and the table read from it when the config loaded."""

    path: str = ""
    table: HostTable = HostTable()


def overrides(hosts: HostTable, hosts_file: HostsFile) -> Mapping[str, tuple[str, ...]]:
    """What the resolver answers: the file's names, then the table's, which win name by name."""
    return MappingProxyType({**hosts_file.table.as_dict(), **hosts.as_dict()})


def _shown(value: Any) -> str:
    """``value`` quoted for a message, cut short: a bad line may be megabytes long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_name(name: str) -> str:
    """The name as lookups match it.

    Raises:
        HostsError: not a host name (or an address, which is never looked up).
    """
    bare = name[:-1] if name.endswith(".") else name
    if len(bare) > MAX_NAME or not _NAME.fullmatch(name) or is_address(bare):
        raise HostsError(f"{_shown(name)} is not a host name", NAME_ALLOWED)
    return normal_name(name)


def check_address(text: Any, shown: str = "") -> str:
    """The address in its usual text form (IPv6 compressed, lowercase).

    ``shown`` names the value in errors instead of quoting it.

    Raises:
        HostsError: not an IPv4 or IPv6 address, an IPv4-mapped one, or a
            zone that is no interface name.
    """
    shown = shown or _shown(text)
    try:
        if not isinstance(text, str):
            raise ValueError(text)
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise HostsError(f"{shown} is not an IPv4 or IPv6 address", ADDRESS_ALLOWED) from None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None and not _ZONE.fullmatch(ip.scope_id):
            raise HostsError(f"{shown} has a zone that is not an interface name", ADDRESS_ALLOWED)
        if ip.ipv4_mapped is not None:
            # An IPv4 address in IPv6 clothes: an IPv4 lookup would not find it,
            # and an IPv6 link or ping would really go over IPv4.
            raise HostsError(f"{shown} is IPv4-mapped: write {ip.ipv4_mapped}", ADDRESS_ALLOWED)
    return str(ip)


def table_from_toml(value: Mapping[str, Any]) -> HostTable:
    """``[dns] hosts`` as TOML gives it: name -> "address" or ["address", ...].

    Raises:
        HostsError: naming the entry and what is wrong with it.
    """
    table: dict[str, list[str]] = {}
    spelled: dict[str, str] = {}
    for key, addresses in value.items():
        name = check_name(key)
        try:
            table[name] = _addresses(addresses)
        except HostsError as exc:
            raise HostsError(f"entry {_shown(key)}: {exc.problem}", exc.allowed) from None
        if name in spelled:
            raise HostsError(f"entries {_shown(spelled[name])} and {_shown(key)} name the same host",
                             TABLE_ALLOWED)
        spelled[name] = key
    return HostTable.of(table)


def _addresses(value: Any) -> list[str]:
    if isinstance(value, dict):  # [dns.hosts] example.com = ...: TOML splits a bare dotted key
        raise HostsError("a table, not an address (quote a name that has dots: \"example.com\" = ...)",
                         TABLE_ALLOWED)
    if isinstance(value, list):
        if not value:
            raise HostsError("an empty list", TABLE_ALLOWED)
        addresses = list(dict.fromkeys(check_address(item) for item in value))
        if len(addresses) > MAX_ADDRESSES:
            raise HostsError(f"{len(addresses)} addresses", COUNT_ALLOWED)
        return addresses
    return [check_address(value)]


def parse_hosts(text: str, where: str) -> HostTable:
    """The table of a file in /etc/hosts format (hosts(5)); ``where`` names it in errors.

    Raises:
        HostsError: "<where>, line N: ..." for the first malformed line.
    """
    table: dict[str, list[str]] = {}
    # An ad-blocking file gives one address (0.0.0.0) to 100 000s of names:
    # each spelling is checked once, and the table holds one string for it.
    known: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        # Blanks only separate fields: any other space or control byte is part
        # of a field, and so refused in a name or an address.
        fields = [f for f in _BLANKS.split(line.split("#", 1)[0].rstrip("\r")) if f]
        if not fields:
            continue
        try:
            # Not quoted: a path named by mistake (/etc/shadow, a token file)
            # must not have its first line copied into the log.
            address = known.get(fields[0])
            if address is None:
                address = known[fields[0]] = check_address(fields[0], "the first field")
            if len(fields) == 1:
                raise HostsError(f"address {fields[0]!r} without a host name", LINE_ALLOWED)
            for field in fields[1:]:
                _add(table, check_name(field), address)
        except HostsError as exc:
            raise HostsError(f"{where}, line {number}: {exc.problem}", exc.allowed) from None
    return HostTable.of(table)


def _add(table: dict[str, list[str]], name: str, address: str) -> None:
    """Give ``name`` one more address: a name on several lines gets them all (nss_files' multi)."""
    addresses = table.setdefault(name, [])
    if address in addresses:
        return
    if len(addresses) == MAX_ADDRESSES:
        raise HostsError(f"{_shown(name)} has more than {MAX_ADDRESSES} addresses", COUNT_ALLOWED)
    addresses.append(address)


def _read_all(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit and (chunk := os.read(fd, min(1 << 20, limit - size))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_hosts_file(path: str) -> HostsFile:
    """Read and parse ``path``.

    Raises:
        HostsError: it cannot be read, is not a regular file, is too large,
            is not UTF-8, or has a malformed line.
    """
    try:
        # O_NONBLOCK: a FIFO named by mistake must not hang the load.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise HostsError(f"{path}: cannot read: {exc.strerror or exc}", PATH_ALLOWED) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HostsError(f"{path}: not a regular file", PATH_ALLOWED)
        data = _read_all(fd, MAX_FILE + 1)
    except OSError as exc:
        raise HostsError(f"{path}: cannot read: {exc.strerror or exc}", PATH_ALLOWED) from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE:
        raise HostsError(f"{path}: larger than {MAX_FILE} bytes", PATH_ALLOWED)
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise HostsError(f"{path}, line {line}: not UTF-8 text", LINE_ALLOWED) from None
    return HostsFile(path, parse_hosts(text, path))
