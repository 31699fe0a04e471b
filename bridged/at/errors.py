"""Errors a command can end with, each knowing the ESP-AT error code it reports.

ESP-AT v2+ answers every rejected command with a bare ``ERROR`` on the AT port;
the reason goes to its log port only.  We do the same: ``why`` is for bridged's
log, ``code`` is what ``ERR CODE:0x%08x`` shows when AT+SYSLOG=1.

Code layout (esp_at_core.h ``ESP_AT_ERROR_NO``):
``0x01 << 24 | subcategory << 16 | extension``.
"""

from __future__ import annotations

__all__ = [
    "AtError",
    "NoTerminator",
    "NoAt",
    "ParamLengthMismatch",
    "ParamTypeMismatch",
    "ParamCountMismatch",
    "ParamInvalid",
    "ParamParseFail",
    "UnsupportedCommand",
    "ExecFail",
    "Busy",
    "OperationNotSupported",
]


class AtError(Exception):
    """A command that answers ERROR.

    Args:
        why: the reason, for bridged's log (never sent on the AT port).
        ext: the 16-bit extension of the error code (often a parameter index).
        body: information lines the command prints before ERROR (AT+PING's
            ``+PING:TIMEOUT``); the ERR CODE line of AT+SYSLOG=1 follows them.
        value: the offending parameter as the MCU sent it, kept out of ``why``:
            the log shows it except for a command that carries a secret
            (``bridged.commands.registry.carries_secret``).
    """

    subcategory = 0x0A  # CMD_EXEC_FAIL: the generic handler failure

    def __init__(self, why: str = "", ext: int = 0, body: bytes = b"", value: str = "") -> None:
        super().__init__(why or type(self).__name__)
        self.why = why or type(self).__name__
        self.ext = ext & 0xFFFF
        self.body = body
        self.value = value

    @property
    def code(self) -> int:
        return 0x01000000 | (self.subcategory << 16) | self.ext


class NoTerminator(AtError):
    subcategory = 0x02


class NoAt(AtError):
    subcategory = 0x03


class ParamLengthMismatch(AtError):
    subcategory = 0x04


class ParamTypeMismatch(AtError):
    subcategory = 0x05


class ParamCountMismatch(AtError):
    subcategory = 0x06


class ParamInvalid(AtError):
    subcategory = 0x07


class ParamParseFail(AtError):
    subcategory = 0x08


class UnsupportedCommand(AtError):
    subcategory = 0x09


class ExecFail(AtError):
    subcategory = 0x0A


class Busy(AtError):
    subcategory = 0x0B


class OperationNotSupported(AtError):
    subcategory = 0x0C
