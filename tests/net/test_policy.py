"""bridged.net.policy: entry syntax, address normalisation and the most-specific-entry rule."""

from __future__ import annotations

import ipaddress
import socket
import time

import ifaddr
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridged.net.localaddr import LocalAddresses, own_addresses
from bridged.net.policy import Policy, PolicyError, normalise, parse_local_ports, parse_rule

ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
ports = st.integers(0, 65535)


# -- normalisation ------------------------------------------------------------------


def _shorthands(ip: ipaddress.IPv4Address, data) -> str:
    """One of the inet_aton spellings of ``ip``: 1 to 4 parts, each decimal, octal or hex."""
    value = int(ip)
    parts_count = data.draw(st.integers(1, 4))
    widths = {1: [32], 2: [8, 24], 3: [8, 8, 16], 4: [8, 8, 8, 8]}[parts_count]
    parts, shift = [], 32
    for width in widths:
        shift -= width
        parts.append((value >> shift) & ((1 << width) - 1))
    spelt = []
    for part in parts:
        style = data.draw(st.sampled_from(["dec", "hex", "HEX", "oct"]))
        spelt.append({"dec": str(part), "hex": hex(part), "HEX": "0X%X" % part,
                      "oct": "0%o" % part if part else "0"}[style])
    return ".".join(spelt)


@given(ipv4, st.data())
def test_shorthand_is_the_dotted_quad(ip, data):
    """Every inet_aton spelling (lwIP's ipaddr_aton takes them) normalises to the address it spells."""
    text = _shorthands(ip, data)
    assert socket.inet_aton(text) == ip.packed  # the spelling is right
    assert normalise(text) == ip


@given(ipv4)
def test_mapped_ipv6_is_ipv4(ip):
    """::ffff:a.b.c.d, in either IPv6 spelling, normalises to a.b.c.d."""
    mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    assert normalise(f"::ffff:{ip}") == ip
    assert normalise(mapped.exploded) == ip
    assert normalise(mapped) == ip


@given(ipv6)
def test_other_ipv6_stays(ip):
    """An IPv6 address that is not IPv4-mapped is itself, zone or not."""
    if ip.ipv4_mapped is None:
        assert normalise(str(ip)) == ip
        assert normalise(f"{ip}%eth0") == ip


@pytest.mark.parametrize("text", ["", "example.com", "1.2.3.4 x", "127.0.0.1.5", "0x", "::g", "1:2"])
def test_not_an_address(text):
    """Names and garbage are no address (a caller then refuses)."""
    with pytest.raises(ValueError):
        normalise(text)


@given(ipv4, ports, st.data())
def test_every_spelling_gets_the_same_verdict(ip, port, data):
    """A rule over an address catches its shorthand and IPv4-mapped spellings alike."""
    policy = Policy(deny=[f"{ip}/32"])
    spelling = data.draw(st.sampled_from([str(ip), _shorthands(ip, data), f"::ffff:{ip}"]))
    refusal = policy.check(spelling, port)
    assert refusal is not None and refusal.address == str(ip)


# -- entries ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "network", "low", "high"), [
    ("10.0.0.0/8", "10.0.0.0/8", 0, 65535),
    ("192.168.1.10", "192.168.1.10/32", 0, 65535),
    ("192.168.1.10/32:1883", "192.168.1.10/32", 1883, 1883),
    ("0.0.0.0/0:1-1023", "0.0.0.0/0", 1, 1023),
    ("[::1]/128:8080", "::1/128", 8080, 8080),
    ("[fd00::]/8:1-2", "fd00::/8", 1, 2),
    ("[::1]", "::1/128", 0, 65535),
    ("fe80::/10", "fe80::/10", 0, 65535),
    ("::", "::/128", 0, 65535),
    ("self", None, 0, 65535),
    ("self:22", None, 22, 22),
])
def test_entry_syntax(text, network, low, high):
    """Each documented form parses to its network and port range."""
    rule = parse_rule(text, allow=False)
    assert (str(rule.network) if rule.network else None, rule.low, rule.high) == (network, low, high)


@pytest.mark.parametrize("text", ["10.0.0.1/8", "127.1", "::ffff:10.0.0.0/104", "[::1]/129", "1.2.3.4/33",
                                  "1.2.3.4:", "1.2.3.4:x", "1.2.3.4:2-1", "self:", "selfx", "[::1", "::1:80:z",
                                  "1.2.3.4/255.0.0.0", "[1.2.3.4]:80", "fe80::1%eth0", "", " 1.2.3.4"])
def test_bad_entries(text):
    """Anything outside the syntax is a PolicyError saying what is wrong."""
    with pytest.raises(PolicyError) as info:
        parse_rule(text, allow=True)
    assert info.value.problem


