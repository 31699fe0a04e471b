"""Where configuration is read from and where state goes: the system
configuration directory and its files, service instance names, the profile
search path, the state directory.
"""

from __future__ import annotations

import os
import re
import site
import stat
import sys
from pathlib import Path

from bridged.config.checks import COMMAND_LINE, ConfigError, _error, _show
from bridged.config.schema import Config

__all__ = ["config_dir", "find_profile", "instance_name", "profile_dirs", "profile_header",
           "state_dir", "system_files"]

#: Where `state_dir` puts state when neither the config nor systemd says.
_SYSTEM_STATE_DIR = Path("/var/lib/bridged")
#: The system configuration directory; $BRIDGED_CONFIG_DIR replaces it.
_SYSTEM_CONFIG_DIR = Path("/etc/bridged")
_REPO_PROFILE_DIR = Path(__file__).resolve().parents[2] / "config" / "profiles"


# --------------------------------------------------------------------------
# System files and service instances.

#: What an instance name (after `instance_name`) may hold: systemd-escape's
#: output alphabet.
_INSTANCE = re.compile(r"[A-Za-z0-9:_.\\-]{1,200}")
_INSTANCE_ALLOWED = ("a systemd instance name such as ttyAMA0 or serial-by\\x2did-usb\\x2d...,"
                     " or a device path such as /dev/serial/by-id/usb-...")


def config_dir() -> Path:
    """The system configuration directory: $BRIDGED_CONFIG_DIR, else /etc/bridged."""
    given = os.environ.get("BRIDGED_CONFIG_DIR", "")
    return Path(given) if given else _SYSTEM_CONFIG_DIR


def _escape_path(path: str) -> str:
    """systemd-escape --path: "serial/by-id/usb-X" -> "serial-by\\x2did-usb\\x2dX"."""
    parts = [p for p in path.split("/") if p and p != "."]
    out = []
    for i, char in enumerate("/".join(parts)):
        if char == "/":
            out.append("-")
        elif char.isascii() and (char.isalnum() or char in ":_") or (char == "." and i > 0):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out) or "-"


def instance_name(text: str, source: str = COMMAND_LINE) -> str:
    """The instance ``--instance`` names, spelt as systemd's %i.

    The unit passes %i (``ttyAMA0``, ``serial-by\\x2did-usb\\x2d...``); a
    person may give the device path instead (``/dev/serial/by-id/usb-...`` or
    ``serial/by-id/usb-...``, anything with a "/"), escaped here as
    systemd-escape --path does, so both name the same files and directory.

    Raises:
        ConfigError: not a usable name (it becomes a file and directory name).
    """
    name = text
    if "/" in text and "\0" not in text:
        name = _escape_path(text.removeprefix("/dev/"))
    if not _INSTANCE.fullmatch(name) or name.startswith(".") or name == "bridged":
        raise _error(source, "instance", f"{_show(text)} is not allowed", _INSTANCE_ALLOWED)
    return name


def system_files(instance: str = "") -> list[Path]:
    """The system config files that exist, in the order they apply:
    ``<config_dir>/bridged.toml``, then ``<config_dir>/<instance>.toml``."""
    directory = config_dir()
    names = ["bridged.toml"] + ([f"{instance}.toml"] if instance else [])
    # A dangling symlink or an unreadable file is still "present": reading it
    # reports what is wrong, naming the file.
    return [directory / n for n in names if os.path.lexists(directory / n)]


# --------------------------------------------------------------------------
# Profiles.


def profile_dirs() -> list[Path]:
    """Directories searched for a profile given by name, in order.

    $BRIDGED_PROFILE_PATH, the system config directory's profiles/, the source
    tree's, then ``share/bridged/profiles`` of a pip install: under sys.prefix
    (a virtualenv or system install) and under the user base (``pip install
    --user``).
    """
    dirs = [Path(p) for p in os.environ.get("BRIDGED_PROFILE_PATH", "").split(":") if p]
    dirs += [config_dir() / "profiles", _REPO_PROFILE_DIR,
             Path(sys.prefix) / "share" / "bridged" / "profiles"]
    user_base = site.getuserbase()
    if user_base:
        dirs.append(Path(user_base) / "share" / "bridged" / "profiles")
    return dirs


def _not_a_file(path: Path) -> str:
    """Why ``path`` is no profile file: missing, a directory, a FIFO, a symbolic link loop..."""
    try:
        info = path.stat()
    except OSError as exc:
        return "no such file" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc)).lower()
    return "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"


def _is_path(profile: str) -> bool:
    return "/" in profile or profile.endswith(".toml")


def find_profile(profile: str, source: str = COMMAND_LINE) -> Path:
    """Return the file for a profile given by path or by name.

    `source` is where the profile was named, for the error message.

    Raises:
        ConfigError: the file does not exist or the name is not valid.
    """
    if _is_path(profile):
        path = Path(profile)
        if not path.is_file():
            raise ConfigError(f"{source}: profile: {profile!r}: {_not_a_file(path)}")
        return path
    dirs = profile_dirs()
    allowed = ("a path to a .toml file, or the name of one in: "
               + ", ".join(str(d) for d in dirs))
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", profile):
        raise _error(source, "profile", f"{profile!r} is not allowed", allowed)
    for directory in dirs:
        candidate = directory / f"{profile}.toml"
        if candidate.is_file():
            return candidate
    raise _error(source, "profile", f"{profile!r} not found", allowed)


def profile_header(path: Path | str) -> str:
    """A profile file's leading comment: what it models and where its figures come from."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------
# State directory.


def _usable(directory: Path, mode: int = 0o700) -> bool:
    try:
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError:
        return False
    return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)


def state_dir(config: Config) -> Path:
    """Return (and create, mode 0700) the directory holding persistent state.

    In order: ``[state] dir``; ``$STATE_DIRECTORY`` (its first entry, as set by
    systemd's StateDirectory=, which already holds the instance);
    /var/lib/bridged when it exists or can be created and is writable;
    ``$XDG_STATE_HOME/bridged`` (default ~/.local/state/bridged). For the
    last two, a service instance (``config.instance``) gets a directory of its
    own below: /var/lib/bridged/<instance>, as StateDirectory=bridged/%i
    (used whenever it exists, so ``bridged pki --instance`` run by the service
    user or root finds the service's).

    Raises:
        OSError: the chosen directory cannot be created.
    """
    if config.state.dir:
        chosen = Path(config.state.dir)
    elif first := os.environ.get("STATE_DIRECTORY", "").split(":")[0]:
        chosen = Path(first)
    elif config.instance and ((_SYSTEM_STATE_DIR / config.instance).is_dir()
                              or _usable(_SYSTEM_STATE_DIR, 0o755)):
        # The service's directory even when it is not ours (a later error says
        # so, naming it) rather than a quiet other one; a new /var/lib/bridged
        # is 0755 as systemd makes it, for the service user to pass through.
        chosen = _SYSTEM_STATE_DIR / config.instance
    elif not config.instance and _usable(_SYSTEM_STATE_DIR):
        return _SYSTEM_STATE_DIR
    else:
        xdg = os.environ.get("XDG_STATE_HOME", "")
        base = Path(xdg) if xdg.startswith("/") else Path.home() / ".local" / "state"
        chosen = base / "bridged" / config.instance if config.instance else base / "bridged"
    chosen.mkdir(mode=0o700, parents=True, exist_ok=True)
    return chosen
