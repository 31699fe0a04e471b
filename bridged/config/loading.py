"""Loading: the layers (profile, config files, command-line overrides)
checked key by key into a `Config`, and a `Config` back to TOML.

See `bridged.config` for the layers and the error messages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bridged.config.checks import COMMAND_LINE, ConfigError, _error, _Refused, _show
from bridged.config.paths import _is_path, find_profile, instance_name, system_files
from bridged.config.schema import _SECTIONS, DEFAULT_PROFILE, Config, _is_secret, _keys
from bridged.faults.spec import FaultSpec
from bridged.net.hosts import HostsFile, HostTable

__all__ = ["load_config", "to_toml"]


# --------------------------------------------------------------------------
# Loading.


def _check(source: str, section: str, key: str, value: Any) -> Any:
    checks = _keys(section)
    if key not in checks:
        raise _error(source, f"{section}.{key}", "unknown key", checks)
    try:
        return checks[key](value)
    except _Refused as exc:
        if _is_secret(section, key):  # it ends up in logs: say what is wrong, never the value
            problem = "the value given (secret, not shown) is not allowed"
        else:
            problem = exc.problem or f"{_show(value)} is not allowed"
        dotted = f"{section}.{key}" + (f".{exc.subkey}" if exc.subkey else "")
        raise _error(source, dotted, problem, exc.allowed) from None


def _apply(values: dict[str, dict[str, Any]], doc: Mapping[str, Any], source: str,
           *, top_level: Iterable[str] = (), origins: dict[str, str] | None = None,
           label: str | None = None) -> None:
    """Check every key of a parsed TOML document and store it into `values`
    (and `label`, else `source`, into `origins` by dotted key)."""
    allowed = [*top_level, *_SECTIONS]
    for section, table in doc.items():
        if section in top_level:
            continue
        if section not in _SECTIONS:
            kind = "unknown section" if isinstance(table, dict) else "unknown key"
            raise _error(source, section, kind, allowed)
        if not isinstance(table, dict):
            raise _error(source, section, f"{_show(table)} is not allowed",
                         f"a table [{section}]")
        for key, value in table.items():
            values[section][key] = _check(source, section, key, value)
            if origins is not None:
                origins[f"{section}.{key}"] = label or source


_MAX_FILE = 16 << 20  # bytes of a config or profile file
_AT_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")


def _read_toml(path: Path | str) -> dict[str, Any]:
    """Parse a TOML file; any failure is a ConfigError naming file and line."""
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_FILE + 1)  # bounded: --config /dev/zero must not eat the memory
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE:
        raise ConfigError(f"{path}: larger than {_MAX_FILE >> 20} MiB: not a configuration file")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        line = getattr(exc, "lineno", None)
        match = _AT_LINE.search(message)
        if line is None:
            line = int(match.group(1)) if match else text.count("\n") + 1
        reason = _AT_LINE.sub("", message).replace("(at end of document)", "").strip()
        column = getattr(exc, "colno", None) or (int(match.group(2)) if match else None)
        where = f"line {line}" + (f", column {column}" if column else "")
        raise ConfigError(f"{path}: {where}: TOML syntax error: {reason}") from None


def _coerce(text: str, kind: type) -> Any:
    """Parse a command-line string for a non-string key; unparsable stays text."""
    try:
        if kind is int:
            return int(text, 0)
        if kind is float:
            return float(text)
    except ValueError:
        return text
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
    return text


def _apply_overrides(values: dict[str, dict[str, Any]], overrides: Mapping[str, Any],
                     origins: dict[str, str]) -> bool:
    applied = False
    for dotted, value in overrides.items():
        if value is None:  # an option not given on the command line
            continue
        section, _, key = dotted.partition(".")
        if section not in _SECTIONS or not key:
            raise _error(COMMAND_LINE, dotted, "unknown key",
                         [f"{s}.<key>" for s in _SECTIONS])
        checks = _keys(section)
        if isinstance(value, str) and key in checks and checks[key].kind is not str:
            value = _coerce(value, checks[key].kind)
        values[section][key] = _check(COMMAND_LINE, section, key, value)
        origins[dotted] = COMMAND_LINE
        applied = True
    return applied


def _chosen_profile(profile: str | None, docs: list[tuple[str, dict[str, Any]]]) -> tuple[str, str, bool]:
    """The profile to apply, where it was named and whether it was asked for:
    `profile` when given, else the last config file's ``profile`` key, else
    the default."""
    explicit, named_in = profile is not None, COMMAND_LINE
    if profile is None:
        for source, doc in docs:
            if "profile" in doc:
                profile, named_in = doc["profile"], source
        if not isinstance(profile, str | None) or profile == "":
            raise _error(named_in, "profile", f"{_show(profile)} is not allowed",
                         "a profile name or a path to a .toml file")
        explicit = profile is not None
    return profile or DEFAULT_PROFILE, named_in, explicit


def _profile_file(profile: str, named_in: str, explicit: bool) -> Path | None:
    """The profile's file; None when it is missing and was not asked for."""
    wanted = profile
    if named_in != COMMAND_LINE and _is_path(profile) and not profile.startswith("/"):
        wanted = str(Path(named_in).parent / profile)  # relative to the config file
    try:
        return find_profile(wanted, named_in)
    except ConfigError:
        if explicit:
            raise
        return None


