"""bridged.ops: the warnings ring, where the control socket lives, sizes in STATUS=."""

from __future__ import annotations

import json
from pathlib import Path

from bridged.ops import events
from bridged.ops.protocol import ProtocolError, daemon_path, decode, encode
from bridged.ops.status import human_bytes


def test_only_warnings_and_errors_are_remembered_and_the_ring_is_bounded():
    """Info events pass by; warnings and errors are kept, the last RING_SIZE of them, flattened."""
    events.reset()
    events.remember(None, "info", {"level": "info", "event": "fine"})
    assert events.recent() == () and events.count() == 0
    for i in range(events.RING_SIZE + 5):
        events.remember(None, "warning", {"level": "warning", "event": "boom", "proc": "link", "link_id": 2,
                                          "timestamp": f"t{i:02d}", "reason": "x" * 500})
    kept = [json.loads(line) for line in events.recent()]
    assert len(kept) == events.RING_SIZE and events.count() == events.RING_SIZE + 5
    assert kept[0]["time"] == "t05" and kept[-1]["link_id"] == 2 and len(kept[-1]["detail"]) == 200
    assert len(events.recent(3)) == 3
    events.reset()
    assert events.recent() == () and events.count() == 0


def test_control_socket_path_choice(monkeypatch, tmp_path):
    """--control wins, then $RUNTIME_DIRECTORY (its first entry), then the state directory."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/bridged/ttyAMA0:/run/other")
    assert daemon_path("rel.sock", tmp_path) == Path.cwd() / "rel.sock"
    assert daemon_path(None, tmp_path) == Path("/run/bridged/ttyAMA0/control.sock")
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert daemon_path(None, tmp_path) == tmp_path / "control.sock"


def test_frames_round_trip_and_refuse_non_objects():
    """A frame is a 4-byte length and a JSON object; anything else is a ProtocolError."""
    frame = encode({"cmd": "status"})
    assert frame[:4] == len(frame[4:]).to_bytes(4, "big") and decode(frame[4:]) == {"cmd": "status"}
    for bad in (b"[1]", b"{", b"\xff", b'"x"'):
        try:
            decode(bad)
        except ProtocolError:
            continue
        raise AssertionError(f"{bad!r} accepted")


def test_human_bytes():
    """Decimal units with one decimal, as the STATUS= line shows them."""
    assert [human_bytes(n) for n in (0, 999, 1000, 1_234_567, 3_400_000_000)] == \
        ["0 B", "999 B", "1.0 kB", "1.2 MB", "3.4 GB"]


def test_listen_never_changes_the_mode_of_what_replaced_the_socket(tmp_path, monkeypatch):
    """--control in a folder another user may write: the socket file swapped for a link to
    a file of ours right after bind() (the race, played deterministically) neither gets
    that file's mode changed to 0660 nor is taken as the control socket."""
    import os
    import socket
    import stat

    import pytest

    from bridged.ops import server

    victim = tmp_path / "secret"
    victim.write_text("x")
    victim.chmod(0o600)
    path = tmp_path / "control.sock"

    class Raced(socket.socket):
        def bind(self, address):
            super().bind(address)
            os.unlink(address)  # the other user's move
            os.symlink(victim, address)

    monkeypatch.setattr(server.socket, "socket", Raced)
    with pytest.raises(server.ListenError):
        server.listen(path)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_listen_makes_a_0660_socket(tmp_path):
    """The socket file is 0660 from its creation (the umask), and is what `unlink` removes."""
    import os
    import stat

    from bridged.ops import server

    path = tmp_path / "control.sock"
    sock, ident = server.listen(path)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert ident == (st.st_dev, st.st_ino)
    finally:
        sock.close()
        server.unlink(path, ident)
    assert not os.path.lexists(path)
