"""The AT transcript's file: rotation, and what the path may be."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from bridged.uart.transcript_file import RotatingFile

# --------------------------------------------------------------------------
# The rotating file.


def _line(i: int) -> str:
    return f"line {i:05d} " + "x" * 88 + "\n"  # 100 bytes


def test_rotation_at_the_cap_keeps_n_files(tmp_path):
    """At the cap the file moves to .1 (.1 to .2 ...); N files stay, none over the cap, none split."""
    path = tmp_path / "t"
    f = RotatingFile(str(path), 1000, 3)
    f.write_lines(_line(i) for i in range(45))  # 4500 bytes: 10 lines a file
    f.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["t", "t.1", "t.2"]
    for name in names:
        assert (tmp_path / name).stat().st_size <= 1000
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    kept = "".join((tmp_path / n).read_text() for n in ("t.2", "t.1", "t"))
    assert kept == "".join(_line(i) for i in range(20, 45))


def test_one_file_starts_over(tmp_path):
    """With transcript_files = 1 the file starts over at the cap and no other file appears."""
    path = tmp_path / "t"
    f = RotatingFile(str(path), 1000, 1)
    f.write_lines(_line(i) for i in range(25))
    f.close()
    assert [p.name for p in tmp_path.iterdir()] == ["t"]
    assert path.read_text() == "".join(_line(i) for i in range(20, 25))


def test_appends_and_counts_an_existing_file(tmp_path):
    """A restarted front appends to the file it had; its size counts toward the cap, its mode is narrowed."""
    path = tmp_path / "t"
    path.write_text(_line(0) * 9)
    path.chmod(0o644)
    f = RotatingFile(str(path), 1000, 2)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    f.write_lines([_line(1), _line(2)])
    f.close()
    assert (tmp_path / "t.1").read_text() == _line(0) * 9 + _line(1)
    assert path.read_text() == _line(2)


def test_device_is_neither_rotated_nor_chmodded(tmp_path):
    """A path to a device (here /dev/null) is written as it is: no rename, no mode change."""
    before = os.stat("/dev/null")
    f = RotatingFile("/dev/null", 4096, 2)
    f.write_lines(_line(i) for i in range(100))
    f.close()
    after = os.stat("/dev/null")
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert not os.path.exists("/dev/null.1")


# --------------------------------------------------------------------------
# What the path may be: the folder may be another user's playground (/tmp).


def _victim(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    victim.chmod(0o644)
    return victim


def _untouched(victim) -> bool:
    return victim.read_text() == "keep me\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_symlink_at_the_path_is_refused(tmp_path):
    """A symbolic link planted at the path is refused; the file it points to is neither written nor chmodded."""
    victim = _victim(tmp_path)
    (tmp_path / "t").symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        RotatingFile(str(tmp_path / "t"), 4096, 2)
    assert _untouched(victim)


def test_fifo_is_refused_without_waiting_for_a_reader(tmp_path):
    """A FIFO at the path (no reader, or a reader of someone else's) is refused at once: open() never blocks."""
    fifo = tmp_path / "t"
    os.mkfifo(fifo)
    outcome: list = []
    opener = threading.Thread(target=lambda: outcome.append(_try_open(str(fifo))), daemon=True)
    opener.start()
    opener.join(5)
    if opener.is_alive():  # blocked in open(): let it go, then fail
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        opener.join(5)
        pytest.fail("opening a FIFO with no reader blocked")
    assert "FIFO" in outcome[0]
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert "neither a regular file nor a device" in _try_open(str(fifo))
        assert os.read(reader, 100) == b""  # nothing reached the reader (and no writer is left)
    finally:
        os.close(reader)


def _try_open(path: str) -> str:
    try:
        RotatingFile(path, 4096, 2).close()
    except OSError as exc:
        return str(exc)
    return "opened"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_another_users_file_is_refused(tmp_path):
    """A file at the path owned by another user is refused: its owner could read it whatever mode we set."""
    victim = _victim(tmp_path)
    os.chown(victim, 65534, 65534)
    with pytest.raises(OSError, match="owned by uid 65534"):
        RotatingFile(str(victim), 4096, 2)
    assert _untouched(victim)


def test_hard_linked_file_is_refused(tmp_path):
    """A file with another hard link (planted to one of ours) is refused: appending would change the other file."""
    victim = _victim(tmp_path)
    os.link(victim, tmp_path / "t")
    with pytest.raises(OSError, match="hard links"):
        RotatingFile(str(tmp_path / "t"), 4096, 2)
    assert _untouched(victim)


def test_rotation_never_follows_links_at_the_old_names(tmp_path):
    """Symbolic links planted at <path>.1 and .2 are replaced by the rotated files, never written through."""
    victim = _victim(tmp_path)
    for i in (1, 2):
        (tmp_path / f"t.{i}").symlink_to(victim)
    f = RotatingFile(str(tmp_path / "t"), 1000, 3)
    f.write_lines(_line(i) for i in range(15))
    f.close()
    assert _untouched(victim)
    assert (tmp_path / "t.1").read_text() == "".join(_line(i) for i in range(10))
    assert not (tmp_path / "t.1").is_symlink()


@pytest.mark.parametrize("files", [1, 3])
def test_link_planted_while_rotating_is_refused(tmp_path, monkeypatch, files):
    """A symbolic link planted at the path between the rename (or removal) and the new file's open is refused, not truncated through."""
    victim = _victim(tmp_path)
    path = str(tmp_path / "t")
    f = RotatingFile(path, 1000, files)
    real_replace, real_unlink = os.replace, os.unlink

    def and_plant(real):
        def call(src, *rest):
            real(src, *rest)
            if src == path:
                os.symlink(victim, path)  # the other user wins the race
        return call

    monkeypatch.setattr(os, "replace", and_plant(real_replace))
    monkeypatch.setattr(os, "unlink", and_plant(real_unlink))
    with pytest.raises(OSError, match="made by someone else"):
        f.write_lines(_line(i) for i in range(15))
    f.close()
    assert _untouched(victim)


def test_rotated_file_removed_meanwhile_is_no_error(tmp_path, monkeypatch):
    """A rotated file another process removes while the transcript rotates is skipped; writing goes on."""
    path = tmp_path / "t"
    f = RotatingFile(str(path), 1000, 3)
    f.write_lines(_line(i) for i in range(15))  # t.1 and t now exist
    real_replace = os.replace

    def racing_replace(src, dst):
        if src == f"{path}.1":
            os.remove(src)  # a cleanup job got there first
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", racing_replace)
    f.write_lines(_line(i) for i in range(15, 25))
    f.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "t.1"]
    assert path.read_text() == "".join(_line(i) for i in range(20, 25))