def load_config(config_path: str | os.PathLike[str] | None = None,
                profile: str | None = None,
                overrides: Mapping[str, Any] | None = None,
                *, instance: str | None = None, system: bool = False) -> Config:
    """Build the configuration: defaults <- profile <- config files <- overrides.

    Args:
        config_path: the config file, or None for none. When given it is the
            only config file: the system files are not read.
        profile: a profile name or a path to a .toml file; None means the
            last config file's top-level ``profile`` key (a relative path there
            is relative to that file), else "esp32". A missing "esp32"
            profile is not an error when it was not asked for explicitly (the
            built-in defaults are the same values).
        overrides: dotted keys to values (``{"uart.port": "/dev/ttyAMA0"}``).
            None values are skipped; strings are parsed for integer, number and
            boolean keys.
        instance: the service instance (``--instance``; see `instance_name`):
            its system file applies over bridged.toml, and `state_dir` puts
            its state in a directory of its own.
        system: without `config_path`, read `system_files` (the command line
            does; library callers and tests get the defaults alone).

    Raises:
        ConfigError: the message names the file, the dotted key and what is allowed.
    """
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    sources: list[str] = []
    instance = instance_name(instance) if instance else ""
    if config_path is not None:
        paths: list[Path | str | os.PathLike[str]] = [config_path]
    else:
        paths = list(system_files(instance)) if system else []
    docs = [(str(path), _read_toml(path)) for path in paths]
    profile, named_in, explicit = _chosen_profile(profile, docs)
    profile_file = _profile_file(profile, named_in, explicit)
    origins: dict[str, str] = {}
    if profile_file is not None:
        _apply(values, _read_toml(profile_file), str(profile_file), origins=origins,
               label=f"profile {profile}")
        sources.append(str(profile_file))
    for source, doc in docs:
        _apply(values, doc, source, top_level=("profile",), origins=origins)
        sources.append(source)
    if _apply_overrides(values, overrides or {}, origins):
        sources.append(COMMAND_LINE)

    sections = {name: cls(**values[name]) for name, cls in _SECTIONS.items()}
    return Config(**sections, profile=profile, sources=tuple(sources), instance=instance,
                  origins=tuple(origins.items()),
                  profile_file=str(profile_file) if profile_file is not None else "")


# --------------------------------------------------------------------------
# The effective configuration as TOML.


def _toml_value(value: Any) -> str:
    if isinstance(value, FaultSpec):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.as_table().items()) + " }"
    if isinstance(value, HostsFile):
        return json.dumps(value.path)
    if isinstance(value, HostTable):  # an inline table: TOML 1.0 keeps it on one line
        pairs = [f"{json.dumps(name)} = {_toml_value(list(addresses))}" for name, addresses in value.entries]
        return "{ " + ", ".join(pairs) + " }" if pairs else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # A JSON string is a TOML basic string (\" \\ \n \uXXXX escapes alike).
    return json.dumps(value)


def to_toml(config: Config) -> str:
    """The effective configuration as a TOML file (``bridged check``).

    Every key of every section, so an admin sees what the layers made of
    them; secrets (Wi-Fi password, OTA token) are only said to be set or empty.
    """
    lines = [f"# profile: {config.profile}",
             f"# applied over the built-in defaults: {', '.join(config.sources) or 'nothing'}",
             "# (a key set by one of them says which; the others are built-in defaults)"]
    if config.instance:
        lines.insert(0, f"# instance: {config.instance}")
    origins = dict(config.origins)
    for name, cls in _SECTIONS.items():
        section = getattr(config, name)
        lines += ["", f"[{name}]"]
        for f in dataclasses.fields(cls):
            value = getattr(section, f.name)
            if value is None:  # TOML has no null: an unset seed, a fault not configured
                line = f"# {f.name}: not set"
            elif not f.repr:
                line = f"# {f.name}: {'set' if value else 'empty'} (secret, not shown)"
            else:
                line = f"{f.name} = {_toml_value(value)}"
            origin = origins.get(f"{name}.{f.name}")
            lines.append(f"{line}  # {origin}" if origin else line)
    return "\n".join(lines) + "\n"
