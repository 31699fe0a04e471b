"""The shipped profiles: each says what it models, sets what it says, and `bridged check` shows it."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bridged.config import load_config, profile_header

REPO = Path(__file__).resolve().parent.parent
PROFILE_DIR = REPO / "config" / "profiles"
PROFILES = sorted(PROFILE_DIR.glob("*.toml"))
ESP32 = tomllib.loads((PROFILE_DIR / "esp32.toml").read_text())
FAULT_PROFILES = {
    "weak-wifi": {"wifi_join_fail", "net_latency", "net_bandwidth", "net_udp_loss", "wifi_drop"},
    "flaky-uart": {"uart_drop", "uart_corrupt", "uart_overrun"},
    "cloud-outage": {"dns_fail", "net_connect_refused", "dns_slow"},
}


@pytest.fixture(autouse=True)
def _no_profile_path(monkeypatch):
    monkeypatch.delenv("BRIDGED_PROFILE_PATH", raising=False)


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_profile_opens_with_what_it_models(profile):
    """The header comment names the profile and says, in a few lines, what it is for."""
    header = profile_header(profile)
    assert header.startswith(f'# Profile "{profile.stem}": ')
    assert len(header.splitlines()) >= 3


@pytest.mark.parametrize("name", sorted(FAULT_PROFILES))
def test_fault_profiles_inject_what_their_header_says(name):
    """weak-wifi, flaky-uart and cloud-outage configure exactly their faults; no seed, so each run
    draws and logs one."""
    config = load_config(None, name, {})
    assert {s.name for s in config.faults.specs()} == FAULT_PROFILES[name]
    assert config.faults.seed is None


@pytest.mark.parametrize("name", sorted(FAULT_PROFILES))
def test_fault_profiles_keep_the_esp32_timing(name):
    """The fault profiles are the esp32 profile plus faults: every esp32 key with its value
    but the ones the header explains: flaky-uart turns flow control off (what lets the MCU
    overrun), weak-wifi joins slowly."""
    mine = tomllib.loads((PROFILE_DIR / f"{name}.toml").read_text())
    changed = {("flaky-uart", "uart", "flow_control"): "none", ("weak-wifi", "wifi", "connect_delay_ms"): 8000}
    for section, table in ESP32.items():
        for key, value in table.items():
            assert mine[section][key] == changed.get((name, section, key), value), (section, key)


def test_fast_profile_has_no_faults_and_no_waits():
    """fast: throughput over fidelity, nothing fails on purpose, joins at once."""
    config = load_config(None, "fast", {})
    assert config.faults.specs() == ()
    assert config.uart.urc_gap_ms == 0.0
    assert config.wifi.connect_delay_ms == 0


def test_esp32_joins_in_real_time():
    """esp32 (the default) takes a real chip's association time for AT+CWJAP."""
    assert load_config(None, "esp32", {}).wifi.connect_delay_ms == 3000


def check(*args):
    return subprocess.run([sys.executable, "-m", "bridged", "check", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env={"BRIDGED_CONFIG_DIR": "/nonexistent",
                                                                "PATH": "/usr/bin:/bin"})


def test_check_shows_the_profiles_header_and_which_keys_it_sets():
    """`bridged check --profile weak-wifi` prints the header, marks the keys the profile set and the
    faults it configures; keys it leaves alone carry no mark."""
    result = check("--profile", "weak-wifi", "--baud", "9600")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"\n# ---- {PROFILE_DIR / 'weak-wifi.toml'} ----\n# Profile \"weak-wifi\": " in out
    assert out.startswith("# profile: weak-wifi\n")
    assert "rssi = -82  # profile weak-wifi\n" in out
    assert "baud = 9600  # command line\n" in out
    assert "net_latency = { ms = 60.0, jitter_ms = 50.0, link = -1 }  # profile weak-wifi\n" in out
    assert "\nmax_line = 256\n" in out  # a built-in default: no mark
    assert "# seed: not set\n" in out


def test_check_of_a_config_file_marks_its_keys_with_the_file(tmp_path):
    """A config file's keys are marked with the file, over the profile's."""
    path = tmp_path / "site.toml"
    path.write_text("[wifi]\nrssi = -60\n")
    result = check("--profile", "weak-wifi", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert f"rssi = -60  # {path}\n" in result.stdout


def test_check_shows_the_header_of_a_profile_named_relative_to_its_config_file(tmp_path):
    """A profile named by a relative path in a config file is that file's neighbour: `bridged check`
    shows its header (it looked for it from the working directory and showed none)."""
    (tmp_path / "mine.toml").write_text("# Profile \"mine\": a lab bench.\n\n[wifi]\nrssi = -70\n")
    site = tmp_path / "site.toml"
    site.write_text('profile = "mine.toml"\n')
    result = check("--config", str(site))
    assert result.returncode == 0, result.stderr
    assert f"\n# ---- {tmp_path / 'mine.toml'} ----\n# Profile \"mine\": a lab bench.\n# ----\n" in result.stdout
    assert "rssi = -70  # profile mine.toml\n" in result.stdout


def test_a_profile_path_that_is_no_file_says_what_it_is(tmp_path):
    """A profile path naming a directory, a FIFO or a symbolic link loop is refused, exit 2, saying
    which (it said "no such file" of all three); nothing waits on the FIFO."""
    import os

    fifo, loop = tmp_path / "fifo.toml", tmp_path / "loop.toml"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    for path, said in ((tmp_path, "a directory"), (fifo, "not a regular file"),
                       (loop, "too many levels of symbolic links")):
        result = check("--profile", str(path))
        assert result.returncode == 2, result
        assert f"profile: '{path}': {said}" in result.stderr, result.stderr


def test_an_endless_config_file_is_a_config_error(tmp_path):
    """--config /dev/zero (a file that never ends) is exit 2 naming the file and the limit, not a
    MemoryError traceback after eating the memory."""
    result = check("--config", "/dev/zero")
    assert result.returncode == 2, result.stderr[-500:]
    assert "/dev/zero: larger than 16 MiB" in result.stderr
