"""bridged.net.hosts (the [dns] hosts table and the hosts-file parser) and the
overrides inside bridged.net.resolver.resolve, against a test DNS server on
127.0.0.158 that must never hear of an overridden name."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest
import structlog
import uvloop

from bridged.net import hosts as hosts_module
from bridged.net import resolver
from bridged.net.hosts import (HostsError, HostsFile, HostTable, overrides, parse_hosts,
                               read_hosts_file, table_from_toml)
from bridged.net.resolver import ResolveError, resolve
from tests.dnsserver import serving

SERVER_IP = "127.0.0.158"
# What DNS would say: an override that failed would answer these instead.
RECORDS = {"example.com": ["127.0.0.99", "::99"], "test.mosquitto.org": ["127.0.0.98"],
           "plain.test": ["127.0.0.97"]}


@pytest.fixture(scope="module")
def dns_server():
    with serving(SERVER_IP, RECORDS) as server:
        yield server


@pytest.fixture
def overridden():
    """Install a table in this process's resolver; take it away afterwards."""
    def install(table: dict[str, tuple[str, ...]]) -> None:
        resolver.set_overrides(table)

    yield install
    resolver.set_overrides({})


def run(coro):
    return uvloop.run(coro)


# -- the hosts file ---------------------------------------------------------------------------

GOOD_FILE = (
    "# a test bench's names\n"
    "\n"
    "127.0.0.1\tmqtt.mydevices.com  broker.example.net   # two names, a tab\n"
    "   ::1 MQTT.MyDevices.com.\r\n"       # the same name again: merged; case and final dot folded
    "127.0.0.2 example.com #no space before the comment\n"
    "127.0.0.1 mqtt.mydevices.com\n"       # a repeated address is kept once
    "fe80::1%lo  link-local.test\n"
    "10.0.0.1 under_score.test x-1.test\n"
    "#127.0.0.3 commented.out\n"
)


def test_hosts_file_lines_give_a_table():
    """Comments, blank lines, several names a line, tabs, CRLF, IPv4 and IPv6; a name
    on several lines gets every line's addresses in file order (nss_files' multi)."""
    table = parse_hosts(GOOD_FILE, "hosts").as_dict()
    assert table == {
        "mqtt.mydevices.com": ("127.0.0.1", "::1"),
        "broker.example.net": ("127.0.0.1",),
        "example.com": ("127.0.0.2",),
        "link-local.test": ("fe80::1%lo",),
        "under_score.test": ("10.0.0.1",),
        "x-1.test": ("10.0.0.1",),
    }


def test_an_empty_hosts_file_is_an_empty_table():
    """Only comments and blanks: no overrides, no error."""
    assert len(parse_hosts("# nothing\n\n   \n", "hosts")) == 0


@pytest.mark.parametrize("text, line, problem", [
    ("127.0.0.1 ok.test\n300.1.2.3 bad.test\n", 2, "the first field is not an IPv4 or IPv6 address"),
    ("127.1 short.test\n", 1, "the first field is not an IPv4"),  # dotted quads only, not inet_aton's shorthand
    ("bad.test 127.0.0.1\n", 1, "the first field is not an IPv4"),
    ("\n\n127.0.0.1\n", 3, "address '127.0.0.1' without a host name"),
    ("127.0.0.1 a..test\n", 1, "'a..test' is not a host name"),
    ("127.0.0.1 ok.test " + "x" * 64 + ".test\n", 1, "is not a host name"),
    ("127.0.0.1 b\u00fccher.test\n", 1, "'b\u00fccher.test' is not a host name"),
    ("127.0.0.1 10.1.2.3\n", 1, "'10.1.2.3' is not a host name"),  # an address is never looked up
    ("127.0.0.1 0x7f.1\n", 1, "'0x7f.1' is not a host name"),
    ("127.0.0.1 a.test\x0cb.test\n", 1, "is not a host name"),  # only blanks and tabs separate
    ("127.0.0.1 star*.test\n", 1, "'star*.test' is not a host name"),
])
def test_malformed_hosts_file_lines_name_the_line(text, line, problem):
    """A malformed line is a HostsError naming the file, the line and what is allowed."""
    with pytest.raises(HostsError) as info:
        parse_hosts(text, "/etc/bridged/hosts")
    assert info.value.problem.startswith(f"/etc/bridged/hosts, line {line}: ")
    assert problem in info.value.problem
    assert info.value.allowed


