"""[faults] tables and faults on demand: what is accepted, and what each mistake says."""

import pytest

from bridged.config import ConfigError, load_config, to_toml
from bridged.faults import CATALOG, Per, kind, parse_demand, parse_spec
from bridged.faults.spec import FaultError


def load(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(str(path), "fast", {}), path


def test_every_kind_has_a_config_key_defaulting_to_off(tmp_path):
    """Each catalogued kind is a [faults] key, unset by default, so nothing fails unless asked."""
    config, _ = load(tmp_path, "")
    assert config.faults.specs() == ()
    assert config.faults.seed is None
    for fault in CATALOG:
        assert getattr(config.faults, fault.name) is None


def test_a_spec_fills_in_the_kinds_defaults_and_keeps_its_schedule(tmp_path):
    """A table gives a FaultSpec with rate, schedule and every parameter of the kind."""
    config, _ = load(tmp_path, "[faults]\nseed = 7\n[faults.wifi_drop]\nat = 10\nevery = 60\nfor = 5\n"
                               "[faults.at_delay]\nrate = 0.25\nms = 40\n")
    assert config.faults.seed == 7
    drop = config.faults.wifi_drop
    assert (drop.rate, drop.at, drop.every, drop.for_) == (None, 10.0, 60.0, 5.0)
    assert drop.param("duration_ms") == 5000.0
    delay = config.faults.at_delay
    assert (delay.rate, delay.param("ms"), delay.param("jitter_ms")) == (0.25, 40.0, 0.0)


def test_bridged_check_output_loads_back_to_the_same_faults(tmp_path):
    """to_toml writes each fault as an inline table that loads back equal."""
    config, path = load(tmp_path, "[faults]\nseed = 3\n[faults.net_bandwidth]\nbytes_per_s = 5000\nlink = 2\n"
                                  "[faults.uart_overrun]\nrate = 0.001\nbytes = 4\n")
    text = to_toml(config)
    assert "net_bandwidth = { bytes_per_s = 5000, link = 2 }" in text
    assert "# tls_fail: not set" in text
    path.write_text(text)
    assert load_config(str(path), "fast", {}).faults == config.faults


@pytest.mark.parametrize(("text", "message"), [
    ("[faults.at_busy]\nrate = 1.5\n", "faults.at_busy.rate: 1.5 is not allowed; allowed: a number from 0 to 1"),
    ("[faults.at_busy]\nrate = -0.1\n", "faults.at_busy.rate: -0.1 is not allowed"),
    ("[faults.at_busy]\nrate = true\n", "faults.at_busy.rate: True is not allowed"),
    ("[faults.teleport]\nrate = 1\n", "faults.teleport: unknown key; allowed: seed, at_busy, at_delay"),
    ("[faults.at_busy]\nfor = -1\n", "faults.at_busy.for: -1 is not allowed; allowed: more than 0 to"),
    ("[faults.at_busy]\nat = -5\n", "faults.at_busy.at: -5 is not allowed; allowed: 0 to"),
    ("[faults.at_busy]\nevery = 0\n", "faults.at_busy.every: 0 is not allowed"),
    ("[faults.at_busy]\nevery = 5\nfor = 10\n", "faults.at_busy.for: 10 is longer than every = 5"),
    ("[faults.wifi_drop]\nevery = 0.001\n",
     "faults.wifi_drop.every: 0.001 is shorter than an event kind's shortest period; allowed: 0.01 to 31536000"),
    ("[faults.at_reset]\nevery = 1e-320\n", "faults.at_reset.every: 9.99989e-321 is shorter"),
    ("[faults.at_busy]\n", "faults.at_busy: neither a rate nor a schedule"),
    ("[faults]\nat_busy = 0.5\n", "faults.at_busy: 0.5 is not a table"),
    ("[faults.net_latency]\nrate = 0.5\n", "faults.net_latency.rate: a condition takes no rate"),
    ("[faults.at_delay]\nrate = 1\nms = -3\n", "faults.at_delay.ms: -3 is not allowed; allowed: a number from 0 to 600000"),
    ("[faults.at_delay]\nrate = 1\nms = nan\n", "faults.at_delay.ms: nan is not allowed"),
    ("[faults.at_delay]\nrate = 1\nmillis = 3\n", "faults.at_delay.millis: unknown key; allowed: rate, at, for, every, ms, jitter_ms"),
    ("[faults.wifi_join_fail]\nrate = 1\ncode = 5\n", "faults.wifi_join_fail.code: 5 is not allowed; allowed: a whole number from 1 to 4"),
    ("[faults.wifi_join_fail]\nrate = 1\ncode = 1.5\n", "faults.wifi_join_fail.code: 1.5 is not allowed"),
    ("[faults.net_tcp_reset]\nrate = 1\nlink = 5\n", "faults.net_tcp_reset.link: 5 is not allowed; allowed: a whole number from -1 to 4"),
    ("[faults]\nseed = -1\n", "faults.seed: -1 is not allowed"),
    ("[faults.at_busy]\nat = 1%s\n" % ("0" * 400), "faults.at_busy.at: 1000"),
    ("[faults.at_busy]\nat = inf\n", "faults.at_busy.at: inf is not allowed"),
])
def test_bad_fault_settings_are_config_errors_naming_the_key(tmp_path, text, message):
    """Unknown names, rates outside 0..1, negative durations...: the error names file, key and what is allowed."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert str(info.value).startswith(f"{tmp_path / 'c.toml'}: ")
    assert message in str(info.value)


def test_a_fault_on_demand_takes_strings_from_the_command_line():
    """`bridged fault NAME k=v` values arrive as text and are checked like the config's."""
    d = parse_demand("at_delay", {"ms": "250", "count": "3"})
    assert (d.name, d.param("ms"), d.param("jitter_ms"), d.count) == ("at_delay", 250.0, 0.0, 3)
    d = parse_demand("net_latency", {"ms": "80", "for": "2.5", "link": "1"})
    assert (d.for_, d.param("link")) == (2.5, 1)
    assert parse_demand("wifi_drop", {}).param("duration_ms") == 5000.0


@pytest.mark.parametrize(("name", "given", "key"), [
    ("at_delay", {"ms": "soon"}, "ms"),
    ("at_delay", {"ms": "-1"}, "ms"),
    ("at_busy", {"count": "0"}, "count"),
    ("at_busy", {"count": "1.5"}, "count"),
    ("net_latency", {"for": "0"}, "for"),
    ("net_latency", {"for": "1" + "0" * 400}, "for"),
    ("net_latency", {"for": 10 ** 400}, "for"),
    ("net_latency", {"for": "nan"}, "for"),
    ("at_busy", {"colour": "red"}, "colour"),
])
def test_a_bad_fault_on_demand_names_the_key(name, given, key):
    """A mistake in `bridged fault` is refused before anything fires, naming the key."""
    with pytest.raises(FaultError) as info:
        parse_demand(name, given)
    assert info.value.key == key


def test_an_unknown_fault_lists_the_known_ones():
    """kind() and parse_demand() refuse a name that is not in the catalog, listing the catalog."""
    with pytest.raises(KeyError, match="known: at_busy, at_delay"):
        parse_demand("teleport", {})


def test_the_catalog_is_consistent():
    """Names are unique and snake_case; every parameter's default is within its own range."""
    names = [k.name for k in CATALOG]
    assert len(names) == len(set(names))
    for fault in CATALOG:
        assert fault.name.isidentifier() and fault.name.islower()
        assert kind(fault.name) is fault
        for p in fault.params:
            assert p.lo <= p.default <= p.hi, (fault.name, p.name)
        # a spec with only the defaults loads: a rate for occasions/events, nothing for conditions
        table = {} if fault.per is Per.CONDITION else {"rate": 0.5}
        assert parse_spec(fault.name, table).name == fault.name
