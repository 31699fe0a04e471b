"""bridged.atomic: the one durable file replacement the store, the PKI and OTA use."""

from __future__ import annotations

import os

import pytest

from bridged.atomic import Replacement, write_atomic


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


def test_a_replacement_written_in_pieces_replaces_only_when_renamed(tmp_path):
    """Streamed pieces stay in a hidden temporary file (the old target intact) until rename()."""
    target = tmp_path / "ota.bin"
    target.write_bytes(b"old image")
    new = Replacement(target, suffix=".part")
    new.write(b"new ")
    new.write(b"image")
    new.finish()
    assert target.read_bytes() == b"old image"
    assert new.path.name.startswith(".ota.bin.") and new.path.name.endswith(".part")
    new.rename()
    new.discard()  # after the rename: nothing to remove
    assert target.read_bytes() == b"new image"
    assert os.listdir(tmp_path) == ["ota.bin"]


def test_a_replacement_left_by_an_exception_is_discarded(tmp_path):
    """An exception inside the with block (a failed download, a cancellation) removes the temporary file."""
    target = tmp_path / "ota.bin"
    with pytest.raises(RuntimeError):
        with Replacement(target) as new:
            new.write(b"half")
            raise RuntimeError("connection lost")
    assert os.listdir(tmp_path) == []


def test_mode_and_no_fsync_for_a_status_file(tmp_path, monkeypatch):
    """mode= sets the new file's permissions; durable=False writes it without any fsync."""
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    target = tmp_path / "fleet.json"
    write_atomic(target, b"{}", mode=0o644, durable=False)
    assert target.stat().st_mode & 0o777 == 0o644
    assert synced == []
    write_atomic(target, b"{}")
    assert len(synced) == 2  # the file, then its directory
