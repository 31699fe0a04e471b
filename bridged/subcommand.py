"""What the ``bridged pki`` and ``bridged ota`` command lines share: a user mistake
(bad arguments, a named error, a file that cannot be read) is one line on stderr
starting ``<prog>: `` and exit status 2, never a usage dump or a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

__all__ = ["Parser", "run", "USAGE_ERROR"]

USAGE_ERROR = 2


class _UsageError(Exception):
    """argparse refused the command line (message without usage text)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose refusals reach ``run`` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: {' '.join(message.split())}", file=sys.stderr)
    return USAGE_ERROR


def run(prog: str, parser: argparse.ArgumentParser, argv: list[str],
        command: Callable[[argparse.Namespace], int], errors: tuple[type[Exception], ...]) -> int:
    """Parse ``argv`` and run ``command`` on it; returns the exit status.

    Args:
        errors: what ``command`` raises for a user mistake (besides OSError), shown as its message.
    """
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(prog, f"{exc} (see {prog} --help)")
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return command(args)
    except errors as exc:
        return _fail(prog, str(exc))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(prog, f"{where}{exc.strerror or exc}")
