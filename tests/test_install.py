"""systemd/install.sh (run into a scratch root, without the virtualenv) and
systemd/99-bridged.rules. The full install on a clean Debian 12 root, venv
included, is tests/install/test_debian12.sh (slow, run by hand)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from bridged.config import instance_name

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
SCRIPT = SYSTEMD / "install.sh"
RULES = SYSTEMD / "99-bridged.rules"
REPO = SYSTEMD.parent


def test_install_script_parses():
    """bash -n accepts the script, and shellcheck (when installed) finds nothing."""
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the script into `root`, which has the /bin/kill the unit needs (procps)."""
    if root.is_dir() and not os.path.lexists(root / "bin" / "kill"):
        (root / "bin").mkdir(exist_ok=True)
        (root / "bin" / "kill").write_text("")
        (root / "bin" / "kill").chmod(0o755)
    return subprocess.run(["bash", str(SCRIPT), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=120)


def _group(root: Path, name: str) -> list[str]:
    for line in (root / "etc" / "group").read_text().splitlines():
        if line.split(":")[0] == name:
            return line.split(":")
    raise AssertionError(f"no group {name}")


needs_root_and_sysusers = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("systemd-sysusers") is None,
    reason="needs root and systemd-sysusers")


@needs_root_and_sysusers
def test_install_into_a_root(tmp_path):
    """The unit, user bridged in dialout and a 0640 root:bridged config (the gateway's fence) land in the root."""
    result = install(tmp_path, "--no-venv")
    assert result.returncode == 0, result.stderr
    etc = tmp_path / "etc"
    assert (etc / "systemd/system/bridged@.service").read_text() == (SYSTEMD / "bridged@.service").read_text()
    assert (etc / "sysusers.d/bridged.conf").read_text() == (SYSTEMD / "sysusers-bridged.conf").read_text()
    passwd = [line.split(":") for line in (etc / "passwd").read_text().splitlines()]
    user = next(entry for entry in passwd if entry[0] == "bridged")
    group = _group(tmp_path, "bridged")
    assert user[3] == group[2]
    assert "bridged" in _group(tmp_path, "dialout")[3].split(",")
    config = (etc / "bridged" / "bridged.toml").stat()
    assert (stat.S_IMODE(config.st_mode), config.st_uid, config.st_gid) == (0o640, 0, int(group[2]))
    assert (etc / "bridged" / "bridged.toml").read_text() == (REPO / "config" / "gateway.toml").read_text()
    assert (etc / "bridged" / "bridged.toml.example").read_text() == (REPO / "config" / "bridged.toml").read_text()
    assert (etc / "bridged" / "profiles").is_dir()


