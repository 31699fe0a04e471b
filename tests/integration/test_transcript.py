"""The AT transcript end to end: the daemon on a pty, the file read back and
compared with what the host really sent and received."""

from __future__ import annotations

import ast
import os
import re
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import forkserver
from tests.harness import Host

# Parsed here without bridged's own parser, so a bug there cannot hide one in the writer.
_BYTES = re.compile(r"(\S+Z) (\d+\.\d{6}) (RX|TX) (\+?\d+) '(.*)' ([0-9a-f ]+)")
_MARK = re.compile(r"(\S+Z) (\d+\.\d{6}) -- (\w+)(.*)")


class TapHost(Host):
    """A host that keeps every byte it wrote and every byte it read."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.sent = bytearray()
        self.received = bytearray()

    def write(self, data: bytes) -> None:
        super().write(data)
        self.sent += data

    def _fill(self, wait: float) -> bool:
        before = len(self.buf)
        got = super()._fill(wait)
        self.received += self.buf[before:]
        return got


@dataclass
class Transcript:
    rx: bytearray = field(default_factory=bytearray)
    tx: bytearray = field(default_factory=bytearray)
    marks: list[tuple[str, dict, int, int]] = field(default_factory=list)  # kind, fields, rx pos, tx pos
    stamps: list[tuple[float, float]] = field(default_factory=list)  # (wall, mono) per line

    def find(self, what: str, /, **fields) -> tuple[str, dict, int, int]:
        for mark in self.marks:
            if mark[0] == what and all(mark[1].get(k) == str(v) for k, v in fields.items()):
                return mark
        raise AssertionError(f"no {what} {fields} among {[(m[0], m[1]) for m in self.marks]}")


def read_transcript(*paths: Path) -> Transcript:
    t = Transcript()
    for path in paths:
        for line in path.read_text().splitlines():
            if m := _BYTES.fullmatch(line):
                wall, mono, direction, _size, printable, hexed = m.groups()
                data = bytes.fromhex(hexed)
                assert ast.literal_eval("b'" + printable + "'") == data, line
                (t.rx if direction == "RX" else t.tx).extend(data)
            elif m := _MARK.fullmatch(line):
                wall, mono, kind, rest = m.groups()
                fields = dict(re.findall(r' (\w+)=("(?:[^"\\]|\\.)*"|\S+)', rest))
                t.marks.append((kind, fields, len(t.rx), len(t.tx)))
            else:
                raise AssertionError(f"not a transcript line: {line!r}")
            stamp = time.mktime(time.strptime(wall[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
            t.stamps.append((stamp + float(wall[19:-1]), float(mono)))
    return t


def test_exchange_send_and_ipd_in_order_with_the_wire_bytes(make_daemon, echo_server, tmp_path):
    """An AT exchange, a CIPSEND with payload, its +IPD echo and a restart appear in order, marked, and RX/TX rebuilt from the file equal the wire."""
    path = tmp_path / "transcript"
    started = time.time()
    d = make_daemon(f'[log]\ntranscript = true\ntranscript_path = "{path}"\n')
    h = TapHost(d.link)
    h.boot()
    assert h.command(b"AT") == b"\r\nOK\r\n"
    assert h.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % echo_server.port) == b"CONNECT\r\n\r\nOK\r\n"
    payload = b"AT\r\nOK\r\n'\"\\\x00\xff" + os.urandom(50)  # lines, quotes and binary inside
    assert h.send_data(b"AT+CIPSEND=%d" % len(payload), payload).endswith(b"SEND OK\r\n")
    assert h.read_ipd() == (None, payload)
    assert h.command(b"AT+CIPCLOSE") == b"CLOSED\r\n\r\nOK\r\n"
    h.command(b"AT+RST")
    h.expect(b"\r\nready\r\n")
    h.read_quiet(0.3)
    assert d.stop() == 0  # the front writes what it holds on its way out
    h.close()
    ended = time.time()

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    t = read_transcript(path)
    assert bytes(t.rx) == bytes(h.sent)
    assert bytes(t.tx) == bytes(h.received)

    sent, got = bytes(h.sent), bytes(h.received)
    assert [m[0] for m in t.marks][:2] == ["transcript_on", "boot"]
    assert t.marks[1][3] == 0  # boot: before "ready" went out
    assert t.marks[-1][0] == "transcript_off"
    command = t.find("command", name="AT+CIPSEND", kind="set")
    assert command[2] >= sent.index(b"AT+CIPSEND=") + len(b"AT+CIPSEND=60\r\n")
    assert command[3] <= got.index(b">")
    start = t.find("data_start", link=0, length=len(payload), kind="send")
    end = t.find("data_end", link=0, length=len(payload))
    assert t.marks.index(command) < t.marks.index(start) < t.marks.index(end)
    assert start[2] == sent.index(payload)  # the payload follows the mark
    assert end[2] == sent.index(payload) + len(payload)
    assert end[3] <= got.index(b"SEND OK")
    connected = t.find("connected", link=0, remote="127.0.0.1", port=echo_server.port)
    assert connected[3] <= got.index(b"\nCONNECT\r\n") + 1
    ipd = t.find("ipd", link=0, length=len(payload))
    assert ipd[3] <= got.index(b"+IPD,%d:" % len(payload))
    closed = t.find("closed", link=0)
    assert t.marks.index(ipd) < t.marks.index(closed)
    restart = t.find("restart", factory="false")
    assert t.marks[t.marks.index(restart) + 1][0] == "boot"
    assert restart[3] <= got.rindex(b"ready")

    monos = [mono for _, mono in t.stamps]
    assert monos == sorted(monos)
    assert all(started - 1 <= wall <= ended + 1 for wall, _ in t.stamps)
    offsets = [wall - mono for wall, mono in t.stamps]
    assert max(offsets) - min(offsets) < 0.5  # both clocks of one moment



def _escape(h: TapHost) -> None:
    time.sleep(0.05)  # +++ wants silence around it
    h.write(b"+++")
    time.sleep(0.05)


def test_busy_passthrough_and_a_full_tty_each_byte_once(make_daemon, echo_server, tmp_path):
    """Input refused while busy, passthrough both ways with a host too slow to read (the front's writes come back partial), +++ and CIPSENDL: the file holds every byte once, in order, as written."""
    path = tmp_path / "transcript"
    d = make_daemon(f'connect_delay_ms = 400\n[log]\ntranscript = true\ntranscript_path = "{path}"\n')
    h = TapHost(d.link)
    h.expect(b"\r\nready\r\n")
    h.command(b"ATE0")
    h.write(b'AT+CWJAP="bridged","pwd"\r\n')
    h.read_quiet(0.1, timeout=0.2)
    h.write(b"AT\r\n")  # refused: the join is still running
    assert h.expect(b"\r\nOK\r\n").startswith(b"\r\nbusy p...\r\n")
    assert h.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % echo_server.port).endswith(b"OK\r\n")
    h.command(b"AT+SYSMSG=1")  # +QUITT on leaving passthrough
    h.command(b"AT+CIPMODE=1")
    h.command(b"AT+CIPSEND", b">")
    payload = os.urandom(256 * 1024)
    for i in range(0, len(payload), 16384):
        h.write(payload[i:i + 16384])  # reads only when the pty is full: the echo backs up
    time.sleep(0.5)  # ... until the front's writes are partial, then everything comes at once
    while h.received.count(payload[-64:]) == 0:
        assert h._fill(5), "the echo stopped"
    _escape(h)
    h.expect(b"+QUITT\r\n")
    h.command(b"AT+CIPMODE=0")
    h.command(b"AT+CIPSENDLCFG=1024,2920")
    streamed = os.urandom(8192)
    h.write(b"AT+CIPSENDL=%d\r\n" % len(streamed))
    h.expect(b">")
    h.write(streamed)
    h.expect(b"SEND OK\r\n")
    h.read_quiet(0.3)  # its echo, as +IPD
    assert d.stop() == 0
    h.close()

    t = read_transcript(path)
    assert bytes(t.rx) == bytes(h.sent)
    assert bytes(t.tx) == bytes(h.received)
    assert t.find("data_end", link=0, escaped="true")