def test_a_file_that_is_no_hosts_file_is_not_quoted(tmp_path):
    """A secret file named by mistake (a shadow or token file) is refused by line
    without its text reaching the error (and so the log)."""
    for text in ("root:$6$SALTsalt$HASHhash:19000:0:99999:7:::\n", "ghp_TOKEN0123456789abcdef\n",
                 "127.0.0.1 ok.test\nTOKEN0123456789abcdef bad.test\n"):
        path = tmp_path / "secret"
        path.write_text(text)
        with pytest.raises(HostsError) as info:
            read_hosts_file(str(path))
        line = text.count("\n")
        assert info.value.problem == f"{path}, line {line}: the first field is not an IPv4 or IPv6 address"


def test_long_values_are_cut_short_in_errors():
    """A megabyte-long bad name, in the file or as a table key or value, and two long
    spellings of one name, give an error of a line, not a megabyte."""
    long = "x" * 100 + "..." + "y" * 1_000_000
    errors = []
    for attempt in (lambda: parse_hosts(f"127.0.0.1 {long}\n", "hosts"),
                    lambda: table_from_toml({long: "127.0.0.1"}),
                    lambda: table_from_toml({"a.test": long}),
                    lambda: table_from_toml({"x" * 63 + ".test": "::1", "X" * 63 + ".test": "::1"})):
        with pytest.raises(HostsError) as info:
            attempt()
        errors.append(info.value.problem)
    assert all(len(problem) < 200 and "'xxxxxxxx" in problem for problem in errors[:3]), errors
    assert "name the same host" in errors[3] and len(errors[3]) < 200


def test_an_ad_blocking_file_parses_addresses_once(monkeypatch):
    """A file of 100 000s of names on one address parses that address once and parses no
    name as an address: each parse cost ~20 us, and a 16 MB file took 10 s of CPU, longer
    than systemd's watchdog allows a reload on a slow gateway."""
    calls = []
    real = ipaddress.ip_address
    monkeypatch.setattr(ipaddress, "ip_address", lambda text: calls.append(text) or real(text))
    text = "".join(f"0.0.0.0 ad{n}.tracker.example.com\n::1 v6-{n}.test\n" for n in range(5000))
    table = parse_hosts(text + "0.0.0.0 deadbeef.test cafe.1\n", "hosts")
    assert len(table) == 10_002 and table.as_dict()["ad4999.tracker.example.com"] == ("0.0.0.0",)
    assert calls == ["0.0.0.0", "::1", "cafe.1"]  # only a name all hex digits and dots might be an address


def test_a_name_has_at_most_32_addresses():
    """A 33rd different address for one name, in the file (named by line) or in the table,
    is refused: every lookup logs them all and AT+CIPSTART may try each in turn."""
    lines = "".join(f"127.0.0.{n} many.test\n" for n in range(1, 33))
    assert len(parse_hosts(lines + "127.0.0.1 many.test\n" * 100, "hosts").as_dict()["many.test"]) == 32
    with pytest.raises(HostsError) as info:
        parse_hosts(lines + "# more\n127.0.0.33 other.test many.test\n", "hosts")
    assert info.value.problem == "hosts, line 34: 'many.test' has more than 32 addresses"
    assert info.value.allowed == "at most 32 different addresses for a name"
    many = [f"127.0.0.{n}" for n in range(1, 34)]
    assert len(table_from_toml({"a.test": many[:32] + many[:5]}).as_dict()["a.test"]) == 32  # repeats do not count
    with pytest.raises(HostsError, match="entry 'a.test': 33 addresses"):
        table_from_toml({"a.test": many})


def test_read_hosts_file(tmp_path):
    """A readable file gives its path and table."""
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 a.test\n")
    assert read_hosts_file(str(path)) == HostsFile(str(path), HostTable.of({"a.test": ["127.0.0.1"]}))


