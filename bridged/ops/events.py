"""The last warning and error events of this process, for ``bridged status``.

A structlog processor (`remember`) sees every event that passes the level
filter; warnings and errors (rare: never on the byte path) are copied into a
small ring, flattened to a few short fields.  Each process has its own ring,
emptied (`take_over`) when logging is set up after a fork; the front gathers the
workers' (``LinkStats``) and the supervisor's (``Ping``) into one list.
"""

from __future__ import annotations

import json
import os
from collections import deque
from typing import Any

__all__ = ["RING_SIZE", "count", "recent", "remember", "reset", "take_over"]

RING_SIZE = 20
_LEVELS = frozenset({"warning", "warn", "error", "exception", "critical", "fatal"})
_SKIP = frozenset({"timestamp", "level", "event", "proc", "link_id", "exception", "stack"})
_DETAIL_MAX = 200

_ring: deque[str] = deque(maxlen=RING_SIZE)
_count = 0
_owner = os.getpid()


def remember(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: keep a copy of a warning or an error; pass the event on."""
    global _count
    level = str(event_dict.get("level", "")).lower()
    if level in _LEVELS:
        _count += 1
        try:
            _ring.append(_flatten(level, event_dict))
        except Exception:  # a log line must never fail because of this copy
            pass
    return event_dict


def _flatten(level: str, event_dict: dict[str, Any]) -> str:
    detail = " ".join(f"{k}={v}" for k, v in event_dict.items() if k not in _SKIP)
    if event_dict.get("exception") or event_dict.get("exc_info"):
        detail = (detail + " (traceback in the log)").strip()
    entry = {"time": str(event_dict.get("timestamp", "")), "level": "error" if level == "exception" else level,
             "proc": str(event_dict.get("proc", "")), "event": str(event_dict.get("event", ""))[:80],
             "detail": detail[:_DETAIL_MAX]}
    if "link_id" in event_dict:
        entry["link_id"] = event_dict["link_id"]
    return json.dumps(entry, default=repr)


def recent(limit: int = RING_SIZE) -> tuple[str, ...]:
    """The last ``limit`` remembered events, oldest first, each a JSON object."""
    return tuple(_ring)[-limit:] if limit else ()


def count() -> int:
    """Warnings and errors logged since `reset`."""
    return _count


def reset() -> None:
    """Forget the parent's events (called when logging is set up in a new process)."""
    global _count
    _ring.clear()
    _count = 0


def take_over() -> None:
    """In a process forked since the last call: `reset` (a reload keeps the supervisor's)."""
    global _owner
    if os.getpid() != _owner:
        _owner = os.getpid()
        reset()
