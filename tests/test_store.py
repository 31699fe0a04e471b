"""Tests for bridged.store: the AT+SYSSTORE=1 settings file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bridged.store import FILENAME, Store


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / FILENAME


def test_empty_when_no_file(path):
    """A missing file is an empty store, and nothing is written until a change."""
    store = Store(path)
    assert store.snapshot() == {}
    assert store.get("cwmode") is None
    assert store.get("cwmode", 1) == 1
    assert not path.exists()


def test_set_writes_immediately(path):
    """set() writes the file before returning."""
    store = Store(path)
    store.set("cwmode", 3)
    assert json.loads(path.read_text()) == {"version": 1, "values": {"cwmode": 3}}


def test_persists_across_instances(path):
    """A new Store on the same file sees what the last one wrote."""
    store = Store(path)
    store.set("cwmode", 1)
    store.update({"uart": [115200, 8, 1, 0, 1], "sta": {"ssid": "lab", "pwd": "x"}})
    store.delete("cwmode")
    again = Store(path)
    assert again.snapshot() == {"uart": [115200, 8, 1, 0, 1],
                                "sta": {"ssid": "lab", "pwd": "x"}}
    assert "uart" in again and "cwmode" not in again and len(again) == 2


def test_directory_means_nvs_json(tmp_path):
    """Given the state directory, the store uses nvs.json inside it."""
    store = Store(tmp_path)
    store.set("k", "v")
    assert store.path == tmp_path / FILENAME
    assert (tmp_path / FILENAME).is_file()


def test_clear(path):
    """clear() (AT+RESTORE) empties the store on disk too."""
    store = Store(path)
    store.update({"a": 1, "b": 2})
    store.clear()
    assert store.snapshot() == {}
    assert Store(path).snapshot() == {}


def test_mode_0600(path):
    """The file is readable by its owner only (it may hold Wi-Fi passwords)."""
    old = os.umask(0)
    try:
        Store(path).set("pwd", "secret")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_atomic_replace_leaves_no_temp_file(path):
    """Each write replaces the file by rename (a new inode), leaving no temp file."""
    store = Store(path)
    store.set("a", 1)
    first = path.stat().st_ino
    store.set("a", 2)
    assert path.stat().st_ino != first
    assert sorted(p.name for p in path.parent.iterdir()) == [FILENAME]


def test_failed_write_changes_nothing(path, monkeypatch):
    """A write that fails leaves the file, the memory and the directory as they were."""
    store = Store(path)
    store.set("a", 1)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        store.set("a", 2)
    monkeypatch.undo()
    assert store.get("a") == 1
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [FILENAME]


def test_write_syncs_file_and_directory(path, monkeypatch):
    """Both the new file and its directory are fsynced."""
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    Store(path).set("a", 1)
    assert len(synced) == 2
    assert synced[0].startswith(str(path.parent) + "/.")  # the temp file
    assert synced[1] == str(path.parent)


def test_values_must_be_json(path):
    """A value JSON cannot hold is refused and nothing is written."""
    store = Store(path)
    with pytest.raises(TypeError):
        store.set("raw", b"\x00")
    with pytest.raises(TypeError):
        store.set("nan", float("nan"))
    with pytest.raises(TypeError):
        store.update({1: "x"})  # type: ignore[dict-item]
    assert not path.exists()


def test_values_are_copies(path):
    """Changing a returned value does not change the store."""
    store = Store(path)
    store.set("ips", ["1.1.1.1"])
    store.get("ips").append("8.8.8.8")
    store.snapshot()["ips"].append("9.9.9.9")
    assert store.get("ips") == ["1.1.1.1"]


def test_tuples_read_back_as_lists(path):
    """Values are kept as JSON reads them back, in memory as on disk."""
    store = Store(path)
    store.set("t", (1, 2))
    assert store.get("t") == [1, 2] == Store(path).get("t")


@pytest.mark.parametrize("content", [
    b"{not json", b"\xff\xfe", b"[1, 2]", b'{"version": 99, "values": {}}',
    b'{"version": 1, "values": []}', b"",
])
def test_corrupt_file_set_aside(path, content):
    """A corrupt file is renamed aside, logged, and the store starts empty."""
    path.write_bytes(content)
    with capture_logs() as logs:
        store = Store(path)
    assert store.snapshot() == {}
    aside = [p for p in path.parent.iterdir() if p.name.startswith(FILENAME + ".corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert not path.exists()
    assert logs[0]["event"] == "store_corrupt"
    assert logs[0]["log_level"] == "error"
    assert logs[0]["set_aside"] == str(aside[0])
    store.set("a", 1)  # and it works again
    assert Store(path).get("a") == 1


def test_unreadable_file_set_aside(tmp_path):
    """A nvs.json that cannot be read (here a directory) is moved aside too."""
    (tmp_path / FILENAME).mkdir()
    with capture_logs() as logs:
        store = Store(tmp_path)
    assert store.snapshot() == {}
    assert logs[0]["reason"].startswith("unreadable: ")
    assert any(p.name.startswith(FILENAME + ".corrupt-") for p in tmp_path.iterdir())
    store.set("a", 1)
    assert Store(tmp_path).get("a") == 1


def test_two_corruptions_same_second(path):
    """Two files set aside in the same second do not overwrite each other."""
    path.write_bytes(b"bad1")
    Store(path)
    path.write_bytes(b"bad2")
    Store(path)
    aside = sorted(p.read_bytes() for p in path.parent.iterdir()
                   if p.name.startswith(FILENAME + ".corrupt-"))
    assert aside == [b"bad1", b"bad2"]