def test_rotation_at_the_cap_keeps_n_files(make_daemon, tmp_path):
    """With a 4096-byte cap and 3 files, a long session leaves exactly 3 files, none over the cap, all 0600, in order."""
    path = tmp_path / "transcript"
    d = make_daemon(f'[log]\ntranscript = true\ntranscript_path = "{path}"\n'
                    "transcript_max_bytes = 4096\ntranscript_files = 3\n")
    h = TapHost(d.link)
    h.boot()
    for i in range(80):  # about 20 KB of transcript
        assert h.command(b"AT+CWHOSTNAME=\"host%d\"" % i) == b"\r\nOK\r\n"
    h.read_quiet(0.3)
    assert d.stop() == 0
    h.close()

    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("transcript"))
    assert files == ["transcript", "transcript.1", "transcript.2"]
    for name in files:
        info = (tmp_path / name).stat()
        assert info.st_size <= 4096
        assert stat.S_IMODE(info.st_mode) == 0o600
    t = read_transcript(tmp_path / "transcript.2", tmp_path / "transcript.1", path)
    monos = [mono for _, mono in t.stamps]
    assert monos == sorted(monos)
    assert t.marks[-1][0] == "transcript_off"
    assert bytes(h.sent).endswith(bytes(t.rx))  # the newest bytes are kept, in order
    assert bytes(h.received).endswith(bytes(t.tx))
    assert len(t.rx) < len(h.sent) / 2  # ... and the oldest were dropped