@needs_root_and_sysusers
def test_reinstall_keeps_the_config_and_uninstall_removes_the_rest(tmp_path):
    """Running it again keeps an edited bridged.toml; --uninstall disables instances and keeps
    /etc/bridged and /var/lib/bridged, which --purge removes."""
    assert install(tmp_path, "--no-venv").returncode == 0
    config = tmp_path / "etc" / "bridged" / "bridged.toml"
    config.write_text('[wifi]\npassword = "secret!!"\n')
    result = install(tmp_path, "--no-venv")
    assert result.returncode == 0, result.stderr
    assert config.read_text() == '[wifi]\npassword = "secret!!"\n'
    assert f"keeping {config}" in result.stdout
    config.chmod(0o644)
    assert "others can read" in install(tmp_path, "--no-venv").stdout
    config.chmod(0o660)  # the service could rewrite its own fence
    assert f"warning: the service's user or group may change {config}" in install(tmp_path, "--no-venv").stdout
    config.chmod(0o640)
    uid = int(next(line for line in (tmp_path / "etc/passwd").read_text().splitlines()
                   if line.startswith("bridged:")).split(":")[2])
    os.chown(config, uid, 0)
    assert f"warning: the service's user or group may change {config}" in install(tmp_path, "--no-venv").stdout
    os.chown(config, 0, 0)
    assert "warning" not in install(tmp_path, "--no-venv").stdout

    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "bridged@ttyAMA0.service").symlink_to("/etc/systemd/system/bridged@.service")
    (tmp_path / "var/lib/bridged/ttyAMA0").mkdir(parents=True)
    result = install(tmp_path, "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not os.path.lexists(wants / "bridged@ttyAMA0.service")
    assert not (tmp_path / "etc/systemd/system/bridged@.service").exists()
    assert not (tmp_path / "etc/sysusers.d/bridged.conf").exists()
    assert config.exists() and (tmp_path / "var/lib/bridged/ttyAMA0").is_dir()
    assert install(tmp_path, "--uninstall", "--purge").returncode == 0
    assert not (tmp_path / "etc/bridged").exists() and not (tmp_path / "var/lib/bridged").exists()


def test_install_script_mistakes(tmp_path):
    """A wrong argument ends the script with status 1 and a line saying what is wrong."""
    result = install(tmp_path, "--purge")
    assert (result.returncode, result.stderr) == (1, "install.sh: --purge goes with --uninstall\n")
    result = install(tmp_path, "--frobnicate")
    assert result.returncode == 1 and "unknown argument '--frobnicate'" in result.stderr
    result = install(tmp_path / "missing")
    assert result.returncode == 1 and "no such directory" in result.stderr


@needs_root_and_sysusers
def test_install_script_names_what_is_missing(tmp_path):
    """Without /bin/kill (procps, for ExecReload=) it refuses before changing anything."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "kill").symlink_to("nowhere")
    result = install(tmp_path, "--no-venv")
    assert result.returncode == 1
    assert result.stderr == f"install.sh: needs {tmp_path}/bin/kill (apt-get install procps)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


# -- the udev rule ------------------------------------------------------------------

_TOKEN = re.compile(r'\s*([A-Z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_MATCH_KEYS = {"ACTION", "SUBSYSTEM", "KERNEL", "ENV", "ATTRS", "SUBSYSTEMS"}


def _rules() -> list[dict[tuple[str, str, str], str]]:
    """Parse the rules file as udev does: KEY[{attr}] OP "value", comma separated."""
    rules = []
    for line in RULES.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        tokens, pos = {}, 0
        while pos < len(line):
            match = _TOKEN.match(line, pos)
            assert match, f"cannot parse at {line[pos:pos + 40]!r}"
            key, attr, op, value, _ = match.groups()
            tokens[(key, attr or "", op)] = value.replace('\\"', '"')  # udev's only escape in "..."
            pos = match.end()
        rules.append(tokens)
    return rules


def test_udev_rule_starts_the_instance_of_the_adapters_by_id_name():
    """The rule wants bridged@<by-id name escaped>.service, the name 60-serial.rules gives the
    adapter it matches, once systemd (252) has read its backslash escapes."""
    [rule] = _rules()
    assert rule[("ACTION", "", "==")] == "add" and rule[("SUBSYSTEM", "", "==")] == "tty"
    assert rule[("TAG", "", "+=")] == "systemd"
    assert all(op in ("==", "!=") for key, _, op in rule if key in _MATCH_KEYS - {"ENV"})
    serial = rule[("ENV", "ID_SERIAL", "==")]
    interface = rule[("ENV", "ID_USB_INTERFACE_NUM", "==")]
    by_id = f"/dev/serial/by-id/usb-{serial}-if{interface}-port0"
    wanted = rule[("ENV", "SYSTEMD_WANTS", "+=")].replace("\\\\", "\\")
    assert wanted == f"bridged@{instance_name(by_id)}.service"
    if shutil.which("systemd-escape"):
        escaped = subprocess.run(["systemd-escape", "--template", "bridged@.service", "--path",
                                  by_id.removeprefix("/dev/")],
                                 capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        assert wanted == escaped


_FAKE_PYTHON = """#!/bin/bash
# Stands in for python3: the version checks pass; -m venv DIR makes DIR/bin with a python
# (pip a no-op) and a bridged that answers --version, honouring the umask as venv does.
if [ "$1" = -m ] && [ "$2" = venv ]; then
    mkdir -p "$3/bin"
    printf '#!/bin/sh\\nexit 0\\n' > "$3/bin/python"
    printf '#!/bin/sh\\necho bridged 0.1.0\\n' > "$3/bin/bridged"
    chmod +x "$3/bin/python" "$3/bin/bridged"
fi
exit 0
"""


@needs_root_and_sysusers
def test_what_is_installed_is_readable_by_the_service_whatever_roots_umask(tmp_path):
    """Run by a root whose umask is 077 (hardened systems set 027 or 077), the virtualenv and
    the directories made on the way are still readable and executable by user bridged."""
    python = tmp_path / "python3"
    python.write_text(_FAKE_PYTHON)
    python.chmod(0o755)
    root = tmp_path / "root"
    root.mkdir()
    (root / "bin").mkdir()
    (root / "bin" / "kill").write_text("")
    (root / "bin" / "kill").chmod(0o755)
    result = subprocess.run(["bash", "-c", 'umask 077 && exec bash "$@"', "bash", str(SCRIPT), "--root", str(root)],
                            env={**os.environ, "PYTHON": str(python)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for path in ("opt/bridged", "opt/bridged/bin", "opt/bridged/bin/bridged", "etc/systemd/system",
                 "etc/sysusers.d", "etc/bridged", "etc/bridged/profiles"):
        mode = stat.S_IMODE((root / path).stat().st_mode)
        assert mode & 0o005 == 0o005, f"{path} is {mode:o}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
@pytest.mark.parametrize("owner, mode", [(65534, 0o755), (0, 0o777), (0, 0o1777)])
def test_debian12_test_refuses_a_workdir_others_control(tmp_path, owner, mode):
    """tests/install/test_debian12.sh runs as root and chroots into WORKDIR/base (made once and
    reused): a WORKDIR another user owns or may write (/var/tmp is everyone's) would have root
    run their programs. It stops with status 2 before using it."""
    work = tmp_path / "deb12"
    (work / "base" / "usr" / "bin").mkdir(parents=True)
    planted = work / "base" / "usr" / "bin" / "apt-get"
    planted.write_text("#!/bin/sh\ntouch /tmp/owned\n")
    planted.chmod(0o755)
    os.chown(work, owner, owner)
    work.chmod(mode)
    result = subprocess.run(["bash", str(REPO / "tests" / "install" / "test_debian12.sh"), str(work)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{work}" in result.stderr and "other users" in result.stderr, result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["base"]
