"""bridged.testing as pytest sees it from outside: a separate ``pytest`` run on
a test file of a firmware project, with the plugin loaded by ``-p`` or, from a
wheel installed in a fresh virtualenv, by its pytest11 entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FIRMWARE_TESTS = '''
import os, signal
import pytest

def test_default_profile_from_the_command_line(bridged_device):
    assert bridged_device.status()["uart"]["baud"] == 115200  # --bridged-profile esp32

@pytest.mark.bridged("fast")
def test_the_marker_wins(bridged_device):
    assert bridged_device.status()["uart"]["baud"] == 3000000

def test_fails_with_the_log(bridged_device):
    bridged_device.at.expect(b"ready")
    assert False, "the firmware misbehaved"

def test_device_killed(bridged_device):
    os.kill(bridged_device.pid, signal.SIGKILL)

@pytest.mark.bridged(profil="esp32")
def test_misspelt_marker(bridged_device):
    pass
'''


def run_pytest(project: Path, *args: str, python: str = sys.executable,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m pytest`` in ``project`` (no ini file above it), 3 minutes at most."""
    return subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:locust", "-q",
                           "-o", "addopts=", *args], cwd=project, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=180)


def test_profile_option_marker_failure_log_and_a_dead_device(tmp_path):
    """--bridged-profile sets the profile where no marker does; a failing test's
    report carries the device's log; a device that did not exit 0 errors the test;
    a misspelt marker option is an error naming it."""
    project = tmp_path / "firmware"
    project.mkdir()
    (project / "test_firmware.py").write_text(FIRMWARE_TESTS)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = run_pytest(project, "-p", "bridged.testing", "--bridged-profile", "esp32", "-rA", env=env)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "PASSED test_firmware.py::test_default_profile_from_the_command_line" in out
    assert "PASSED test_firmware.py::test_the_marker_wins" in out
    assert "FAILED test_firmware.py::test_fails_with_the_log" in out
    assert "bridged bridged0 log" in out and '"event": "ready"' in out
    assert "ERROR at teardown of test_device_killed" in out
    assert "bridged device bridged0 (profile 'esp32') exited with status -9, not 0" in out
    assert "ERROR at setup of test_misspelt_marker" in out
    assert "@pytest.mark.bridged: unknown option(s) profil; known: profile, config" in out


def test_a_wheel_registers_the_plugin_by_its_entry_point(tmp_path):
    """A wheel of this tree installed in a fresh virtualenv gives pytest the
    bridged_device fixture and --bridged-profile with no -p and no conftest,
    and a conftest's pytest_plugins naming it too is no conflict."""
    pytest.importorskip("setuptools", reason="the wheel is built without build isolation (no index)")
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    for tree in ("bridged", "config"):
        shutil.copytree(REPO / tree, source / tree, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(wheels), str(source)], check=True, timeout=300,
                   capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    # The test dependencies (pytest, structlog...) come from ours, behind the wheel.
    Path(purelib, "zz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
                    *map(str, wheels.glob("*.whl"))], check=True, timeout=300, capture_output=True)
    project = tmp_path / "firmware"
    project.mkdir()
    (project / "test_firmware.py").write_text(textwrap.dedent(f'''
        import bridged.testing

        def test_from_the_wheel(bridged_device):
            assert bridged.testing.__file__.startswith({str(venv)!r})
            assert bridged_device.status()["uart"]["baud"] == 115200
    '''))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_DISABLE_PLUGIN_AUTOLOAD")}
    done = run_pytest(project, "--bridged-profile", "esp32", python=python, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    (project / "conftest.py").write_text('pytest_plugins = ["bridged.testing"]\n')
    done = run_pytest(project, "--bridged-profile", "esp32", python=python, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_firmware_example_passes(tmp_path):
    """examples/firmware (the README's example): the firmware's telemetry all
    arrives though the Wi-Fi drops mid-upload."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = run_pytest(REPO / "examples" / "firmware", "-p", "bridged.testing", "--basetemp", str(tmp_path),
                      "-W", "ignore::DeprecationWarning", env=env)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr


def test_the_readme_shows_the_example_as_it_runs():
    """The README's firmware test is examples/firmware/test_telemetry.py's, line for line from
    its marker on (the file runs in the suite; the README's copy had drifted from it)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Testing firmware with bridged", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    shown = block[block.index("@pytest.mark.bridged"):].splitlines()
    example = (REPO / "examples" / "firmware" / "test_telemetry.py").read_text()
    ran = [line for line in example[example.index("@pytest.mark.bridged"):].splitlines()
           if not line.strip().startswith('"""')]  # the README leaves the docstring out
    assert shown == ran