def test_local_ports():
    """local_ports: ports and ranges; 0 (any free port) is always allowed."""
    assert parse_local_ports("123,1024-65535") == ((123, 123), (1024, 65535))
    policy = Policy(local_ports="123,1024-65535")
    assert [policy.local_port_allowed(p) for p in (0, 1, 123, 124, 1023, 1024, 65535)] == \
        [True, False, True, False, False, True, True]


# -- deciding ---------------------------------------------------------------------


def test_no_deny_allows_everything():
    """Without a deny entry nothing is checked, allow entries or not."""
    assert Policy().open and Policy(allow=["10.0.0.0/8"]).open
    assert Policy(allow=["10.0.0.0/8"]).check("127.0.0.1", 1) is None


def test_most_specific_entry_decides():
    """A longer prefix beats a shorter one, then narrower ports, then deny on a tie."""
    policy = Policy(allow=["10.1.0.0/16", "10.2.0.5:80", "10.3.0.0/16:443"],
                    deny=["10.0.0.0/8", "10.1.2.0/24", "10.2.0.0/16:1-1000", "10.3.0.0/16:443"])
    assert policy.check("10.9.9.9", 80).rule == "deny '10.0.0.0/8'"
    assert policy.check("10.1.9.9", 80) is None  # /16 allow beats /8 deny
    assert policy.check("10.1.2.3", 80).rule == "deny '10.1.2.0/24'"
    assert policy.check("10.2.0.5", 80) is None  # /32 allow beats /16 deny
    assert policy.check("10.2.0.6", 80).rule == "deny '10.2.0.0/16:1-1000'"
    assert policy.check("10.2.0.6", 1001).rule == "deny '10.0.0.0/8'"
    assert policy.check("10.3.0.1", 443).rule == "deny '10.3.0.0/16:443'"  # a full tie: deny
    assert policy.check("11.0.0.1", 80) is None  # no entry matches


def test_self_counts_as_single_addresses():
    """"self" beats any network, ties a /32 (narrower ports win), and follows is_local."""
    local = {ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("2001:db8::7")}
    policy = Policy(allow=["0.0.0.0/0", "192.0.2.7:1883", "[2001:db8::7]/128:1883"], deny=["self", "192.0.2.0/24"],
                    is_local=lambda ip: ip in local)
    assert policy.check("192.0.2.7", 80).rule == "deny 'self'"
    assert policy.check("192.0.2.7", 1883) is None
    assert policy.check("2001:db8::7", 80).rule == "deny 'self'"
    assert policy.check("2001:db8::7", 1883) is None
    assert policy.check("192.0.2.8", 80).rule == "deny '192.0.2.0/24'"
    assert policy.check("198.51.100.1", 80) is None


def test_families_do_not_mix():
    """An IPv6 entry never matches IPv4 (mapped addresses are IPv4) and the reverse."""
    policy = Policy(deny=["::/0"])
    assert policy.check("::ffff:127.0.0.1", 80) is None
    assert policy.check("::1", 80) is not None
    assert Policy(deny=["0.0.0.0/0"]).check("::1", 80) is None


def test_unparsable_address_is_refused():
    """What is no address at all is refused, never waved through."""
    assert Policy(deny=["10.0.0.0/8"]).check("not-an-address", 1).rule == "(not an address)"


# -- this host's addresses ----------------------------------------------------------


def test_local_addresses_are_read_at_most_once_per_ttl():
    """Interface addresses are re-read after the TTL; loopback and unspecified always count."""
    now = [0.0]
    reads = []

    def read():
        reads.append(now[0])
        return frozenset({ipaddress.ip_address("192.0.2.1")} if len(reads) == 1 else {ipaddress.ip_address("192.0.2.2")})

    local = LocalAddresses(ttl=1.0, clock=lambda: now[0], read=read)
    for text in ("127.0.0.5", "0.0.0.0", "::1", "::"):
        assert local(ipaddress.ip_address(text))
    assert reads == []  # fixed ranges need no reading
    assert local(ipaddress.ip_address("192.0.2.1")) and not local(ipaddress.ip_address("192.0.2.2"))
    now[0] = 0.5
    assert local(ipaddress.ip_address("192.0.2.1"))
    now[0] = 1.0
    assert local(ipaddress.ip_address("192.0.2.2")) and not local(ipaddress.ip_address("192.0.2.1"))
    assert reads == [0.0, 1.0]


def test_local_addresses_include_this_hosts():
    """Read for real, every address of lo is local; a documentation address is not."""
    local = LocalAddresses()
    assert local(ipaddress.ip_address("127.0.0.1"))
    assert not local(ipaddress.ip_address("192.0.2.200"))
    assert not local(ipaddress.ip_address("224.0.0.251"))


# -- the index against the rule as written ----------------------------------------------


