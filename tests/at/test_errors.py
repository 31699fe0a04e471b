"""Tests for bridged.at.errors: each AtError knows its ESP-AT error code."""

from __future__ import annotations

import pytest

from bridged.at import errors
from bridged.at.errors import AtError

SUBCATEGORIES = [
    (errors.NoTerminator, 0x02),
    (errors.NoAt, 0x03),
    (errors.ParamLengthMismatch, 0x04),
    (errors.ParamTypeMismatch, 0x05),
    (errors.ParamCountMismatch, 0x06),
    (errors.ParamInvalid, 0x07),
    (errors.ParamParseFail, 0x08),
    (errors.UnsupportedCommand, 0x09),
    (errors.ExecFail, 0x0A),
    (errors.Busy, 0x0B),
    (errors.OperationNotSupported, 0x0C),
    (AtError, 0x0A),  # the generic handler failure
]


@pytest.mark.parametrize(("cls", "sub"), SUBCATEGORIES)
def test_code_layout(cls, sub):
    """code = 0x01 << 24 | subcategory << 16 | ext (esp_at_core.h ESP_AT_ERROR_NO)."""
    assert cls.subcategory == sub
    assert cls().code == 0x01000000 | sub << 16
    assert cls("why", 0x1234).code == 0x01000000 | sub << 16 | 0x1234
    assert issubclass(cls, AtError) and issubclass(cls, Exception)


def test_every_exported_error_is_tested():
    """Each class in __all__ has a row in the subcategory table."""
    assert {getattr(errors, name) for name in errors.__all__} == {cls for cls, _ in SUBCATEGORIES}


def test_spec_codes():
    """The codes the spec names exactly (spec 1.10)."""
    assert errors.UnsupportedCommand().code == 0x01090000
    assert errors.Busy().code == 0x010B0000
    assert errors.NoAt().code == 0x01030000
    assert errors.NoTerminator().code == 0x01020000


def test_ext_is_16_bits():
    """ext is masked to 16 bits so it never spills into the subcategory."""
    error = errors.ParamInvalid("x", 0x12345)
    assert error.ext == 0x2345
    assert error.code == 0x01072345


def test_why_defaults_to_class_name():
    """Without a reason, why (and str) is the class name; with one, it is the reason."""
    assert errors.Busy().why == "Busy"
    assert str(errors.Busy()) == "Busy"
    error = errors.ExecFail("no ip", 3)
    assert error.why == "no ip"
    assert str(error) == "no ip"
    assert error.ext == 3


def test_subcategories_are_distinct():
    """No two specific errors share a subcategory (AtError and ExecFail are the same on purpose)."""
    subs = [cls.subcategory for cls, _ in SUBCATEGORIES if cls is not AtError]
    assert len(subs) == len(set(subs))


def test_body_is_kept_for_the_lines_before_error():
    """An error may carry lines printed before ERROR; by default there are none."""
    assert errors.ExecFail("x").body == b""
    assert errors.ExecFail("timeout", body=b"+PING:TIMEOUT\r\n").body == b"+PING:TIMEOUT\r\n"
