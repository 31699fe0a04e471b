"""Where the MCU's links may go: ``[links] allow`` / ``deny`` and ``local_ports`` (sans I/O).

Theory of operation.  The MCU is not trusted: bridged hands it a Linux
host, and a link to 127.0.0.1 or to the gateway's own LAN address reaches
services no ESP32 could.  So every remote address a link worker is about
to use -- each address a name resolved to and is tried, every datagram's
destination, every datagram's sender, every server client -- is checked
here *after* name resolution, so a name cannot dodge a rule.

Addresses are compared as the kernel would route them: an IPv4-mapped IPv6
address (``::ffff:127.0.0.1``) is that IPv4 address, and lwIP's IPv4
shorthand (``127.1``, ``0x7f.1``, which ``bridged.net.resolver`` takes as
an address too) is the dotted quad it spells.  An address of NAT64's
well-known prefix (``64:ff9b::a.b.c.d``, RFC 6052) passes only if both it
and the IPv4 address a network's NAT64 turns it into pass: on an IPv6
network with NAT64 it reaches the gateway's own IPv4 addresses too.  Other
ways of carrying IPv4 in IPv6 are not translated back: IPv4-compatible
``::a.b.c.d`` is routed as plain IPv6 by Linux, and 6to4 (2002::/16) or
Teredo reach the tunnel's relay, not the IPv4 host's services; a
network-specific NAT64 prefix is the admin's to deny.

Entries (one string each)::

    self[:PORTS]                  this host's own addresses (see LocalAddresses)
    A.B.C.D[/N][:PORTS]           an IPv4 address or network
    X:Y::Z[/N]                    an IPv6 address or network, any port
    [X:Y::Z][/N][:PORTS]          the same with ports: brackets then
    PORTS = PORT or LOW-HIGH      0 to 65535; no ports: every port

Decision: the most specific matching entry of either list decides -- a
longer prefix beats a shorter one ("self" counts as single addresses, /32
or /128), then a narrower port range beats a wider one, and on a full tie
deny wins.  A destination no entry matches is allowed; so an empty deny
list allows everything (the built-in default), and ``allow`` only carves
exceptions out of broader ``deny`` entries (a broker on 127.0.0.1:1883 on a
gateway that denies "self").  To allow only some destinations, deny
"0.0.0.0/0" and "::/0" and allow those.

``local_ports`` ("1024-65535" by default; ports and ranges, comma
separated) are the local ports a UDP link may bind: ports below 1024 need
both CAP_NET_BIND_SERVICE and this setting.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "Address",
    "DestinationRefused",
    "LocalPortRefused",
    "ENTRIES_ALLOWED",
    "LOCAL_PORTS_ALLOWED",
    "MAX_ENTRIES",
    "Policy",
    "PolicyError",
    "Refusal",
    "Rule",
    "normalise",
    "parse_local_ports",
    "parse_rule",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_ENTRIES = 256  # per list: every check walks the list
ENTRIES_ALLOWED = ('a list of at most 256 strings, each "self", an IPv4 or IPv6 address or network '
                   '("10.0.0.0/8", "::1", "fd00::/8"), optionally followed by :PORT or :LOW-HIGH '
                   '(IPv6 in brackets then: "[::1]/128:8080", "192.168.1.10:1883", "self:1-1023")')
LOCAL_PORTS_ALLOWED = 'ports and ranges from 1 to 65535, comma separated, e.g. "1024-65535" or "123,1024-65535"'

_ALL_PORTS = (0, 65535)
_SHORTHAND = frozenset("0123456789abcdefABCDEFxX.")
_PORTS = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")
_PREFIX = re.compile(r"\d{1,3}")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = 0x64_FF9B << 64  # 64:ff9b::/96 (RFC 6052) shifted right by its 32 host bits


class DestinationRefused(OSError):
    """A link's remote refused by the policy; for the MCU as unreachable a host as any."""

    def __init__(self, refusal: "Refusal") -> None:
        super().__init__(refusal.reason())
        self.refusal = refusal


class LocalPortRefused(OSError):
    """A UDP link's local port outside ``[links] local_ports``."""


class PolicyError(ValueError):
    """An entry that is not in the allowed syntax; ``problem`` says what is wrong."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a destination is refused: the address (normalised), the port, the deciding entry."""

    address: str
    port: int
    rule: str

    def reason(self) -> str:
        return f"{self.address} port {self.port} refused by [links] {self.rule}"


@dataclass(frozen=True, slots=True)
class Rule:
    text: str  # as written in the configuration
    allow: bool
    network: Network | None  # None: "self"
    low: int
    high: int

    def describe(self) -> str:
        return f"{'allow' if self.allow else 'deny'} {self.text!r}"


