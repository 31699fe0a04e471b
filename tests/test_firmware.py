"""Tests for bridged.firmware: which behaviour each ESP-AT version gets."""

from __future__ import annotations

import dataclasses

import pytest

from bridged.firmware import parse_version, personality, version_problem

# (version, commands it lacks) at the edges of each command's first version.
MISSING = [
    ("2.2.0.0", {"+CIPSTATE", "+CIPSENDL", "+CIPSENDLCFG", "+CIPSNTPINTV", "+CIPFWVER", "+TRANSINTVL",
                 "+CIPSSLCPSKHEX", "+CIPRECVTYPE"}),
    ("2.2.9.9", {"+CIPSTATE", "+CIPSENDL", "+CIPSENDLCFG", "+CIPSNTPINTV", "+CIPFWVER", "+TRANSINTVL",
                 "+CIPSSLCPSKHEX", "+CIPRECVTYPE"}),
    ("2.3.0.0", {"+CIPFWVER", "+TRANSINTVL", "+CIPSSLCPSKHEX", "+CIPRECVTYPE"}),
    ("2.4.2.0", {"+CIPFWVER", "+TRANSINTVL", "+CIPSSLCPSKHEX", "+CIPRECVTYPE"}),
    ("3.0.0.0", {"+TRANSINTVL", "+CIPSSLCPSKHEX", "+CIPRECVTYPE"}),
    ("3.1.0.0", {"+CIPSSLCPSKHEX", "+CIPRECVTYPE"}),
    ("3.2.1.0", {"+CIPRECVTYPE"}),
    ("3.3.0.0", set()),
    ("4.1.1.0", set()),
]


@pytest.mark.parametrize(("version", "missing"), MISSING)
def test_commands_a_version_lacks(version, missing):
    """A command is missing exactly before the release whose core registers it."""
    fw = personality(version)
    assert fw.missing_commands == missing
    assert not fw.has_command("+CIPRECVTYPE") == ("+CIPRECVTYPE" in missing)
    assert fw.has_command("+CIPRECVMODE") and fw.has_command("+CIPSTART")


@pytest.mark.parametrize(("version", "unused", "fields_mux", "fields_single"), [
    ("2.2.0.0", -1, 5, 1),
    ("2.4.2.0", -1, 5, 1),
    ("3.0.0.0", 0, 5, 1),
    ("3.4.0.0", 0, 5, 1),
    ("4.0.9.9", 0, 5, 1),
    ("4.1.0.0", 0, 3, 1),
])
def test_ciprecvlen_shape(version, unused, fields_mux, fields_single):
    """CIPRECVLEN: -1 for unused links before 3.0; in mux mode five values before 4.1,
    then one per link slot; in single mode one value in every version."""
    fw = personality(version)
    assert fw.recvlen_unused == unused
    assert fw.recvlen_fields(3, mux=True) == fields_mux
    assert fw.recvlen_fields(3, mux=False) == fields_single


FLAGS = ("server_netif", "start_timeout", "domain_timeout", "mdns_service_options",
         "tcpopt_keep_alive", "time_updated_urc", "server_passthrough")


@pytest.mark.parametrize(("version", "true"), [
    ("2.2.0.0", set()),
    ("2.3.0.0", {"server_passthrough"}),
    ("2.4.0.0", {"server_passthrough", "tcpopt_keep_alive"}),
    ("3.0.0.0", {"server_passthrough", "tcpopt_keep_alive", "time_updated_urc"}),
    ("4.0.0.0", {"server_passthrough", "tcpopt_keep_alive", "time_updated_urc"}),
    ("4.1.0.0", set(FLAGS)),
])
def test_feature_flags(version, true):
    """Each flag turns on at its release and stays on."""
    fw = personality(version)
    assert {name for name in FLAGS if getattr(fw, name)} == true


@pytest.mark.parametrize(("version", "bin_version"), [
    ("2.2.0.0", "2.2.0"), ("2.4.1.0", "2.4.1"), ("3.1.0.0", "3.1.0"),
    ("3.2.0.0", "v3.2.0.0"), ("4.1.1.0", "v4.1.1.0"),
])
def test_gmr_bin_version(version, bin_version):
    """AT+GMR's Bin version: three numbers in 2.x builds, "v" and four from 3.2."""
    assert personality(version).bin_version == bin_version


@pytest.mark.parametrize(("text", "problem"), [
    ("2.2.0.0", None), ("4.1.0.0", None), ("4.1.255.255", None), ("3.10.200.0", None),
    ("2.1.9.9", "outside 2.2.0.0 to 4.1.255.255"), ("4.2.0.0", "outside 2.2.0.0 to 4.1.255.255"),
    ("5.0.1.0", "outside 2.2.0.0 to 4.1.255.255"), ("1.7.4.0", "outside 2.2.0.0 to 4.1.255.255"),
    *((text, "not four dot-separated numbers 0 to 255") for text in (
        "4.1.1", "4.1.1.0-dev", "", "4.1.256.0", "4.1.999999999.0", "04.1.1.0", "4.01.1.0", "4.1.1.0 ",
        "4.1.1.0\n", "4.1.1.0.0", "4.1.-1.0", "+4.1.1.0", "4_1.1.1.0", "4.1.1_0.0",
        "\u0664.1.1.0", "4.\u0661.1.0", "\uff14.1.1.0", "\U0001d7d2.1.1.0")),
])
def test_version_range(text, problem):
    """bridged emulates 2.2.0.0 up to any 4.1.x, in AT+GMR's ASCII spelling; other text is refused."""
    assert version_problem(text) == problem
    if problem is None:
        assert personality(text).version == parse_version(text)
    else:
        with pytest.raises(ValueError, match=problem):
            personality(text)


def test_personality_is_frozen():
    """A personality cannot be changed after it is derived."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        personality("4.1.1.0").recvlen_unused = -1  # type: ignore[misc]
