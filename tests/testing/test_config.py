"""bridged.testing._config: a test's overrides become the TOML a device reads."""

from __future__ import annotations

import tomllib

import pytest

from bridged.testing._config import merge, normalise, to_toml


@pytest.mark.parametrize("overrides, expected", [
    (None, {}),
    ({"wifi": {"rssi": -70}}, {"wifi": {"rssi": -70}}),
    ({"wifi.rssi": -70, "wifi": {"ssid": "lab"}}, {"wifi": {"rssi": -70, "ssid": "lab"}}),
    ({"faults.wifi_drop.rate": 0.5}, {"faults": {"wifi_drop": {"rate": 0.5}}}),
    ('[wifi]\nrssi = -70\n', {"wifi": {"rssi": -70}}),
])
def test_overrides_nested_dotted_or_toml_text(overrides, expected):
    """Nested tables, dotted keys and TOML text all give the same nested dicts."""
    assert normalise(overrides) == expected


def test_bad_overrides_say_why():
    """TOML text that does not parse, or a value used as a table, is a ValueError naming it."""
    with pytest.raises(ValueError, match="not TOML"):
        normalise("[wifi\n")
    with pytest.raises(ValueError, match="'wifi' is a value"):
        normalise({"wifi": 1, "wifi.rssi": 2})


def test_merge_keeps_tables_and_replaces_values():
    """A later table merges key by key into an earlier one; values are replaced."""
    base = {"log": {"transcript_max_bytes": 1, "level": "info"}, "uart": {"baud": 9600}}
    assert merge(base, {"log": {"level": "debug"}, "uart": {"baud": 115200}}) == \
        {"log": {"transcript_max_bytes": 1, "level": "debug"}, "uart": {"baud": 115200}}


def test_toml_round_trips_every_kind_of_value():
    """Strings with quotes and escapes, numbers, booleans, arrays, inline and nested
    tables, and keys that need quoting, read back as written."""
    doc = {"firmware": {"at_version": "4.1.1.0", "boot_ms": 0, "boot_banner": False},
           "wifi": {"ssid": 'a "lab"\\net\n\u00e9', "rssi": -70},
           "dns": {"hosts": {"my.host": "127.0.0.1"}, "servers": ["127.0.0.1:53", "[::1]:53"]},
           "uart": {"urc_gap_ms": 2.5},
           "faults": {"seed": 7, "wifi_drop": {"every_s": 1.5, "inline": {"a": 1}}}}
    assert tomllib.loads(to_toml(doc)) == doc


def test_toml_round_trips_characters_beyond_the_basic_plane():
    """An SSID or a key with an emoji (4 UTF-8 bytes, legal in a Wi-Fi SSID) and DEL read back
    as written: JSON's surrogate-pair escapes are no TOML, and the device would not start."""
    doc = {"wifi": {"ssid": "caf\u00e9 \U0001F4F6\x7f", "a\U0001F600b": 1}}
    assert tomllib.loads(to_toml(doc)) == doc


def test_a_lone_surrogate_has_no_toml_form():
    """A string that is no Unicode text (a lone surrogate) is refused with the reason, not written."""
    with pytest.raises(ValueError, match="no TOML form"):
        to_toml({"wifi": {"ssid": "\ud83d"}})
