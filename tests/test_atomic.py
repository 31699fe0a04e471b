"""bridged.atomic: the one durable file replacement the store, the PKI and OTA use."""

from __future__ import annotations

import os

import pytest

from bridged.atomic import write_atomic


def test_replaces_the_file_with_mode_0600(tmp_path):
    """The new content replaces the old; the file is private (mkstemp's 0600)."""
    target = tmp_path / "nvs.json"
    target.write_bytes(b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["nvs.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    """Data that cannot be written (not bytes) leaves the old file whole and no .tmp behind."""
    target = tmp_path / "nvs.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(target, "text, not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["nvs.json"]
