"""systemd/bridged@.service: verified and scored by systemd-analyze offline.

The unit is checked as systemd itself would read it for two instances: a
plain device name and an escaped /dev/serial/by-id path.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "bridged@.service"
INSTANCES = ["ttyAMA0", r"serial-by\x2did-usb\x2dFTDI_FT232R-if00-port0"]

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed")


def _instance(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"bridged@{name}.service"
    path.write_text(UNIT.read_text())
    return path


def _settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@needs_analyze
@pytest.mark.parametrize("name", INSTANCES)
def test_unit_verifies_clean(tmp_path, name):
    """systemd-analyze verify finds nothing but the program not being installed here."""
    result = subprocess.run([analyze, "verify", str(_instance(tmp_path, name))],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and "is not executable: No such file or directory" not in line]
    assert problems == []


@needs_analyze
def test_security_exposure_at_most_2_5(tmp_path):
    """systemd-analyze security rates the unit's exposure 2.5 or better."""
    result = subprocess.run([analyze, "security", "--offline=true", str(_instance(tmp_path, "ttyAMA0"))],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.5


def test_instance_names_a_device_path():
    """The unescaped instance (%I) names the device, so by-id paths with '/' and '-' work."""
    settings = _settings()
    assert settings["ExecStart"][0].endswith("--port /dev/%I")
    assert "StateDirectory" in settings and settings["StateDirectory"] == ["bridged/%i"]
    assert settings["DeviceAllow"] == ["/dev/%I rw"]
    assert "dev-%i.device" in settings["After"][0]  # the device unit's name is the escaped one


def test_configuration_mistakes_are_not_restarted():
    """Exit status 2 (usage or configuration) stops systemd's restart loop."""
    settings = _settings()
    assert settings["Restart"] == ["on-failure"]
    assert settings["RestartPreventExitStatus"] == ["2"]


def test_does_not_wait_for_the_network():
    """An ESP32 answers AT before any network is up: no network-online.target ordering."""
    text = UNIT.read_text()
    assert "network-online.target" not in "\n".join(
        line for line in text.splitlines() if not line.startswith("#"))


def test_private_files_and_bounded_resources():
    """Files bridged writes are private and the service's memory and task count are bounded."""
    settings = _settings()
    assert settings["UMask"] == ["0077"]
    assert settings["ProtectProc"] == ["invisible"]
    assert settings["MemoryMax"] and settings["TasksMax"]


def test_runs_the_installed_virtualenv_as_the_instance():
    """ExecStart runs the bridged that systemd/install.sh puts in /opt/bridged, with --instance %i
    (its /etc/bridged/%i.toml and the StateDirectory= bridged/%i that `bridged pki --instance` uses)."""
    command = _settings()["ExecStart"][0].split()
    assert command[:2] == ["/opt/bridged/bin/bridged", "run"]
    assert command[command.index("--instance") + 1] == "%i"
    assert "--config" not in command  # /etc/bridged/bridged.toml is read without it
    script = (UNIT.parent / "install.sh").read_text()
    assert "\nVENV=/opt/bridged\n" in script


def test_a_port_that_is_missing_at_start_is_retried_without_end():
    """Exit 1 (the port is missing, e.g. the adapter unplugged at boot) is restarted slower
    than systemd's start limit (StartLimitBurst= starts in StartLimitIntervalSec=, by
    default 5 in 10 s), so the instance keeps trying instead of ending in start-limit-hit."""
    settings = _settings()
    restart_sec = float(settings["RestartSec"][0])
    interval = float(settings.get("StartLimitIntervalSec", ["10"])[0].removesuffix("s"))
    burst = int(settings.get("StartLimitBurst", ["5"])[0])
    # Runs that fail at once start every restart_sec: this many fall in one interval.
    assert interval // restart_sec + 1 < burst
