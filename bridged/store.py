"""Persistent settings: what AT+SYSSTORE=1 keeps (the ESP's NVS).

Theory of operation
-------------------
The store is a small JSON object kept in memory and in ``<state_dir>/nvs.json``.
Every change is written at once and atomically, so a power cut leaves either
the old file or the new one, never a mix:

1. write the whole new content to a temporary file in the same directory
   (created with mode 0600), flush and fsync it;
2. rename it over nvs.json (atomic within one file system);
3. fsync the directory, so the rename itself is durable.

The in-memory copy changes only once the write succeeded; a failed write
raises OSError and leaves both as they were.

A file that cannot be read or parsed must not stop the daemon from booting
(the ESP boots with an erased NVS too): it is renamed aside to
``nvs.json.corrupt-<UTC timestamp>``, the event is logged, and the store starts
empty. The UART front is the only process that uses the store.

On disk: ``{"version": 1, "values": {key: value, ...}}``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridged.atomic import write_atomic
from bridged.log import get_logger

__all__ = ["FILENAME", "Store"]

FILENAME = "nvs.json"
_VERSION = 1

log = get_logger()


class Store:
    """Key-value settings persisted atomically to a JSON file.

    Args:
        path: the file (normally ``state_dir(config) / "nvs.json"``); an
            existing directory means the nvs.json inside it.

    Keys are strings; values anything JSON can hold (tuples come back as lists).
    """

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        self._path = path / FILENAME if path.is_dir() else path
        self._values: dict[str, Any] = self._load()

    @property
    def path(self) -> Path:
        """The nvs.json file."""
        return self._path

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value stored under `key` (a copy), or `default`."""
        if key not in self._values:
            return default
        return copy.deepcopy(self._values[key])

    def set(self, key: str, value: Any) -> None:
        """Store one value and write the file.

        Raises:
            TypeError: the key is not a string or the value not JSON-serialisable.
            OSError: the file could not be written (the store is unchanged).
        """
        self.update({key: value})

    def update(self, mapping: Mapping[str, Any]) -> None:
        """Store several values with a single write."""
        values = dict(self._values)
        for key, value in mapping.items():
            if not isinstance(key, str):
                raise TypeError(f"store keys are strings, not {type(key).__name__}")
            values[key] = _normalise(value)
        self._write(values)

    def delete(self, key: str) -> None:
        """Remove `key` if present (writing the file only when it was)."""
        if key in self._values:
            values = dict(self._values)
            del values[key]
            self._write(values)

    def clear(self) -> None:
        """Forget everything (AT+RESTORE)."""
        self._write({})

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of every stored value."""
        return copy.deepcopy(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    # -- file handling -----------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            return self._set_aside(f"unreadable: {exc.strerror or exc}")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return self._set_aside(f"not JSON: {exc}")
        if (not isinstance(doc, dict) or doc.get("version") != _VERSION
                or not isinstance(doc.get("values"), dict)):
            return self._set_aside(f"not a version {_VERSION} store")
        return doc["values"]

    def _set_aside(self, reason: str) -> dict[str, Any]:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        counter = 1
        while aside.exists():
            aside = self._path.with_name(f"{self._path.name}.corrupt-{stamp}-{counter}")
            counter += 1
        try:
            os.rename(self._path, aside)
        except OSError as exc:
            log.error("store_corrupt", path=str(self._path), reason=reason,
                      set_aside=None, error=exc.strerror or str(exc))
        else:
            log.error("store_corrupt", path=str(self._path), reason=reason,
                      set_aside=str(aside))
        return {}

    def _write(self, values: dict[str, Any]) -> None:
        data = json.dumps({"version": _VERSION, "values": values},
                          indent=1, sort_keys=True, ensure_ascii=False).encode() + b"\n"
        write_atomic(self._path, data)
        self._values = values


def _normalise(value: Any) -> Any:
    """Return `value` as it reads back from JSON; TypeError if it cannot."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"store values are JSON data: {exc}") from None

