"""Front faults on AT commands over the pty (at_busy, at_delay, at_errcode, at_reset),
`bridged fault` on demand and --list, and the seed and counts in `bridged status`."""

from __future__ import annotations

import json
import re
import subprocess
import time

from bridged.faults.catalog import CATALOG
from tests import forkserver
from tests.harness import Timeout
from tests.together import one_at_a_time, together

_END = re.compile(rb"\r\n(OK|ERROR|busy p\.\.\.)\r\n")


def answer(host, line: bytes, timeout: float = 10.0) -> bytes:
    """Send a command; its answer through OK, ERROR or busy p..."""
    host.write(line + b"\r\n")
    deadline = time.monotonic() + timeout
    while (m := _END.search(host.buf)) is None:
        if time.monotonic() > deadline:
            raise Timeout(f"no answer to {line!r}: {bytes(host.buf[-300:])!r}")
        host._fill(0.05)
    out = bytes(host.buf[: m.end()])
    del host.buf[: m.end()]
    return out


def fault_cli(daemon, *args: str) -> subprocess.CompletedProcess:
    return forkserver.run(["fault", "--state-dir", str(daemon.state_dir), *args], timeout=20)


def run_commands(make_daemon, faults: str, lines: list[bytes], args: tuple[str, ...] = ()) -> list[bytes]:
    """A fresh daemon with ``faults``: the answers to ``lines``, sent one at a time after ready."""
    daemon = make_daemon(faults, args)
    host = daemon.host()
    host.expect(b"\r\nready\r\n")
    try:
        return [answer(host, line) for line in lines]
    finally:
        host.close()


def busy_indexes(answers: list[bytes]) -> set[int]:
    return {i for i, a in enumerate(answers) if a == b"\r\nbusy p...\r\n"}


def test_at_busy_answers_a_share_of_commands_and_the_seed_decides_which(make_daemon, tmp_path):
    """at_busy rate 0.3, seed 5, 40 commands: some get exactly busy p... (not echoed, not run), the
    same ones in a second run, others with seed 6; each is marked in the transcript."""
    transcript = tmp_path / "transcript"
    lines = [b"AT"] * 40
    faults = "[faults]\nseed = {}\n[faults.at_busy]\nrate = 0.3\n"
    make = one_at_a_time(make_daemon)
    first, again, other = together(
        lambda: run_commands(make, faults.format(5), lines, ("--transcript", str(transcript))),
        lambda: run_commands(make, faults.format(5), lines), lambda: run_commands(make, faults.format(6), lines))
    hits = busy_indexes(first)
    assert 3 <= len(hits) <= 25, first
    assert all(a == b"AT\r\n\r\nOK\r\n" for i, a in enumerate(first) if i not in hits)
    assert busy_indexes(again) == hits
    assert busy_indexes(other) != hits
    deadline = time.monotonic() + 5
    while transcript.read_text().count("-- fault name=at_busy") < len(hits) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert transcript.read_text().count("-- fault name=at_busy command=AT") == len(hits)


def test_at_busy_under_syslog_has_its_err_code_line(daemon):
    """With AT+SYSLOG=1 a busy command gets ERR CODE:0x010b0000 before busy p..., as ESP-AT's."""
    host = daemon.host()
    host.boot()
    host.command(b"AT+SYSLOG=1")
    assert fault_cli(daemon, "at_busy").returncode == 0
    assert answer(host, b"AT") == b"ERR CODE:0x010b0000\r\n\r\nbusy p...\r\n"


def errcode_indexes(answers: list[bytes]) -> set[int]:
    return {i for i, a in enumerate(answers) if a.endswith(b"ERROR\r\n")}


def test_at_errcode_fails_commands_with_its_code_reproducibly(make_daemon):
    """at_errcode code 0x01020304 rate 0.5: hit commands answer ERR CODE:0x01020304 then ERROR
    without running (no +GMR lines); the same seed hits the same commands."""
    faults = "[faults]\nseed = 11\n[faults.at_errcode]\nrate = 0.5\ncode = 0x01020304\n"
    lines = [b"ATE0"] + [b"AT+GMR"] * 15
    make = one_at_a_time(make_daemon)
    first, again = together(*(lambda: run_commands(make, faults, lines) for _ in range(2)))
    hits = errcode_indexes(first)
    assert 2 <= len(hits) <= 14, first
    for i in hits:
        assert first[i].endswith(b"ERR CODE:0x01020304\r\n\r\nERROR\r\n") and b"AT version" not in first[i]
    assert all(b"AT version" in first[i] for i in range(1, 16) if i not in hits)
    assert errcode_indexes(again) == hits