def test_transcript_option_writes_the_file(bridged_device):
    """bridged run --transcript FILE switches the transcript on to FILE, without any config key
    (bridged.testing starts its devices so; its transcript wait sees the command)."""
    path = bridged_device.transcript_path
    assert "transcript =" not in bridged_device.config_path.read_text()
    assert "transcript_path" not in bridged_device.config_path.read_text()
    h = TapHost(str(bridged_device.port))
    h.boot()
    h.command(b"AT+GMR")
    assert bridged_device.wait_for_transcript(r"^command name=AT\+GMR kind=execute$", 5).rx == len(h.sent)
    h.read_quiet(0.3)
    assert bridged_device.stop() == 0
    h.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    t = read_transcript(path)
    assert bytes(t.rx) == bytes(h.sent) and bytes(t.tx) == bytes(h.received)
    t.find("command", name="AT+GMR", kind="execute")


def _exchange_with_marker(h: TapHost, port: int, marker: bytes) -> None:
    h.boot()
    h.ask(b'AT+CIPSTART="TCP","127.0.0.1",%d' % port)
    h.send_data(b"AT+CIPSEND=%d" % len(marker), marker)
    assert h.read_ipd() == (None, marker)
    h.read_quiet(0.3)


def test_off_no_file_and_nothing_per_byte(make_daemon, echo_server, tmp_path):
    """Off (even with a path and level debug): no file appears, no transcript event is logged, the payload is nowhere in the log."""
    path = tmp_path / "transcript"
    d = make_daemon(f'[log]\nlevel = "debug"\ntranscript_path = "{path}"\n')
    marker = b"pAyLoAd-" + os.urandom(6).hex().encode()
    h = TapHost(d.link)
    _exchange_with_marker(h, echo_server.port, marker)
    assert d.stop() == 0
    h.close()
    assert not path.exists()
    assert not [e for e in d.events() if e.get("event", "").startswith("transcript")]
    text = d.log_text()
    assert marker.decode() not in text and marker.hex() not in text and marker.hex(" ") not in text


def test_to_the_log_at_info_marks_but_never_the_payload(make_daemon, echo_server):
    """On without a path at level info: marks are logged, payload bytes are not."""
    d = make_daemon("[log]\ntranscript = true\n")
    marker = b"pAyLoAd-" + os.urandom(6).hex().encode()
    h = TapHost(d.link)
    _exchange_with_marker(h, echo_server.port, marker)
    d.wait_event("transcript_mark", mark="ipd", link=0, length=len(marker))
    assert d.stop() == 0
    h.close()
    marks = [e["mark"] for e in d.events("transcript_mark")]
    assert marks[:2] == ["transcript_on", "boot"] and "data_start" in marks and "connected" in marks
    assert not d.events("transcript_bytes")
    text = d.log_text()
    assert marker.decode() not in text and marker.hex(" ") not in text