# -- addresses -------------------------------------------------------------------------


def normalise(address: str | Address) -> Address:
    """The address as the kernel routes it.

    Drops an IPv6 zone, reads lwIP's IPv4 shorthand ("127.1", "0x7f.1",
    "1.2.3" = 1.2.0.3) as inet_aton does, and turns an IPv4-mapped IPv6
    address into its IPv4 address.

    Raises:
        ValueError: ``address`` is no address at all.
    """
    version, value = _numeric(address)
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def _numeric(address: str | Address) -> tuple[int, int]:
    """normalise's answer as (IP version, integer).

    inet_pton first: it takes only the standard spellings and costs a tenth
    of ipaddress's parsing, which matters for a check per datagram.
    """
    if isinstance(address, str):
        text = address.partition("%")[0]
        try:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
        except OSError:
            pass
        try:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
        except OSError:
            return 4, _shorthand(address, text)
    elif address.version == 4:
        return 4, int(address)
    else:
        value = int(address)  # without the zone
    if value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d
        return 4, value & 0xFFFF_FFFF
    return 6, value


def _shorthand(address: str, text: str) -> int:
    if not text or ":" in text or not _SHORTHAND.issuperset(text):
        raise ValueError(f"{address!r} is not an address")
    try:
        return int.from_bytes(socket.inet_aton(text), "big")
    except OSError:
        raise ValueError(f"{address!r} is not an address") from None


# -- parsing ---------------------------------------------------------------------------


def _ports(text: str) -> tuple[int, int]:
    match = _PORTS.fullmatch(text)
    if not match:
        raise PolicyError(f"ports {text!r} are not PORT or LOW-HIGH")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if high > 65535 or low > high:
        raise PolicyError(f"ports {text!r}: need 0 <= LOW <= HIGH <= 65535")
    return low, high


def _network(address: str, prefix: str | None, version: int) -> Network:
    if "%" in address:
        raise PolicyError("an IPv6 zone (%...) is not allowed in a rule")
    if prefix is not None and not _PREFIX.fullmatch(prefix):
        raise PolicyError(f"prefix /{prefix} is not a number")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        hint = ""
        if version == 4:
            try:
                hint = f" (write {normalise(address)})"  # lwIP's shorthand, ambiguous to a reader
            except ValueError:
                pass
        raise PolicyError(f"{address!r} is not an IPv{version} address{hint}") from None
    if ip.version != version:
        raise PolicyError(f"{address!r} is not an IPv{version} address")
    try:
        network = ipaddress.ip_network(f"{address}/{prefix if prefix is not None else ip.max_prefixlen}")
    except ValueError as exc:
        if "host bits" in str(exc):
            wider = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
            raise PolicyError(f"{address}/{prefix} has host bits set (write {wider})") from None
        raise PolicyError(f"prefix /{prefix} is out of range (0 to {ip.max_prefixlen})") from None
    if network.version == 6 and network.subnet_of(_MAPPED):
        mapped = ipaddress.ip_network(f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
        raise PolicyError(f"an IPv4-mapped network is the IPv4 one: write {mapped}")
    return network


def parse_rule(text: str, allow: bool) -> Rule:
    """One allow or deny entry (see the module's docstring for the syntax).

    Raises:
        PolicyError: not in that syntax.
    """
    if not isinstance(text, str):
        raise PolicyError(f"{text!r} is not a string")
    ports: str | None = None
    if text == "self" or text.startswith("self:"):
        low, high = _ports(text[5:]) if text != "self" else _ALL_PORTS
        return Rule(text, allow, None, low, high)
    if text.startswith("["):
        match = re.fullmatch(r"\[([^\]]*)\](?:/([^:]*))?(?::(.*))?", text)
        if not match:
            raise PolicyError("a bracketed IPv6 entry is [ADDRESS][/PREFIX][:PORTS]")
        address, prefix, ports = match.groups()
        network = _network(address, prefix, 6)
    elif text.count(":") >= 2:  # IPv6 without brackets: no ports
        address, _, prefix = text.partition("/")
        network = _network(address, prefix if "/" in text else None, 6)
    else:
        head, colon, ports = text.partition(":")
        address, _, prefix = head.partition("/")
        network = _network(address, prefix if "/" in head else None, 4)
        ports = ports if colon else None
    low, high = _ports(ports) if ports is not None else _ALL_PORTS
    return Rule(text, allow, network, low, high)


def parse_local_ports(text: str) -> tuple[tuple[int, int], ...]:
    """``local_ports``: comma-separated ports and ranges, 1 to 65535.

    Raises:
        PolicyError: not in that syntax.
    """
    if not isinstance(text, str) or not text:
        raise PolicyError(f"{text!r} is not a list of ports")
    ranges = []
    for part in text.split(","):
        low, high = _ports(part.strip())
        if low < 1:
            raise PolicyError(f"port 0 is not a local port (0 asks for any free one, always allowed)")
        ranges.append((low, high))
    return tuple(ranges)


# -- deciding --------------------------------------------------------------------------


def _nothing_is_local(ip: Address) -> bool:
    return False


class Policy:
    """The allow and deny entries and local ports of one configuration.

    Args:
        allow, deny: entries as in ``[links]``.
        local_ports: as in ``[links]``.
        is_local: whether an address is this host's own ("self"); I/O lives
            there (bridged.net.localaddr), not here.

    Raises:
        PolicyError: an entry is malformed.
    """

    def __init__(self, allow: Sequence[str] = (), deny: Sequence[str] = (), local_ports: str = "1-65535",
                 is_local: Callable[[Address], bool] = _nothing_is_local) -> None:
        rules = [parse_rule(t, True) for t in allow] + [parse_rule(t, False) for t in deny]
        self.is_local = is_local
        self.local_ports = parse_local_ports(local_ports)
        # Only a deny entry can refuse: without one, nothing is checked at all.
        self.open = not deny
        self._tables = {4: _Table(rules, 4), 6: _Table(rules, 6)}

    def check(self, address: str | Address, port: int) -> Refusal | None:
        """None when a link may use ``address`` and ``port``, else why not."""
        if self.open:
            return None
        try:
            version, value = _numeric(address)
        except ValueError:
            return Refusal(str(address), port, "(not an address)")
        refusal = self._refusal(version, value, port)
        if refusal is None and version == 6 and value >> 32 == _NAT64:
            refusal = self._refusal(4, value & 0xFFFF_FFFF, port)
        return refusal

    def _refusal(self, version: int, value: int, port: int) -> Refusal | None:
        rule = self._tables[version].decide(value, port, self.is_local)
        if rule is None or rule.allow:
            return None
        ip = ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)
        return Refusal(str(ip), port, rule.describe())

    def local_port_allowed(self, port: int) -> bool:
        """Whether a UDP link may bind local ``port`` (0: any free port, always)."""
        return port == 0 or any(low <= port <= high for low, high in self.local_ports)


