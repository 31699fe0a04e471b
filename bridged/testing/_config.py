"""A test's configuration overrides -> the TOML file a device runs with.

A test gives overrides as TOML text or as a mapping, nested by section
(``{"wifi": {"connect_delay_ms": 500}}``) or with dotted keys
(``{"wifi.connect_delay_ms": 500}``); both may be mixed.  They are merged over
the plugin's own defaults and written as TOML.  Nothing is validated here:
``bridged run`` validates the file, and a mistake stops the device at start
with its config error, which the plugin reports.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from typing import Any

__all__ = ["Overrides", "merge", "normalise", "to_toml"]

Overrides = Mapping[str, Any] | str | None


def normalise(overrides: Overrides) -> dict[str, Any]:
    """Nested dicts of ``overrides`` (TOML text parsed, dotted keys split).

    Raises:
        ValueError: TOML text that does not parse, or a key that is both a
            value and a table.
    """
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        try:
            return tomllib.loads(overrides)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"bridged config overrides: not TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        *tables, name = str(key).split(".")
        target = out
        for table in tables:
            target = target.setdefault(table, {})
            if not isinstance(target, dict):
                raise ValueError(f"bridged config overrides: {key!r}: {table!r} is a value, not a table")
        if isinstance(value, Mapping):
            merge(target.setdefault(name, {}), normalise(value))
        else:
            target[name] = value
    return out


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into ``base`` (tables recursively, values replaced); returns ``base``."""
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value
    return base


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"bridged config overrides: {value!r} has no TOML form")


def _string(text: str) -> str:
    """A TOML basic string.  Not json.dumps: its escapes of characters beyond
    U+FFFF are surrogate pairs, which TOML refuses (an emoji in an SSID)."""
    out = []
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F:  # control characters: TOML allows them only escaped
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"bridged config overrides: {text!r} has no TOML form (a lone surrogate)")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else _string(key)


def to_toml(doc: Mapping[str, Any], prefix: str = "") -> str:
    """``doc`` as TOML: each table's values under its header, sub-tables after."""
    values = [f"{_key(k)} = {_value(v)}\n" for k, v in doc.items() if not isinstance(v, Mapping)]
    text = ""
    if values and prefix:
        text += f"[{prefix}]\n"
    text += "".join(values)
    for key, table in doc.items():
        if isinstance(table, Mapping):
            name = f"{prefix}.{_key(key)}" if prefix else _key(key)
            text += ("\n" if text else "") + (to_toml(table, name) or f"[{name}]\n")
    return text
