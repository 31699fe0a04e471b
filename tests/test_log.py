"""Tests for bridged.log: JSON lines for journald, console on a terminal."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone

import pytest
import structlog

from bridged.log import get_logger, setup_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    """Leave structlog and the root logger as other tests expect them."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(text: str) -> list[tuple[int, dict]]:
    """Split `<N>{...}` lines into (priority, event)."""
    result = []
    for line in text.splitlines():
        match = re.fullmatch(r"<(\d)>(\{.*\})", line)
        assert match, line
        result.append((int(match.group(1)), json.loads(match.group(2))))
    return result


def test_json_line_with_priority(capsys):
    """Off a terminal, an info event is one JSON line prefixed <6>, with identity."""
    setup_logging("info", "auto", "link", link_id=3)
    get_logger().info("link_opened", type="TCP", port=80)
    [(priority, event)] = json_lines(capsys.readouterr().out)
    assert priority == 6
    assert event["event"] == "link_opened"
    assert (event["proc"], event["link_id"], event["type"], event["port"]) == \
        ("link", 3, "TCP", 80)
    assert event["level"] == "info"
    stamp = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - stamp) < timedelta(minutes=1)


def test_priorities_and_level_filter(capsys):
    """debug is dropped at info; warning is <4>, error and exception <3>."""
    setup_logging("info", "json", "front")
    log = get_logger()
    log.debug("hidden")
    log.warning("slow")
    log.error("bad")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("crashed")
    lines = json_lines(capsys.readouterr().out)
    assert [(p, e["event"]) for p, e in lines] == [(4, "slow"), (3, "bad"), (3, "crashed")]
    assert lines[2][1]["exception"][0]["exc_type"] == "RuntimeError"
    assert "locals" not in lines[2][1]["exception"][0]["frames"][0]


def test_debug_level(capsys):
    """At debug, debug events come out with <7>."""
    setup_logging("debug", "json", "supervisor")
    get_logger().debug("tick")
    [(priority, event)] = json_lines(capsys.readouterr().out)
    assert priority == 7 and event["proc"] == "supervisor" and "link_id" not in event


def test_contextvars_merged(capsys):
    """Values bound with structlog.contextvars appear on every event."""
    setup_logging("info", "json", "front")
    structlog.contextvars.bind_contextvars(command="AT+CIPSTART")
    get_logger().info("command")
    [(_, event)] = json_lines(capsys.readouterr().out)
    assert event["command"] == "AT+CIPSTART"


def test_rebinding_role(capsys):
    """Calling setup again (as a forked child does) replaces role and link id."""
    setup_logging("info", "json", "supervisor")
    structlog.contextvars.bind_contextvars(stale="parent")
    log = get_logger()  # made before the second setup, still follows it
    setup_logging("info", "json", "link", link_id=0)
    log.info("started")
    [(_, event)] = json_lines(capsys.readouterr().out)
    assert (event["proc"], event["link_id"]) == ("link", 0)
    assert "stale" not in event


def test_stdlib_logging_routed(capsys):
    """Records from the logging module (asyncio...) come out the same way."""
    setup_logging("info", "json", "front")
    logging.getLogger("asyncio").error("Task exception was never retrieved")
    [(priority, event)] = json_lines(capsys.readouterr().out)
    assert priority == 3
    assert event["event"] == "Task exception was never retrieved"
    assert (event["logger"], event["proc"]) == ("asyncio", "front")


def test_console_format(capsys):
    """fmt="console" renders for humans: no JSON, no priority prefix."""
    setup_logging("info", "console", "front")
    get_logger().info("hello", port=80)
    out = capsys.readouterr().out
    assert not out.startswith("<")
    assert "hello" in out and "port=80" in out and "proc=front" in out


def test_console_lines_escape_what_a_terminal_would_act_on(capsys):
    """An SSID or a command line from the MCU reaches a console log escaped: no ESC, BEL or
    newline of its own (it could retitle, clear or forge lines on the admin's terminal)."""
    setup_logging("info", "console", "front")
    get_logger().info("join_failed", ssid="\x1b]0;owned\x07\x1b[2J", line="AT\nforged_event")
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and out.count("\n") == 1
    assert "ssid=\\x1b]0;owned\\x07\\x1b[2J" in out and "AT\\nforged_event" in out


def test_bad_arguments():
    """An unknown level or format is refused."""
    with pytest.raises(ValueError):
        setup_logging("trace", "json", "front")
    with pytest.raises(ValueError):
        setup_logging("info", "xml", "front")


def test_forked_child_rebinds():
    """In a real fork, parent and child each log with their own role, on stdout only."""
    script = textwrap.dedent("""
        import os
        from bridged.log import get_logger, setup_logging
        setup_logging("info", "auto", "supervisor")
        log = get_logger()
        pid = os.fork()
        if pid == 0:
            setup_logging("info", "auto", "link", link_id=4)
            log.info("child")
            os._exit(0)
        os.waitpid(pid, 0)
        log.info("parent")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=30, check=True)
    assert result.stderr == ""
    events = [(p, e["event"], e["proc"], e.get("link_id")) for p, e in json_lines(result.stdout)]
    assert events == [(6, "child", "link", 4), (6, "parent", "supervisor", None)]


def test_same_setup_again_keeps_the_pipeline(capsys):
    """setup_logging with the level and renderer in place (a forked child's, as its
    parent's) changes only the identity: the pipeline is kept, not built again; a
    new level, or a configuration replaced since, gets a new one."""
    setup_logging("info", "json", "supervisor")
    first = structlog.get_config()["processors"]
    handlers = logging.getLogger().handlers[:]
    setup_logging("info", "json", "link", link_id=2)
    assert structlog.get_config()["processors"] is first
    assert logging.getLogger().handlers == handlers
    get_logger().info("kept")
    get_logger().debug("hidden")
    logging.getLogger("asyncio").warning("from stdlib")
    setup_logging("debug", "json", "front")
    assert structlog.get_config()["processors"] is not first
    get_logger().debug("shown")
    structlog.reset_defaults()
    setup_logging("debug", "json", "front")
    assert structlog.is_configured()
    get_logger().debug("again")
    events = [(e["event"], e["proc"], e.get("link_id")) for _, e in json_lines(capsys.readouterr().out)]
    assert events == [("kept", "link", 2), ("from stdlib", "link", 2), ("shown", "front", None),
                      ("again", "front", None)]


def test_console_setup_is_built_each_time():
    """The console renderer's colours follow stdout at the time: its pipeline is never kept."""
    setup_logging("info", "console", "supervisor")
    first = structlog.get_config()["processors"]
    setup_logging("info", "console", "front")
    assert structlog.get_config()["processors"] is not first


def test_auto_is_console_on_a_terminal():
    """With fmt="auto" and stdout a terminal, the console renderer is used."""
    import os
    import pty

    master, slave = pty.openpty()
    script = ("from bridged.log import get_logger, setup_logging\n"
              "setup_logging('info', 'auto', 'front')\n"
              "get_logger().info('on_tty', port=80)\n")
    try:
        proc = subprocess.run([sys.executable, "-c", script], stdout=slave,
                              stderr=subprocess.PIPE, timeout=30, check=True)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other side is closed and drained
                break
            if not chunk:
                break
            out += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.stderr == b""
    text = re.sub(rb"\x1b\[[0-9;]*m", b"", out).decode()
    assert "on_tty" in text and "port=80" in text and not text.startswith("<")
