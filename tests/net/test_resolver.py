"""bridged.net.resolver against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

import pytest
import uvloop

from bridged.net.resolver import ResolveError, resolve
from tests.dnsserver import serving

RECORDS = {
    "dual.test": ["127.0.0.7", "127.0.0.8", "::7"],
    "v6only.test": ["::8"],
    "v4only.test": ["127.0.0.9"],
}


@pytest.fixture(scope="module")
def dns_server():
    with serving("127.0.0.163", RECORDS) as server:
        yield server


@pytest.fixture(scope="module")
def silent_server():
    with serving("127.0.0.164", silent=True) as server:
        yield server


def run(coro):
    return uvloop.run(coro)


@pytest.mark.parametrize("family, expected", [
    (socket.AF_INET, ["127.0.0.7", "127.0.0.8"]),
    (socket.AF_INET6, ["::7"]),
    (socket.AF_UNSPEC, ["127.0.0.7", "127.0.0.8"]),
])
def test_servers_answer_by_family(dns_server, family, expected):
    """A for AF_INET, AAAA for AF_INET6, A first (and only, when there is one) for AF_UNSPEC."""
    assert sorted(run(resolve("dual.test", family, [dns_server.address], 2))) == expected  # an RRset has no order


def test_unspec_falls_back_to_ipv6(dns_server):
    """A name with only AAAA records resolves to IPv6 for AF_UNSPEC, and fails for AF_INET."""
    assert run(resolve("v6only.test", socket.AF_UNSPEC, [dns_server.address], 2)) == ["::8"]
    with pytest.raises(ResolveError, match="no address"):
        run(resolve("v6only.test", socket.AF_INET, [dns_server.address], 2))


def test_unknown_name_is_nxdomain(dns_server):
    """NXDOMAIN from the server is a ResolveError naming the name and the reason."""
    with pytest.raises(ResolveError, match=r"nowhere\.test does not exist \(NXDOMAIN"):
        run(resolve("nowhere.test", socket.AF_INET, [dns_server.address], 2))


def test_only_the_given_servers_are_asked(dns_server):
    """The servers path never falls back to the host's resolver: localhost is unknown to our server."""
    before = len(dns_server.queries)
    with pytest.raises(ResolveError, match="NXDOMAIN"):
        run(resolve("localhost", socket.AF_INET, [dns_server.address], 2))
    assert dns_server.queries[before:] == [("localhost", "A")]


def test_literals_are_never_looked_up(dns_server):
    """An address literal comes back as it is, with no query; a literal of the other family is refused."""
    before = len(dns_server.queries)
    assert run(resolve("10.1.2.3", socket.AF_INET, [dns_server.address], 2)) == ["10.1.2.3"]
    assert run(resolve("::1", socket.AF_UNSPEC, [dns_server.address], 2)) == ["::1"]
    with pytest.raises(ResolveError, match="not an IPv4 address"):
        run(resolve("::1", socket.AF_INET, [dns_server.address], 2))
    assert len(dns_server.queries) == before


def test_a_silent_server_times_out_in_time(silent_server):
    """A server that never answers ends in a ResolveError within the timeout."""
    started = time.monotonic()
    with pytest.raises(ResolveError, match="within 0.8 s"):
        run(resolve("slow.test", socket.AF_INET, [silent_server.address], 0.8))
    assert 0.6 < time.monotonic() - started < 2.0
    assert "slow.test" in silent_server.names_asked()


def test_host_resolver_without_servers():
    """Without servers the host's resolver answers (localhost from /etc/hosts, no DNS traffic)."""
    assert run(resolve("localhost", socket.AF_INET)) == ["127.0.0.1"]


def test_asyncio_loop_too(dns_server):
    """The servers path works under the stdlib event loop as well as uvloop."""
    assert asyncio.run(resolve("v4only.test", socket.AF_INET, [dns_server.address], 2)) == ["127.0.0.9"]


@pytest.mark.parametrize("name, why", [
    ("a..test", "label of 0 bytes"),
    (".test", "label of 0 bytes"),
    ("x" * 64 + ".test", "label of 64 bytes"),
    ("x." * 127 + "y", "255 bytes long"),
    ("bad\x85byte.test", "printable ASCII"),  # a C1 control: the idna codec's nameprep refuses it
    ("", "empty"),
])
@pytest.mark.parametrize("servers", [(), ("127.0.0.164",)], ids=["host", "manual"])
def test_names_no_server_could_answer_are_resolve_errors(name, why, servers):
    """Such names are a ResolveError before any lookup, by either path; the host
    resolver's IDNA codec used to raise UnicodeError, which no caller catches."""
    with pytest.raises(ResolveError, match=why):
        run(resolve(name, socket.AF_UNSPEC, servers, 1))


