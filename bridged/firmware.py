"""ESP-AT firmware personalities: what ``[firmware] at_version`` changes.

Theory of operation.  Host drivers are built against one ESP-AT version and
read its answers accordingly: WiFiEspAT's "AT 2" mode counts any
``+CIPRECVLEN`` value but -1 as a connected link (2.x prints -1 for an unused
link, 3.0+ prints 0), lwESP refuses a version before 3.2.0.0, a 2.x host that
sends AT+CIPSENDL expects ERROR.  So bridged answers as the configured
version does wherever versions differ.  Each difference is one field of
``Personality``, derived once from the version; command handlers read the
field and never compare versions themselves.

Sources: esp-at-behavior.md Appendix A and the version notes in its text,
checked against the AT core libraries (``components/at/lib/
libesp32_at_core.a``: their command-name and format strings) and the
TCP/IP, basic and Wi-Fi command pages of espressif/esp-at at the tags
v2.2.0.0_esp32 ... v4.1.1.0.  Where the core shows a command earlier than
the appendix's columns (AT+CIPRECVTYPE in 3.3.0.0, AT+TRANSINTVL in 3.1.0.0,
AT+CIPSTATE and AT+CIPSENDL in 2.3.0.0, an ESP32-C3-only release), the core
wins: the appendix has no column for those versions.

AT+CIPRECVLEN? departs from esp-at-behavior.md 3.8 and Appendix A, which give
five values in single mode before 4.1 and -1 for unused links up to 3.x.  The
query handler of the RISC-V cores built from the same core commit as the
ESP32 one (v2.2.0.0_esp32 ... v4.1.1.0, at_ipCmd.c.obj) prints one value,
link 0's, when AT+CIPMUX is 0 in every version, and the five link ids 0-4
(hard-coded) in multiple-connection mode before 4.1; the value of a link
without a socket is -1 up to 2.4 (at_get_cip_recv_buf_len) and 0 from 3.0
(at_get_link_available_bytes).  The real outputs quoted with -1 (#280, #655,
#731) are 2.x ones; the 4.0 and 4.1 examples docs show ``+CIPRECVLEN:4`` for
a single connection.

Range: 2.2.0.0 (the first ESP32 release with AT+CIPV6, AT+CMD?, AT+CWSTATE
and AT+CIPSSLCPSK, all of which bridged has) up to any 4.1.x.  5.0 adds
AT+CIPCONNPERSIST and ``+ERRNO:`` lines, which bridged does not emulate.

Not version-dependent in bridged (the same in every version of the range, or
never on the AT port): +IPD, CONNECT/CLOSED/+LINK_CONN, ``busy p...``,
SEND OK/FAIL, ``Recv <n> bytes``, the ``>`` prompt, AT+GMR's line layout;
the log-port texts (``link is not valid`` before 4.1, ``invalid link``
after) stay in bridged's own log.

Known differences not emulated: AT+CIPSNTPCFG? with SNTP off prints
``+CIPSNTPCFG:0`` before 3.2 and ``+CIPSNTPCFG:0,<timezone>`` from 3.2 (core
format strings); ``Bin version`` follows the esp32 module's sdkconfig, which
was not bumped in releases without an ESP32 build (3.0/3.1 "2.5.0", 3.3 and
4.0 "v3.2.0.0") nor in 2.4.2.0 ("2.4.1"): bridged prints the version asked for.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = [
    "Version",
    "Personality",
    "OLDEST",
    "RANGE_TEXT",
    "parse_version",
    "version_problem",
    "personality",
]

Version = tuple[int, int, int, int]

OLDEST: Version = (2, 2, 0, 0)
_NEWEST_MINOR = (4, 1)  # every 4.1.x.x; 4.2 never existed, 5.0 adds what bridged lacks
RANGE_TEXT = "2.2.0.0 to 4.1.255.255"

#: AT+CIPRECVLEN? in multiple-connection mode before 4.1: link ids 0-4, hard-coded.
RECVLEN_FIXED_FIELDS = 5

# Commands bridged has that older versions lack, with the first version that
# registers them (core command tables).  Before it they answer ERROR as an
# unknown command does (ERR CODE 0x01090000), and AT+CMD? does not list them.
_COMMAND_SINCE: dict[str, Version] = {
    "+CIPSTATE": (2, 3, 0, 0),
    "+CIPSENDL": (2, 3, 0, 0),
    "+CIPSENDLCFG": (2, 3, 0, 0),
    "+CIPSNTPINTV": (2, 3, 0, 0),
    "+CIPFWVER": (3, 0, 0, 0),  # at_ota_cmd.c registers it from v3.0.0.0
    "+TRANSINTVL": (3, 1, 0, 0),
    "+CIPSSLCPSKHEX": (3, 2, 0, 0),
    "+CIPRECVTYPE": (3, 3, 0, 0),  # AT+CIPRECVMODE stays in every version
}


@dataclass(frozen=True, slots=True)
class Personality:
    """How one ESP-AT version answers where versions differ.

    Attributes:
        version: the four numbers of ``[firmware] at_version``.
        missing_commands: command names (``+CIPSTATE``) this version lacks.
        recvlen_unused: AT+CIPRECVLEN?'s value for a link not connected:
            -1 before 3.0, 0 from 3.0 (the cores; see above).
        recvlen_per_link: 4.1+: one value per link slot in multiple-connection
            mode; before, five values there.  Single mode: one in every version.
        server_netif: 4.1+: AT+CIPSERVER takes ``<netif>`` and its query shows
            it as a fifth field.
        start_timeout: 4.1+: AT+CIPSTART / AT+CIPSTARTEX take ``<timeout>``.
        domain_timeout: 4.1+: AT+CIPDOMAIN takes ``<timeout>``.
        mdns_service_options: 4.1+: AT+MDNS takes ``<instance>``, ``<proto>``
            and TXT pairs after ``<port>``.
        tcpopt_keep_alive: 2.4+: AT+CIPTCPOPT has ``<keep_alive>`` (set form
            and a fifth query field).
        time_updated_urc: 3.0+: ``+TIME_UPDATED`` after an SNTP sync.
        server_passthrough: 2.3+: passthrough with a server limited to one
            client (esp-at-behavior.md 3.6, #631); before, single mode only.
        bin_version: AT+GMR's ``Bin version`` text: the 2.x projects set three
            numbers ("2.2.0"), 3.2 and later "v" and all four ("v3.2.0.0").
    """

    version: Version
    missing_commands: frozenset[str]
    recvlen_unused: int
    recvlen_per_link: bool
    server_netif: bool
    start_timeout: bool
    domain_timeout: bool
    mdns_service_options: bool
    tcpopt_keep_alive: bool
    time_updated_urc: bool
    server_passthrough: bool
    bin_version: str

    def has_command(self, name: str) -> bool:
        return name not in self.missing_commands

    def recvlen_fields(self, links: int, mux: bool) -> int:
        """How many values AT+CIPRECVLEN? prints."""
        if not mux:
            return 1
        return links if self.recvlen_per_link else RECVLEN_FIXED_FIELDS


# Each number is a byte of esp_at_get_version() (esp_at_core.h: main, sub,
# test, custom version), written as AT+GMR prints it: ASCII digits without a
# leading zero.  [0-9], not \d: \d and int() also take other scripts' digits.
_NUMBER = r"(0|[1-9][0-9]{0,2})"
_VERSION = re.compile(r"\.".join([_NUMBER] * 4))


def parse_version(text: str) -> Version | None:
    """``"4.1.1.0"`` -> (4, 1, 1, 0); None unless four dot-separated numbers 0 to 255."""
    match = _VERSION.fullmatch(text)
    if match is None:
        return None
    a, b, c, d = (int(g) for g in match.groups())
    if max(a, b, c, d) > 255:
        return None
    return (a, b, c, d)


def version_problem(text: str) -> str | None:
    """Why bridged cannot emulate ``text``, or None if it can."""
    version = parse_version(text)
    if version is None:
        return "not four dot-separated numbers 0 to 255"
    if version < OLDEST or version[:2] > _NEWEST_MINOR:
        return f"outside {RANGE_TEXT}"
    return None


@functools.lru_cache(maxsize=8)
def personality(at_version: str) -> Personality:
    """The personality of a version (checked by the config: in range).

    Raises:
        ValueError: ``at_version`` is malformed or out of range.
    """
    problem = version_problem(at_version)
    if problem is not None:
        raise ValueError(f"at_version {at_version!r}: {problem}")
    v = parse_version(at_version)
    assert v is not None
    return Personality(
        version=v,
        missing_commands=frozenset(n for n, since in _COMMAND_SINCE.items() if v < since),
        recvlen_unused=-1 if v < (3, 0, 0, 0) else 0,
        recvlen_per_link=v >= (4, 1, 0, 0),
        server_netif=v >= (4, 1, 0, 0),
        start_timeout=v >= (4, 1, 0, 0),
        domain_timeout=v >= (4, 1, 0, 0),
        mdns_service_options=v >= (4, 1, 0, 0),
        tcpopt_keep_alive=v >= (2, 4, 0, 0),
        time_updated_urc=v >= (3, 0, 0, 0),
        server_passthrough=v >= (2, 3, 0, 0),
        bin_version=f"v{at_version}" if v >= (3, 2, 0, 0) else "%d.%d.%d" % v[:3],
    )
