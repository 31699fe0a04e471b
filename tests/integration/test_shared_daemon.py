"""tests/shared.py's SharedDaemon: what one test leaves behind does not reach the next."""

from __future__ import annotations

import pytest

from tests.shared import SharedDaemon


@pytest.fixture
def shared(tmp_path):
    daemon = SharedDaemon(tmp_path)
    yield daemon
    daemon.stop()


@pytest.mark.parametrize("leave", [b"AT+RST\r\n", b"AT+CWMODE?\r\n"])
def test_a_test_that_does_not_read_its_last_answer_leaves_nothing_to_the_next(shared, leave):
    """Test A stores AT+CWMODE=2, then sends a command and leaves without reading its
    answer (AT+RST: a restart under way): test B still gets a factory-fresh session
    (station mode, echo off after the boot), its first answers its own."""
    a = shared.host()
    a.command(b"AT+CWMODE=2")  # stored: AT+SYSSTORE=1 by default
    a.command(b"ATE1")
    a.write(leave)
    a.close()
    shared.done()
    b = shared.host()
    try:
        assert b.ask(b"AT+CWMODE?") == b"+CWMODE:1\r\n\r\nOK\r\n"
        assert b.ask(b"AT") == b"\r\nOK\r\n"
    finally:
        b.close()
    shared.done()


def test_tests_in_a_row_share_one_daemon(shared):
    """Tests that leave a clean session: one daemon for all of them (what the module is for)."""
    for _ in range(3):
        host = shared.host()
        assert host.ask(b"AT+CWMODE?") == b"+CWMODE:1\r\n\r\nOK\r\n"
        host.command(b"AT+CWMODE=2")
        host.close()
        shared.done()
    assert shared._started == 1
