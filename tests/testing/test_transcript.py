"""bridged.testing.transcript: following a transcript file as the front writes it."""

from __future__ import annotations

import re

from bridged.testing.transcript import TranscriptFollower
from bridged.uart.transcript_format import Chunk, Direction, Formatter, Mark, MarkKind


def lines(*entries) -> str:
    formatter = Formatter()
    return "".join(line for entry in entries for line in formatter.lines(entry))


def test_streams_and_marks_rebuilt_across_partial_writes(tmp_path):
    """Bytes split over lines and over appends, and marks, are rebuilt in order,
    a line being written is held back, and an unknown mark kind is read too."""
    path = tmp_path / "t"
    payload = bytes(range(256)) * 2
    text = lines(Chunk(Direction.RX, b"AT+CIPSEND=512\r\n", 1.0, 1.0),
                 Mark(MarkKind.COMMAND, {"name": "AT+CIPSEND", "kind": "set"}, 1.1, 1.1),
                 Chunk(Direction.TX, b"\r\nOK\r\n\r\n>", 1.2, 1.2),
                 Chunk(Direction.RX, payload, 1.3, 1.3))
    text += '2026-05-01T10:00:00.000000Z 1.400000 -- fault name=wifi_drop detail="a b"\n'
    follower = TranscriptFollower(path)
    assert not follower.poll()  # no file yet
    cut = len(text) // 2
    path.write_text(text[:cut])
    follower.poll()
    with path.open("a") as file:
        file.write(text[cut:])
    follower.poll()
    assert bytes(follower.rx) == b"AT+CIPSEND=512\r\n" + payload
    assert bytes(follower.tx) == b"\r\nOK\r\n\r\n>"
    command, fault = follower.marks
    assert (command.kind, command.fields, command.rx, command.tx) == \
        ("command", {"name": "AT+CIPSEND", "kind": "set"}, 16, 0)
    assert (fault.kind, fault.fields, fault.text) == \
        ("fault", {"name": "wifi_drop", "detail": "a b"}, 'fault name=wifi_drop detail="a b"')


def test_matches_are_consumed_per_cursor(tmp_path):
    """A match moves its own cursor past it: the same pattern then finds the next one, or None."""
    path = tmp_path / "t"
    path.write_text(lines(Chunk(Direction.RX, b"AT\r\nAT\r\n", 1.0, 1.0),
                          Mark(MarkKind.COMMAND, {"name": "AT", "kind": "execute"}, 1.1, 1.1),
                          Mark(MarkKind.COMMAND, {"name": "AT", "kind": "execute"}, 1.2, 1.2)))
    follower = TranscriptFollower(path)
    follower.poll()
    first, second = follower.find_mark("name=AT "), follower.find_mark(re.compile("name=AT "))
    assert first is not None and second is not None and first.mono < second.mono
    assert follower.find_mark("name=AT ") is None
    assert follower.find_bytes("RX", b"AT\r\n") == b"AT\r\n"
    assert follower.find_bytes("RX", re.compile(rb"A.\r\n")) == b"AT\r\n"
    assert follower.find_bytes("RX", b"AT") is None
    assert follower.find_bytes("TX", b"") == b""



def _marks(first: int, count: int, name: str = "") -> list[str]:
    """Transcript lines of ``count`` marks (the daemon's writer takes a list of whole lines)."""
    formatter = Formatter()
    return [line for i in range(count) for line in formatter.lines(
        Mark(MarkKind.COMMAND, {"name": name or f"AT+N{first + i}", "kind": "set"}, 1.0, 1.0))]


def test_rotations_between_looks_lose_nothing(tmp_path):
    """The daemon's RotatingFile rotates, once or twice between two looks: the follower still sees
    every mark in order (it kept its offset in the old file for the new one and saw nothing more)."""
    from bridged.uart.transcript_file import RotatingFile

    writer = RotatingFile(str(tmp_path / "t"), 4096, 5)
    follower = TranscriptFollower(tmp_path / "t")
    n = 0
    for per_look in (55, 10, 150, 3, 200, 1):  # a mark is ~68 bytes: 150 of them rotate twice
        writer.write_lines(_marks(n, per_look))
        n += per_look
        follower.poll()
    follower.poll()
    assert [m.fields["name"] for m in follower.marks] == [f"AT+N{i}" for i in range(n)]
    writer.close()
    follower.close()


def test_a_file_that_starts_over_is_followed_from_its_start(tmp_path):
    """With transcript_files = 1 the file starts over at the cap: what is written after is seen."""
    from bridged.uart.transcript_file import RotatingFile

    writer = RotatingFile(str(tmp_path / "t"), 4096, 1)
    follower = TranscriptFollower(tmp_path / "t")
    writer.write_lines(_marks(0, 55))
    follower.poll()
    writer.write_lines(_marks(55, 20) + _marks(0, 1, "AT+LAST"))
    follower.poll()
    assert follower.find_mark("name=AT\\+LAST ") is not None
    writer.close()
    follower.close()


def test_memory_is_bounded_and_waits_still_find_what_is_kept(tmp_path, monkeypatch):
    """However much a long test's device says, the follower keeps each stream's newest KEEP_BYTES
    and the newest KEEP_MARKS marks; a mark's rx still counts every byte, and waits still find
    what is kept, in order, their cursors moved with what was dropped."""
    import bridged.testing.transcript as transcript

    monkeypatch.setattr(transcript, "KEEP_BYTES", 256, raising=False)
    monkeypatch.setattr(transcript, "KEEP_MARKS", 5, raising=False)
    path = tmp_path / "t"
    follower = TranscriptFollower(path)
    assert follower.find_bytes("RX", b"0000") is None
    with path.open("a") as file:
        for i in range(100):
            file.write(lines(Chunk(Direction.RX, b"%04d" % i * 16, 1.0, 1.0),
                             Mark(MarkKind.COMMAND, {"name": f"AT+N{i}", "kind": "set"}, 1.0, 1.0)))
            file.flush()
            follower.poll()
            if i == 10:
                assert follower.find_bytes("RX", b"0010") == b"0010"  # the cursor is in what gets dropped
    assert len(follower.rx) == 256 and len(follower.marks) == 5
    assert follower.marks[-1].rx == 100 * 64
    assert follower.find_bytes("RX", b"0097") == b"0097" and follower.find_bytes("RX", b"0099") == b"0099"
    assert follower.find_bytes("RX", b"0098") is None  # consumed: behind the cursor
    assert follower.find_mark("AT\\+N1 ") is None  # dropped
    assert follower.find_mark("AT\\+N9[68] ").fields["name"] == "AT+N96"
    assert follower.find_mark("AT\\+N9[68] ").fields["name"] == "AT+N98"
