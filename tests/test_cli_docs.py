"""README's command synopses and each command's --help name the same options,
and `bridged --version` says the package's version."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import forkserver

import bridged

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

# The README synopsis line that documents each command (its start, as written there).
COMMANDS = [
    ("run", "bridged run ["),
    ("status", "bridged status ["),
    ("fault", "bridged fault NAME [key=value ...] [--instance"),
    ("fleet", "bridged fleet --count"),
    ("fleet status", "bridged fleet status"),
    ("fleet fault", "bridged fleet fault"),
    ("pki import", "bridged pki import"),
    ("pki list", "bridged pki list"),
    ("pki remove", "bridged pki remove"),
    ("ota sign", "bridged ota sign"),
    ("ota verify", "bridged ota verify"),
]


def _synopsis(start: str) -> str:
    """The synopsis line starting with ``start``, with its continuation lines (indented)."""
    at = README.index(start)
    lines = README[at:].splitlines()
    text = lines[0]
    for line in lines[1:]:
        if not line.startswith("            ["):
            break
        text += " " + line
    return text.split("#")[0]


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text)) - {"--help"}


@pytest.mark.parametrize("command, start", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_readme_synopsis_names_every_option_and_no_other(command, start):
    """Each option --help lists is in README's synopsis of the command, and each there exists."""
    done = forkserver.run([*command.split(), "--help"], timeout=30)
    assert done.returncode == 0, done.stderr
    usage = done.stdout.split("\n\n")[0]  # the usage block: options, not their help text
    documented = _flags(_synopsis(start))
    if command == "fault":
        documented.add("--list")  # its own line: bridged fault --list
    assert _flags(usage) == documented, (command, sorted(_flags(usage) ^ documented))


def test_version():
    """`bridged --version` prints the package's version."""
    done = subprocess.run([sys.executable, "-m", "bridged", "--version"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == f"bridged {bridged.__version__}"


def test_check_takes_runs_options_but_control():
    """As README says: `bridged check` takes `bridged run`'s options but --control."""
    def usage(command: str) -> set[str]:
        done = forkserver.run([command, "--help"], timeout=30)
        return _flags(done.stdout.split("\n\n")[0])
    assert usage("check") == usage("run") - {"--control"}