def test_at_delay_holds_the_answer_and_the_session_is_busy_meanwhile(make_daemon):
    """at_delay ms 400 on every command: AT's OK comes 0.4 s late, and a command sent meanwhile
    is refused busy p..., as behind a slow command."""
    d = make_daemon("[faults.at_delay]\nat = 0\nms = 400\n")
    host = d.host()
    host.expect(b"\r\nready\r\n")
    started = time.monotonic()
    host.write(b"AT\r\n")
    time.sleep(0.1)  # the host's pace: the next line comes while the first answer is held
    host.write(b"AT\r\n")
    host.expect(b"\r\nbusy p...\r\n")
    host.expect(b"\r\nOK\r\n")
    assert time.monotonic() - started >= 0.4
    host.close()


def slow_indexes(make_daemon, faults: str, n: int) -> set[int]:
    d = make_daemon(faults)
    host = d.host()
    host.expect(b"\r\nready\r\n")
    slow = set()
    for i in range(n):
        started = time.monotonic()
        assert answer(host, b"AT").endswith(b"\r\nOK\r\n")
        if time.monotonic() - started >= 0.75:  # delayed 1 s; a loaded machine stalled one 0.5 s
            slow.add(i)
    host.close()
    return slow


def test_at_delay_hits_the_same_commands_for_the_same_seed(make_daemon):
    """at_delay rate 0.4, ms 1000: the commands answered late are the same in two runs with one seed."""
    faults = "[faults]\nseed = 21\n[faults.at_delay]\nrate = 0.4\nms = 1000\n"
    make = one_at_a_time(make_daemon)
    first, again = together(*(lambda: slow_indexes(make, faults, 12) for _ in range(2)))
    assert 1 <= len(first) <= 11
    assert again == first


def test_at_reset_on_demand_restarts_like_at_rst_without_ok(make_daemon, echo_server):
    """`bridged fault at_reset` with a link open: no OK, the link closes silently, ready comes
    after the boot, and the session's RAM settings are back to their defaults (echo on, single link)."""
    d = make_daemon()
    host = d.host()
    host.boot()
    host.command(b"AT+CIPMUX=1")
    host.command(b'AT+CIPSTART=0,"TCP","127.0.0.1",%d' % echo_server.port)
    peer = echo_server.wait_connections(1)[0]
    done = fault_cli(d, "at_reset")
    assert done.returncode == 0 and "at_reset: fired" in done.stdout, done.stderr
    seen = host.expect(b"\r\nready\r\n")
    assert b"OK" not in seen and b"CLOSED" not in seen
    peer.settimeout(5)
    assert peer.recv(10) == b""  # the link is gone
    # echo on again, single link again (the stored Wi-Fi rejoins first)
    assert host.command(b"AT+CIPMUX?").endswith(b"AT+CIPMUX?\r\n+CIPMUX:0\r\n\r\nOK\r\n")
    d.wait_event("fault_injected", fault="at_reset")


def event_gaps(make_daemon, faults: str, name: str, wait: float, count: int = 4) -> list[float]:
    """The times between the fault's due events (injected or skipped) in one run: the
    first ``count`` of them, or those logged within ``wait`` s of ready if fewer."""
    d = make_daemon(faults)
    host = d.host()
    host.expect(b"\r\nready\r\n")
    deadline = time.monotonic() + wait
    while True:
        stamps = [e["timestamp"] for e in d.events() if e.get("event") in ("fault_injected", "fault_skipped")
                  and e.get("fault") == name]
        if len(stamps) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    host.close()
    stamps = stamps[:count]
    times = [time.mktime(time.strptime(s[:19], "%Y-%m-%dT%H:%M:%S")) + float("0" + s[19:-1]) for s in stamps]
    return [round(b - a, 1) for a, b in zip(times, times[1:])]