def test_unreadable_hosts_files_are_errors(tmp_path, monkeypatch):
    """Missing, a directory, a FIFO (without hanging, also behind a symlink), a device,
    a symlink loop, binary data (not UTF-8, or NUL bytes: with the line), too large."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "to-fifo").symlink_to(fifo)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    latin = tmp_path / "latin"
    latin.write_bytes(b"127.0.0.1 a.test\n# M\xfcller\n")
    nul = tmp_path / "nul"
    nul.write_bytes(b"127.0.0.1 a.test\n127.0.0.1 b\0.test\n")
    big = tmp_path / "big"
    big.write_text("127.0.0.1 a.test\n" * 10)
    monkeypatch.setattr(hosts_module, "MAX_FILE", 100)
    for path, problem in [(tmp_path / "missing", "cannot read: No such file"),
                          (tmp_path, "not a regular file"), (fifo, "not a regular file"),
                          (tmp_path / "to-fifo", "not a regular file"), ("/dev/zero", "not a regular file"),
                          (tmp_path / "loop", "cannot read: Too many levels of symbolic links"),
                          (latin, "line 2: not UTF-8 text"), (nul, "line 2: 'b\\x00.test' is not a host name"),
                          (big, "larger than 100 bytes")]:
        with pytest.raises(HostsError) as info:
            read_hosts_file(str(path))
        assert info.value.problem.startswith(str(path)), path
        assert problem in info.value.problem, path


# -- the [dns] hosts table -----------------------------------------------------------------------


def test_toml_table_takes_an_address_or_a_list():
    """One address or a list; names and addresses normalised, a list's order kept."""
    table = table_from_toml({"Test.Mosquitto.org.": "127.0.0.1", "example.com": ["0::1", "127.0.0.2", "::1"]})
    assert table.as_dict() == {"test.mosquitto.org": ("127.0.0.1",), "example.com": ("::1", "127.0.0.2")}


@pytest.mark.parametrize("value, problem", [
    ({"exa mple.com": "127.0.0.1"}, "'exa mple.com' is not a host name"),
    ({"": "127.0.0.1"}, "'' is not a host name"),
    ({"127.0.0.1": "127.0.0.2"}, "'127.0.0.1' is not a host name"),
    ({"example.com": "localhost"}, "entry 'example.com': 'localhost' is not an IPv4 or IPv6 address"),
    ({"example.com": 2130706433}, "entry 'example.com': 2130706433 is not an IPv4"),
    ({"example.com": []}, "entry 'example.com': an empty list"),
    ({"example.com": ["127.0.0.1", "::g"]}, "entry 'example.com': '::g' is not"),
    ({"example": {"com": "127.0.0.1"}}, 'quote a name that has dots: "example.com"'),
    ({"example.com": "127.0.0.1", "EXAMPLE.com.": "::1"}, "'example.com' and 'EXAMPLE.com.' name the same host"),
])
def test_malformed_toml_tables_say_which_entry(value, problem):
    """A bad name, address, empty list, nested table or a name given twice names the entry and what is allowed."""
    with pytest.raises(HostsError) as info:
        table_from_toml(value)
    assert problem in info.value.problem
    assert info.value.allowed


@pytest.mark.parametrize("address, problem", [
    ("fe80::1%a\r\nOK", "has a zone that is not an interface name"),  # would forge a reply line
    ('fe80::1%a"b', "has a zone that is not an interface name"),  # would close +CIPDOMAIN's quotes
    ("fe80::1%" + "e" * 16, "has a zone that is not an interface name"),  # IFNAMSIZ is 16 with the NUL
    ("fe80::1%\u00e9th0", "has a zone that is not an interface name"),
    ("::ffff:127.0.0.1", "is IPv4-mapped: write 127.0.0.1"),
    ("::FFFF:7f00:2", "is IPv4-mapped: write 127.0.0.2"),
])
def test_zones_must_be_interface_names_and_mapped_addresses_are_refused(address, problem):
    """An IPv6 zone other than an interface name or index, or an IPv4-mapped address,
    is refused in the table and in the file, saying what is allowed."""
    with pytest.raises(HostsError) as info:
        table_from_toml({"example.com": address})
    assert problem in info.value.problem and "names an interface" in info.value.allowed
    if "\n" not in address:  # in a file, a line end ends the line
        with pytest.raises(HostsError, match="line 1: .*" + problem.split(":")[0]):
            parse_hosts(f"{address} example.com\n", "hosts")


def test_interface_zones_are_kept():
    """A link-local address may name its interface by name or index; the zone stays in the answer."""
    table = table_from_toml({"a.test": "fe80::1%eth0.100", "b.test": ["FE80::2%3", "fe80::3%wl-an_0"]})
    assert table.as_dict() == {"a.test": ("fe80::1%eth0.100",), "b.test": ("fe80::2%3", "fe80::3%wl-an_0")}