# An entry with its rank among entries of one prefix length: narrower ports
# first, deny before allow on a tie, then the order written (only the
# refusal's wording can depend on that).
_Ranked = tuple[tuple[int, bool, int], Rule]


def _first(entries: Sequence[_Ranked], port: int) -> _Ranked | None:
    for entry in entries:
        if entry[1].low <= port <= entry[1].high:
            return entry
    return None


class _Table:
    """One family's entries, indexed by prefix length then network.

    A check costs a dictionary lookup per distinct prefix length (at most
    33 or 129) instead of a test per entry: a datagram flood from many
    senders is checked sender by sender.  "self" entries rank with the
    full-length prefixes, and ``is_local`` is asked only when one of them
    would decide.
    """

    def __init__(self, rules: list[Rule], version: int) -> None:
        self.version = version
        full = 32 if version == 4 else 128
        networks: dict[int, dict[int, list[_Ranked]]] = {}
        local: list[_Ranked] = []
        for position, rule in enumerate(rules):
            entry = ((rule.high - rule.low, rule.allow, position), rule)
            if rule.network is None:
                local.append(entry)
            elif rule.network.version == version:
                prefix = networks.setdefault(rule.network.prefixlen, {})
                prefix.setdefault(int(rule.network.network_address), []).append(entry)
        self.local = tuple(sorted(local, key=lambda e: e[0]))
        if local:
            networks.setdefault(full, {})
        self.full = full
        self.levels = tuple(
            (length, ((1 << length) - 1) << (full - length),
             {net: tuple(sorted(entries, key=lambda e: e[0])) for net, entries in networks[length].items()})
            for length in sorted(networks, reverse=True))

    def decide(self, value: int, port: int, is_local: Callable[[Address], bool]) -> Rule | None:
        """The most specific entry matching ``value`` and ``port``, None when none does."""
        for length, mask, networks in self.levels:
            best = _first(networks.get(value & mask, ()), port)
            if length == self.full and self.local:
                mine = _first(self.local, port)
                if mine is not None and (best is None or mine[0] < best[0]) and is_local(
                        ipaddress.IPv4Address(value) if self.version == 4 else ipaddress.IPv6Address(value)):
                    best = mine
            if best is not None:
                return best[1]
        return None