@pytest.mark.parametrize("name, expected", [
    ("0x7f.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("1.2.3", "1.2.0.3"), ("017.0.0.1", "15.0.0.1"),
])
def test_inet_aton_shorthand_is_an_address_not_a_name(silent_server, name, expected):
    """IPv4 shorthand is read as lwIP's ipaddr_aton (and the host's resolver) reads it:
    an address, answered at once; the manual server is not asked."""
    asked = len(silent_server.queries)
    assert run(resolve(name, socket.AF_UNSPEC, [silent_server.address], 1)) == [expected]
    with pytest.raises(ResolveError, match="not an IPv6 address"):
        run(resolve(name, socket.AF_INET6, [silent_server.address], 1))
    assert len(silent_server.queries) == asked


@pytest.mark.parametrize("name", ["cafe.bad", "deadbeef", "1.2.3.4.5"])
def test_names_of_hex_letters_are_still_names(silent_server, name):
    """Only what inet_aton takes whole is an address; other names go to the server."""
    asked = len(silent_server.queries)
    with pytest.raises(ResolveError, match="within"):
        run(resolve(name, socket.AF_INET, [silent_server.address], 0.3))
    assert len(silent_server.queries) > asked


def test_sockaddr_keeps_a_link_local_zone():
    """AT+CIPSTART to "fe80::1%lo" must reach lo: the zone becomes the scope id, not 0
    (a hand-made (address, port, 0, 0) dropped it and connect failed with EINVAL)."""
    from bridged.net.resolver import sockaddr

    assert sockaddr("fe80::1%lo", 80) == ("fe80::1", 80, 0, socket.if_nametoindex("lo"))
    assert sockaddr("::1", 80) == ("::1", 80, 0, 0)
    assert sockaddr("127.0.0.1", 80) == ("127.0.0.1", 80)
    with pytest.raises(OSError):
        sockaddr("fe80::1%no-such-if", 80)


class _ScriptedServer:
    """A UDP DNS server on 127.0.0.155:53 whose answers a test writes (a list of (wire, via socket))."""

    def __init__(self, script) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a second address: a spoofer
        try:
            self.sock.bind(("127.0.0.155", 53))
            self.other.bind(("127.0.0.156", 53))
        except OSError as exc:
            self.close()
            if exc.errno == errno.EADDRINUSE:  # another test's server: a clash to fix, not a skip
                raise AssertionError(f"127.0.0.155/156:53 taken: each test needs its own address ({exc})") from None
            pytest.skip(f"cannot bind a test DNS server: {exc}")
        self.sock.settimeout(0.05)
        self.script, self._stop = script, False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                packet, peer = self.sock.recvfrom(4096)
            except OSError:
                continue
            for wire, spoofed in self.script(dns.message.from_wire(packet)):
                (self.other if spoofed else self.sock).sendto(wire, peer)

    def close(self) -> None:
        self._stop = True
        if hasattr(self, "_thread"):
            self._thread.join(2)
        self.sock.close()
        self.other.close()


def _response(query, rcode=0, answers=(), truncated=False, id_delta=0):
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    response.answer.extend(answers)
    if truncated:
        response.flags |= dns.flags.TC
    response.id = (response.id + id_delta) & 0xFFFF
    return response.to_wire()


def _rrset(name, rdtype, *values):
    return dns.rrset.from_text_list(name, 60, "IN", rdtype, list(values))


def _only_a(answer):
    return lambda q: [(answer(q), False)] if q.question[0].rdtype == dns.rdatatype.A else [(_response(q), False)]


@pytest.mark.parametrize("script, expected", [
    # A CNAME chain ending in an A record.
    (_only_a(lambda q: _response(q, answers=[_rrset(q.question[0].name, "CNAME", "b.test."),
                                             _rrset("b.test.", "CNAME", "c.test."),
                                             _rrset("c.test.", "A", "127.0.0.3")])), ["127.0.0.3"]),
    # An answer with the wrong id first: ignored, the right one taken.
    (lambda q: [(_response(q, answers=[_rrset(q.question[0].name, "A", "127.0.0.66")], id_delta=1), False),
                (_response(q, answers=[_rrset(q.question[0].name, "A", "127.0.0.4")]), False)], ["127.0.0.4"]),
    # AAAA records mixed into an A answer are not taken for A.
    (_only_a(lambda q: _response(q, answers=[_rrset(q.question[0].name, "AAAA", "::5"),
                                             _rrset(q.question[0].name, "A", "127.0.0.5")])), ["127.0.0.5"]),
    # 400 addresses (a 6 kB datagram).
    (_only_a(lambda q: _response(q, answers=[_rrset(q.question[0].name, "A", *(
        f"127.0.{i // 250}.{i % 250 + 1}" for i in range(400)))])), 400),
])
def test_odd_answers_that_still_resolve(script, expected):
    """A CNAME chain, a wrong-id answer before the right one, AAAA mixed into A, 400 records."""
    server = _ScriptedServer(script)
    try:
        found = run(resolve("a.test", socket.AF_UNSPEC, ["127.0.0.155"], 2))
    finally:
        server.close()
    assert (len(found) if isinstance(expected, int) else found) == expected


@pytest.mark.parametrize("script, why, within", [
    (lambda q: [(_response(q, rcode=dns.rcode.SERVFAIL), False)], "SERVFAIL", 1.0),
    (lambda q: [(_response(q, rcode=dns.rcode.REFUSED), False)], "REFUSED", 1.0),
    (lambda q: [(_response(q, truncated=True), False)], "no server answered well", 1.0),  # TCP: refused
    (_only_a(lambda q: _response(q, answers=[_rrset(q.question[0].name, "CNAME", "gone.test.")])), "no address", 1.0),
    (_only_a(lambda q: _response(q, answers=[_rrset("evil.test.", "A", "127.0.0.66")])), "no address", 1.0),
    (lambda q: [(_response(q, answers=[_rrset(q.question[0].name, "A", "127.0.0.66")]), True)], "within", 2.0),
    (lambda q: [(b"\x00\x01garbage", False)], "within", 2.0),
])
def test_odd_answers_are_resolve_errors(script, why, within):
    """Failures, a truncated answer, a dangling CNAME, records for another name, an answer
    from another address and garbage: a ResolveError saying why, never the spoofed address."""
    server = _ScriptedServer(script)
    started = time.monotonic()
    try:
        with pytest.raises(ResolveError, match=why):
            run(resolve("a.test", socket.AF_UNSPEC, ["127.0.0.155"], 1.5))
    finally:
        server.close()
    assert time.monotonic() - started < within