def test_at_reset_events_come_at_the_times_the_seed_draws(make_daemon):
    """at_reset rate 1/s: the gaps between resets are the same for one seed and differ for another.

    Seeds 8 and 2 draw their first four events between 1.1 and 2.7 s from the start (after the
    workers are up, so none is held back by the start)."""
    faults = "[faults]\nseed = {}\n[faults.at_reset]\nrate = 1\n"
    make = one_at_a_time(make_daemon)
    first, again, other = together(*(lambda seed=seed: event_gaps(make, faults.format(seed), "at_reset", 3.0)[:3]
                                     for seed in (8, 8, 2)))
    assert len(first) == 3
    assert all(abs(a - b) <= 0.25 for a, b in zip(first, again)), (first, again)
    assert any(abs(a - b) > 0.25 for a, b in zip(first, other)), (first, other)


def test_fault_on_demand_makes_the_next_command_busy(daemon):
    """`bridged fault at_busy`: the next command gets busy p..., the one after it OK."""
    host = daemon.host()
    host.boot()
    done = fault_cli(daemon, "at_busy")
    assert done.returncode == 0 and "at_busy: armed for the next 1" in done.stdout, done.stderr
    assert answer(host, b"AT") == b"\r\nbusy p...\r\n"
    assert answer(host, b"AT") == b"\r\nOK\r\n"


def test_fault_cli_refuses_bad_faults_with_exit_2_naming_the_key(daemon):
    """An unknown key, a value out of range and an unknown fault are usage errors (2) that say which."""
    bad_key = fault_cli(daemon, "at_delay", "bogus=1")
    assert bad_key.returncode == 2 and "bogus" in bad_key.stderr
    bad_value = fault_cli(daemon, "wifi_drop", "duration_ms=-5")
    assert bad_value.returncode == 2 and "duration_ms" in bad_value.stderr
    unknown = fault_cli(daemon, "at_explode")
    assert unknown.returncode == 2 and "at_explode" in unknown.stderr and "at_busy" in unknown.stderr
    not_pair = fault_cli(daemon, "at_delay", "ms")
    assert not_pair.returncode == 2 and "key=value" in not_pair.stderr


def test_fault_cli_without_a_daemon_exits_1(tmp_path):
    """No control socket: exit 1 and a line saying so."""
    done = forkserver.run(["fault", "at_busy", "--state-dir", str(tmp_path)], timeout=20)
    assert done.returncode == 1 and "no control socket" in done.stderr


def test_fault_list_shows_every_kind_its_keys_and_the_schedule():
    """--list (no daemon needed) names every fault, where and per what it is drawn, its keys and ranges."""
    done = forkserver.run(["fault", "--list"], timeout=20)
    assert done.returncode == 0
    for fault in CATALOG:
        assert re.search(rf"^{fault.name}\s+{fault.where.value}\s", done.stdout, re.M), fault.name
        for p in fault.params:
            assert f"{p.name:<16} {p.allowed()}" in done.stdout
    for key in ("rate", "at", "for", "every", "count"):
        assert re.search(rf"^    {key}\s", done.stdout, re.M)
    assert "duration_ms      0 to 3600000 (default 5000)" in done.stdout


def test_status_shows_the_seed_and_the_count_per_fault(make_daemon):
    """Two busy commands on demand: bridged status --json and the table show seed 77 and at_busy 2."""
    d = make_daemon("[faults]\nseed = 77\n")
    host = d.host()
    host.boot()
    assert fault_cli(d, "at_busy", "count=2").returncode == 0
    assert answer(host, b"AT") == answer(host, b"AT") == b"\r\nbusy p...\r\n"
    done = forkserver.run(["status", "--state-dir", str(d.state_dir), "--json"], timeout=20)
    assert json.loads(done.stdout)["faults"] == {"seed": 77, "counts": {"at_busy": 2},
                                                  "uart_hooks": {"input": False, "output": False}}
    table = forkserver.run(["status", "--state-dir", str(d.state_dir)], timeout=20)
    assert "Faults (seed 77): at_busy 2" in table.stdout