@pytest.mark.parametrize("to_file", [False, True])
def test_passwords_and_keys_never_reach_the_log_at_info(make_daemon, tmp_path, to_file):
    """An AT+CWJAP password and AT+CIPSSLCPSK keys (a mistyped hex one too) are in the transcript file (0600, by design) but nowhere in the log at info, whichever sink."""
    path = tmp_path / "transcript"
    d = make_daemon("[log]\ntranscript = true\n" + (f'transcript_path = "{path}"\n' if to_file else ""))
    password, key = b"pw-" + os.urandom(6).hex().encode(), b"psk-" + os.urandom(6).hex().encode()
    bad_hex = b"0102zz" + os.urandom(6).hex().encode()
    h = TapHost(d.link)
    h.expect(b"\r\nready\r\n")
    h.command(b'AT+CWJAP="bridged","%s"' % password)
    h.command(b"AT+CIPMUX=1")
    h.ask(b'AT+CIPSSLCPSK=0,"%s","mcu"' % key)  # OK from Python 3.13 on, ERROR before: logged either way
    assert h.ask(b'AT+CIPSSLCPSKHEX=0,"%s","mcu"' % bad_hex).endswith(b"ERROR\r\n")
    h.read_quiet(0.3)
    assert d.stop() == 0
    h.close()
    text = d.log_text()
    for secret in (password, key, bad_hex):
        assert secret.decode() not in text and secret.hex() not in text
    assert {m["name"] for m in d.events("transcript_mark") if m["mark"] == "command"} == (
        set() if to_file else {"AT+CWJAP", "AT+CIPMUX", "AT+CIPSSLCPSK", "AT+CIPSSLCPSKHEX"})
    if to_file:
        t = read_transcript(path)
        assert all(secret in t.rx for secret in (password, key, bad_hex))

def test_to_the_log_at_debug_carries_the_bytes(make_daemon, echo_server):
    """On without a path at level debug: transcript_bytes events rebuild both streams exactly."""
    d = make_daemon('[log]\ntranscript = true\nlevel = "debug"\n')
    marker = b"pAyLoAd-" + os.urandom(6).hex().encode()
    h = TapHost(d.link)
    _exchange_with_marker(h, echo_server.port, marker)
    assert d.stop() == 0
    h.close()
    rx, tx = bytearray(), bytearray()
    for e in d.events("transcript_bytes"):
        assert e["level"] == "debug"
        (rx if e["dir"] == "RX" else tx).extend(bytes.fromhex(e["hex"]))
    assert bytes(rx) == bytes(h.sent) and bytes(tx) == bytes(h.received)


def test_unwritable_path_is_a_usage_error(tmp_path):
    """A transcript file that cannot be created stops `bridged run` with status 2 naming the key."""
    target = tmp_path / "missing" / "transcript"
    proc = subprocess.run(
        [sys.executable, "-m", "bridged", "run", "--pty", str(tmp_path / "tty"),
         "--state-dir", str(tmp_path / "state"), "--transcript", str(target)],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"bridged: log.transcript_path: {target}: No such file or directory"
    assert not (tmp_path / "tty").exists()



def test_fifo_path_is_a_usage_error_not_a_hang(tmp_path):
    """A FIFO at the transcript path (anyone may plant one in /tmp) stops `bridged run` at once with status 2, instead of blocking in open()."""
    target = tmp_path / "transcript"
    os.mkfifo(target)
    proc = subprocess.run(
        [sys.executable, "-m", "bridged", "run", "--pty", str(tmp_path / "tty"),
         "--state-dir", str(tmp_path / "state"), "--transcript", str(target)],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"bridged: log.transcript_path: {target}: a FIFO (refused")
    assert not (tmp_path / "tty").exists()

def test_check_shows_the_option_without_creating_the_file(tmp_path):
    """bridged check --transcript FILE reports transcript on with FILE made absolute, and creates nothing."""
    proc = forkserver.run(["check", "--transcript", "t.log"], timeout=30, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "transcript = true  # command line\n" in proc.stdout
    assert f'transcript_path = "{tmp_path / "t.log"}"  # command line\n' in proc.stdout
    assert not (tmp_path / "t.log").exists()