def test_an_international_name_is_refused_with_its_ascii_form_suggested():
    """A name in Unicode could never match what the MCU sends (bytes, no IDNA): the error says to write xn--."""
    with pytest.raises(HostsError) as info:
        table_from_toml({"b\u00fccher.example": "127.0.0.1"})
    assert "'b\u00fccher.example' is not a host name" in info.value.problem
    assert "in its ASCII form (xn--...)" in info.value.allowed
    assert table_from_toml({"xn--bcher-kva.example": "127.0.0.1"}).as_dict() == {"xn--bcher-kva.example": ("127.0.0.1",)}


def test_the_table_wins_over_the_file_name_by_name():
    """A name both give takes the table's addresses only; the file's other names stay."""
    table = HostTable.of({"example.com": ["127.0.0.2"]})
    from_file = HostsFile("/h", HostTable.of({"example.com": ["127.0.0.5", "::5"], "other.test": ["127.0.0.6"]}))
    assert overrides(table, from_file) == {"example.com": ("127.0.0.2",), "other.test": ("127.0.0.6",)}


# -- inside resolve() ----------------------------------------------------------------------------

TABLE = {"example.com": ("127.0.0.2", "::1"), "test.mosquitto.org": ("127.0.0.1",), "v6.test": ("::1",)}


@pytest.mark.parametrize("name, family, expected", [
    ("example.com", socket.AF_UNSPEC, ["127.0.0.2", "::1"]),
    ("example.com", socket.AF_INET, ["127.0.0.2"]),
    ("example.com", socket.AF_INET6, ["::1"]),
    ("EXAMPLE.Com.", socket.AF_INET, ["127.0.0.2"]),
    ("test.mosquitto.org", socket.AF_UNSPEC, ["127.0.0.1"]),
    ("v6.test", socket.AF_UNSPEC, ["::1"]),
])
def test_an_override_answers_without_asking_dns(dns_server, overridden, name, family, expected):
    """The override's addresses of the family, IPv4 first, matched as a resolver matches
    names; the server, which knows other addresses for them, is not asked; the use is logged."""
    overridden(TABLE)
    before = len(dns_server.queries)
    with structlog.testing.capture_logs() as logs:
        assert run(resolve(name, family, [dns_server.address], 2)) == expected
    assert len(dns_server.queries) == before
    assert {"event": "host_override", "host": name, "addresses": expected}.items() <= logs[0].items()


@pytest.mark.parametrize("name, family, missing", [
    ("test.mosquitto.org", socket.AF_INET6, "IPv6"),
    ("v6.test", socket.AF_INET, "IPv4"),
])
def test_an_override_without_the_family_is_not_found(dns_server, overridden, name, family, missing):
    """A name overridden with the other family only is "not found", not a DNS query (nss files semantics)."""
    overridden(TABLE)
    before = len(dns_server.queries)
    with pytest.raises(ResolveError, match=f"overridden .* without an {missing} address"):
        run(resolve(name, family, [dns_server.address], 2))
    assert len(dns_server.queries) == before


def test_other_names_and_literals_are_unchanged(dns_server, overridden):
    """A name the table does not hold still goes to the server; a literal is still no lookup."""
    overridden(TABLE)
    assert run(resolve("plain.test", socket.AF_INET, [dns_server.address], 2)) == ["127.0.0.97"]
    assert ("plain.test", "A") in dns_server.queries
    assert run(resolve("127.0.0.5", socket.AF_INET, [dns_server.address], 2)) == ["127.0.0.5"]


def test_without_overrides_dns_answers(dns_server, overridden):
    """The same name with an empty table is asked of the server: the table did the work above."""
    overridden({})
    assert run(resolve("example.com", socket.AF_INET, [dns_server.address], 2)) == ["127.0.0.99"]
    assert ("example.com", "A") in dns_server.queries


@pytest.mark.parametrize("name", [
    "example.com\0", "example.com\0.", "example.com..", ".example.com", "example.com ", " example.com",
    "example.com\r", "ex\u0430mple.com", "e" * 245 + ".example.com",
])
def test_odd_spellings_from_the_mcu_match_nothing(dns_server, overridden, name):
    """A NUL, a blank, an empty label, a lookalike letter or an over-long name is refused
    before the overrides are consulted: no override used, no DNS query."""
    overridden(TABLE)
    before = len(dns_server.queries)
    with structlog.testing.capture_logs() as logs, pytest.raises(ResolveError):
        run(resolve(name, socket.AF_INET, [dns_server.address], 2))
    assert len(dns_server.queries) == before and not logs