def _reference(rules: list[tuple[str, bool]], local: set, address: str, port: int) -> bool:
    """The documented rule, entry by entry: the most specific match decides, deny on a tie."""
    ip = normalise(address)
    parsed = [parse_rule(text, allow) for text, allow in rules]
    matching = [r for r in parsed if r.low <= port <= r.high and (
        ip in local if r.network is None else r.network.version == ip.version and ip in r.network)]
    if not matching:
        return True
    full = 32 if ip.version == 4 else 128
    best = min(matching, key=lambda r: (-(r.network.prefixlen if r.network else full), r.high - r.low, r.allow))
    return best.allow


_SMALL4 = st.builds(lambda a, n: str(ipaddress.ip_network(f"10.0.{a}.{a}/{n}", strict=False)),
                    st.integers(0, 3), st.sampled_from([8, 16, 22, 23, 24, 30, 32]))
_PORTS_TEXT = st.sampled_from(["", ":80", ":1-1023", ":0-65535", ":80-90"])
_ENTRY = st.one_of(
    st.builds(lambda net, ports: net + ports, _SMALL4, _PORTS_TEXT),
    st.builds(lambda ports: "self" + ports, _PORTS_TEXT),
    st.builds(lambda n, ports: f"[fd00::]/{n}{ports}", st.sampled_from([8, 16, 64, 128]), _PORTS_TEXT),
)


@given(st.lists(st.tuples(_ENTRY, st.booleans()), min_size=1, max_size=12),
       st.sampled_from(["10.0.0.0", "10.0.1.1", "10.0.3.3", "10.0.2.200", "11.0.0.1", "fd00::", "fd00::1", "::1"]),
       st.sampled_from([0, 79, 80, 85, 1023, 1024, 65535]), st.booleans())
def test_index_decides_as_the_rule_says(rules, address, port, is_local):
    """The prefix-length index gives every verdict the entry-by-entry rule gives."""
    local = {normalise(address)} if is_local else set()
    policy = Policy(allow=[t for t, allow in rules if allow], deny=[t for t, allow in rules if not allow] or ["1.1.1.1"],
                    is_local=lambda ip: ip in local)
    rules = [(t, True) for t, allow in rules if allow] + ([(t, False) for t, allow in rules if not allow]
                                                          or [("1.1.1.1", False)])
    assert (policy.check(address, port) is None) == _reference(rules, local, address, port)


def test_a_check_does_not_walk_every_entry():
    """Against 512 entries a check costs a lookup per prefix length: 10 000 checks take well under
    half a second of CPU (entry by entry they took 1 to 3 s)."""
    policy = Policy(allow=[f"10.{i}.0.0/16:1883" for i in range(256)], deny=[f"172.16.{i}.0/24" for i in range(256)])
    started = time.process_time()
    for i in range(10_000):
        assert policy.check(f"198.51.100.{i % 250}", 5000) is None
    assert time.process_time() - started < 0.5
    assert policy.check("172.16.9.1", 80).rule == "deny '172.16.9.0/24'"


def test_own_addresses_take_in_broadcast_and_subnet_anycast():
    """Each IPv4 network's broadcast address and each IPv6 prefix's subnet-router anycast address reach
    this host as its own addresses do, so they are "self" (no broadcast on /31, /32; no anycast on /127)."""
    adapters = [ifaddr.Adapter("eth0", "eth0", [
        ifaddr.IP("192.0.2.7", 24, "eth0"), ifaddr.IP("198.51.100.1", 31, "eth0"),
        ifaddr.IP(("2001:db8:1::7", 0, 0), 64, "eth0"), ifaddr.IP(("fe80::7%eth0", 0, 2), 64, "eth0"),
        ifaddr.IP(("2001:db8:2::1", 0, 0), 127, "eth0")])]
    assert own_addresses(adapters) == {ipaddress.ip_address(a) for a in (
        "192.0.2.7", "192.0.2.255", "198.51.100.1", "2001:db8:1::7", "2001:db8:1::", "fe80::7", "fe80::",
        "2001:db8:2::1")}
    assert LocalAddresses(read=frozenset)(ipaddress.ip_address("255.255.255.255"))


@given(ipv4, ports)
def test_nat64_is_checked_as_both(ip, port):
    """64:ff9b::a.b.c.d passes only if both it and a.b.c.d pass: a NAT64 takes it to a.b.c.d."""
    nat64 = f"64:ff9b::{ip}"
    refusal = Policy(deny=[f"{ip}/32"]).check(nat64, port)
    assert refusal is not None and refusal.address == str(ip)
    assert Policy(deny=["64:ff9b::/96"]).check(nat64, port).address == str(ipaddress.IPv6Address(nat64))
    assert Policy(deny=["self"], is_local=lambda a: a == ip).check(nat64, port) is not None
    assert Policy(deny=["::/0"], allow=["64:ff9b::/96"]).check(nat64, port) is None
    assert Policy(deny=[f"{ip}/32"]).check(f"64:ff9b:1::{ip}", port) is None  # another prefix: the admin's
