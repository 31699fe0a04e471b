"""Logging: structlog key-value events on stdout, one setup per process.

Each process calls `setup_logging` once after it starts (the supervisor after
loading the config, every child again right after the fork, which re-binds its
role). Events are key-value (``log.info("link_opened", type="TCP", port=80)``)
and always carry ``proc`` (the role: "supervisor", "front", "link"...),
``link_id`` in a link worker, an ISO 8601 UTC ``timestamp`` and ``level``;
contextvars bound with `structlog.contextvars.bind_contextvars` are merged in.

Output goes to stdout only:

- a readable console rendering when stdout is a terminal (or ``fmt="console"``);
- otherwise one JSON object per line, prefixed by its syslog priority as in
  sd-daemon(3) (``<7>`` debug, ``<6>`` info, ``<4>`` warning, ``<3>`` error,
  ``<2>`` critical), so that journald records the level of each line.

Records from the standard library's `logging` (asyncio, libraries) are rendered
the same way. Each line goes out as one write and is flushed at once, so lines
from several processes sharing stdout do not interleave.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import structlog
import structlog.tracebacks
from structlog.typing import EventDict, Processor, WrappedLogger

from bridged.ops import events
from bridged.printable import printable

__all__ = ["LEVELS", "FORMATS", "get_logger", "setup_logging"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("auto", "json", "console")

#: structlog level name -> syslog priority (sd-daemon(3) prefixes).
_PRIORITY = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "warn": 4,
             "error": 3, "exception": 3, "critical": 2, "fatal": 2}

# This process's identity, set by setup_logging and read by _add_identity.
_identity: dict[str, Any] = {"proc": "main"}


class _StdoutLogger:
    """Writes each rendered line to the current sys.stdout in one write.

    sys.stdout is looked up at every call (so a replaced stdout, such as
    pytest's capture, is honoured) and no lock is held (so a fork can never
    inherit a held one).
    """

    def msg(self, message: str) -> None:
        stream = sys.stdout
        if stream is None:  # pythonw-like environments; nothing to write to
            return
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warning = warn = error = critical = fatal = exception = msg
    failure = err = msg


def _logger_factory(*_args: Any) -> _StdoutLogger:
    return _StdoutLogger()


def _add_identity(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    for key, value in _identity.items():
        event_dict.setdefault(key, value)
    return event_dict


_FIRST_KEYS = ("timestamp", "level", "proc", "link_id", "event")

# Tracebacks as data, without local variables (they may hold payloads or secrets).
_exception_dicts = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


class _JournalJSONRenderer:
    """JSON line with a ``<N>`` syslog priority prefix."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer(sort_keys=False, default=repr)

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        priority = _PRIORITY.get(str(event_dict.get("level", "info")).lower(), 6)
        ordered = {key: event_dict.pop(key) for key in _FIRST_KEYS if key in event_dict}
        ordered.update(event_dict)
        return f"<{priority}>" + str(self._json(logger, name, ordered))


def _use_console(fmt: str) -> bool:
    if fmt == "console":
        return True
    if fmt == "json":
        return False
    try:
        return sys.stdout is not None and sys.stdout.isatty()
    except ValueError:  # stdout closed
        return False


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_identity,
        events.remember,  # the last warnings, for `bridged status`
        structlog.processors.StackInfoRenderer(),
    ]


def _escape_for_terminal(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """Console lines carry MCU and network text (an SSID, a host name, a bad
    command line): escape what a terminal would act on (JSON lines need not)."""
    for key, value in event_dict.items():
        if isinstance(value, str) and key not in ("exception", "stack"):  # our own tracebacks: lines kept
            event_dict[key] = printable(value)
    return event_dict


def _renderer(console: bool) -> list[Processor]:
    if console:
        colors = sys.stdout is not None and sys.stdout.isatty()
        # Plain tracebacks: rich's (the default when it is installed) show local
        # variables, which may hold a password or a key.
        return [_escape_for_terminal,
                structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=structlog.dev.plain_traceback)]
    return [_exception_dicts, _JournalJSONRenderer()]


class _StdlibHandler(logging.Handler):
    """A logging handler writing formatted records like structlog's lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _StdoutLogger().msg(self.format(record))
        except Exception:  # logging.Handler's contract: report, never raise
            self.handleError(record)


def _setup_stdlib(level: int, console: bool) -> logging.Handler:
    """Route the standard library's logging through the same renderer."""

    handler = _StdlibHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *_shared_processors()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *_renderer(console)],
    ))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


@dataclass(frozen=True)
class _Installed:
    """The JSON-lines pipeline `setup_logging` last installed, to know whether it is still in place."""

    level: str
    processors: list[Processor]
    handler: logging.Handler

    def holds(self, level: str) -> bool:
        """Whether logging is still set up as asked: by us, with this level,
        and neither structlog nor the root logger changed since (a test may reset them)."""
        root = logging.getLogger()
        config = structlog.get_config()
        return (self.level == level and structlog.is_configured() and config["processors"] is self.processors
                and config["logger_factory"] is _logger_factory
                and root.handlers == [self.handler] and root.level == LEVELS[level])


_installed: _Installed | None = None


def _remember(level: str, console: bool, processors: list[Processor], handler: logging.Handler) -> None:
    # Console renderers are left out: their colours follow whatever stdout is at the time.
    global _installed
    _installed = None if console else _Installed(level, processors, handler)


def setup_logging(level: str, fmt: str, role: str, link_id: int | None = None) -> None:
    """Configure structlog for this process; call again after a fork.

    Args:
        level: "debug", "info", "warning" or "error".
        fmt: "auto" (console on a terminal, else JSON lines), "json" or "console".
        role: this process's role, logged as ``proc`` on every event.
        link_id: the link slot of a link worker, logged as ``link_id``.

    Raises:
        ValueError: unknown level or format.
    """
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}; allowed: {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}; allowed: {', '.join(FORMATS)}")
    events.take_over()
    _identity.clear()
    _identity["proc"] = role
    if link_id is not None:
        _identity["link_id"] = link_id
    # A forked child starts with its own context, not its parent's.
    structlog.contextvars.clear_contextvars()
    console = _use_console(fmt)
    if not console and _installed is not None and _installed.holds(level):
        # A forked child of a process set up the same way: the pipeline it
        # inherited renders exactly what a new one would (the identity is read
        # at each event), and building another would copy, page by page, what
        # it shares with its parent (90 page faults, 0.3 ms of a worker's 6).
        return
    processors = [*_shared_processors(), *_renderer(console)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=_logger_factory,
        # Not cached: a reconfiguration (after a fork) reaches every logger.
        cache_logger_on_first_use=False,
    )
    _remember(level, console, processors, _setup_stdlib(LEVELS[level], console))


def get_logger(**initial_values: Any) -> Any:
    """Return this process's logger (role and link_id are added to every event)."""
    return structlog.get_logger(**initial_values)
