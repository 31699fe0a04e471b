"""bridged.ota_install as a systemd unit runs it: an unprivileged service user with ambient
capabilities (AmbientCapabilities=), which cannot empty the bounding set; install_command
must still end up with no capability and unable to gain one (setuid, file capabilities)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import structlog

REPO = Path(__file__).resolve().parent.parent
NOBODY = ("--reuid=65534", "--regid=65534", "--clear-groups")
AMBIENT = ("--inh-caps=+net_raw,+net_bind_service", "--ambient-caps=+net_raw,+net_bind_service")
# Runs bridged.ota_install.run_install on <dir>/ota.bin as bridged would, after printing
# its own ambient set (the precondition: there is something to lose).
RUNNER = """
import asyncio, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from bridged.ota_install import run_install
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(status["CapAmb"].strip(), flush=True)
asyncio.run(run_install(sys.argv[2], Path(sys.argv[3]), "v1", "ota", "0" * 64))
"""


def _caps(status: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in status.splitlines())
            if k.startswith("Cap") or k == "NoNewPrivs"}


@pytest.fixture
def service_dir():
    """A directory the unprivileged user can work in (pytest's tmp_path is root's alone)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as a service user with ambient capabilities")
    top = Path(tempfile.mkdtemp(prefix="bridged-ota-install-"))
    try:
        top.chmod(0o755)
        work = top / "ota"
        work.mkdir(mode=0o777)
        work.chmod(0o777)
        yield work
    finally:
        shutil.rmtree(top)


def _interpreter() -> str:
    """A Python the service user may run (a venv under /root is not one), or skip."""
    for python in (sys.executable, "/usr/bin/python3"):
        check = [python, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', ''], check=True)"]
        if subprocess.run(["setpriv", *NOBODY, "--", *check], capture_output=True, timeout=30).returncode == 0:
            return python
    pytest.skip("no Python the unprivileged user may run")


def _setuid_id(directory: Path) -> Path:
    """A setuid-root copy of id(1): what a compromised installer would reach for."""
    program = directory / "id"
    shutil.copy2(shutil.which("id"), program)
    program.chmod(0o755 | stat.S_ISUID)
    return program


def test_service_user_with_ambient_caps_gives_install_command_none(service_dir):
    """As an unprivileged user with ambient CAP_NET_RAW and CAP_NET_BIND_SERVICE: the command has
    no capability (inheritable, permitted, effective, ambient), no_new_privs, and a setuid-root
    program it runs stays the service user."""
    setuid = _setuid_id(service_dir)
    without = subprocess.run(["setpriv", *NOBODY, "--", str(setuid), "-u"], capture_output=True, text=True,
                             timeout=30)
    if without.stdout.strip() != "0":
        pytest.skip(f"setuid programs do not work here ({without.stdout.strip() or without.stderr.strip()})")
    probe = service_dir / "probe.sh"
    probe.write_text(f'#!/bin/sh\ncat /proc/self/status > "{service_dir}/status"\n'
                     f'"{setuid}" -u > "{service_dir}/euid"\n')
    (service_dir / "ota.bin").write_bytes(b"image")
    env = dict(os.environ, PYTHONPATH=str(Path(structlog.__file__).parent.parent))
    done = subprocess.run(
        ["setpriv", *NOBODY, *AMBIENT, "--", _interpreter(), "-c", RUNNER, str(REPO), f"/bin/sh {probe}",
         str(service_dir / "ota.bin")], capture_output=True, text=True, timeout=60, cwd="/", env=env)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[0], 16) != 0  # the service had ambient capabilities to lose
    caps = _caps((service_dir / "status").read_text())
    assert {k: caps[k] for k in ("CapInh", "CapPrm", "CapEff", "CapAmb", "NoNewPrivs")} == {
        "CapInh": "0" * 16, "CapPrm": "0" * 16, "CapEff": "0" * 16, "CapAmb": "0" * 16, "NoNewPrivs": "1"}
    assert (service_dir / "euid").read_text().strip() == "65534"
