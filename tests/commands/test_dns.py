"""AT+CIPDOMAIN's name check and answer format, without a daemon."""

from __future__ import annotations

import pytest

from bridged.at.errors import ParamInvalid
from bridged.at.format import cipdomain
from bridged.commands.dns import check_domain


@pytest.mark.parametrize("name", [
    "iot.espressif.cn", "localhost", "a" * 63 + ".test", "x." * 126 + "y", "trailing.dot.", "10.0.0.1", "fe80::1",
])
def test_names_dns_can_carry_pass(name):
    """Names within DNS's limits (253 bytes, labels 1..63), and address literals, are accepted."""
    check_domain(name)


@pytest.mark.parametrize("name, why", [
    ("", "empty"),
    (".", "empty"),
    ("a..b", "label of 0 bytes"),
    ("a" * 64 + ".test", "label of 64 bytes"),
    ("x." * 127 + "y", "255 bytes long"),
    ("has space", "printable ASCII"),
    ("tab\there", "printable ASCII"),
    ("caf\xe9.test", "printable ASCII"),
])
def test_names_no_server_could_answer_are_refused(name, why):
    """Empty or overlong names and labels, and bytes no host name has, are ParamInvalid saying why."""
    with pytest.raises(ParamInvalid, match=why):
        check_domain(name)


def test_answer_is_quoted():
    """+CIPDOMAIN:"<address>" as ESP-AT v2+ prints it (NonOS 1.x printed it bare)."""
    assert cipdomain("192.168.1.1") == b'+CIPDOMAIN:"192.168.1.1"\r\n'
    assert cipdomain("2404:6800::2004") == b'+CIPDOMAIN:"2404:6800::2004"\r\n'
