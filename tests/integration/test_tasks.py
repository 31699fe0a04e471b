"""The front's tasks live in one TaskGroup: a task that raises is logged and the front is
restarted, never left half-working; a stop leaves no task pending."""

from __future__ import annotations

import json
import sys
import textwrap

from tests.harness import Daemon

# Runs `python -m bridged ...` with a bug planted in the SNTP client's task: the
# task a front runs in the background for AT+CIPSNTPCFG=1 raises at once.
_BUGGY = textwrap.dedent("""
    import os, runpy, sys
    sys.path.insert(0, os.getcwd())
    from bridged.net import sntp_client

    async def broken_run(self, device):
        raise RuntimeError("planted bug in a front task")

    sntp_client.SntpClient._run = broken_run
    sys.argv = [sys.argv[0], *sys.argv[4:]]  # drop "python -m bridged"
    runpy.run_module("bridged", run_name="__main__", alter_sys=True)
""")


def test_a_task_that_raises_is_logged_and_the_front_restarted(tmp_path):
    """A front task's exception is logged with its traceback, the front exits non-zero and the
    supervisor restarts it (ready again), instead of the task ending unheard."""
    hook = tmp_path / "buggy.py"
    hook.write_text(_BUGGY)
    daemon = Daemon(tmp_path, wrap=(sys.executable, str(hook))).start()
    try:
        host = daemon.host()
        host.boot()
        host.write(b'AT+CIPSNTPCFG=1,0,"127.0.0.1"\r\n')  # starts the client's task
        failed = daemon.wait_event("task_failed")[0]
        assert failed["level"] == "error" and failed["task"].endswith("broken_run")
        trace = json.dumps(failed["exception"])
        assert "planted bug in a front task" in trace and "broken_run" in trace  # the traceback, not just a line
        front = daemon.wait_event("child_died", role="front")[0]
        assert front["exit_code"] == 1
        assert len(daemon.wait_event("child_started", role="front", count=2)) == 2
        host.expect(b"\r\nready\r\n")  # the restarted front serves again
        host.command(b"ATE0")
        assert host.ask(b"AT") == b"\r\nOK\r\n"
        host.close()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_text()[-3000:]


def test_a_stop_leaves_no_task_pending(make_daemon):
    """Stopped while a task runs (the SNTP client waiting for an answer nobody sends), the front
    cancels and awaits it: no "Task was destroyed" or "never retrieved" on its stderr."""
    daemon = make_daemon()
    host = daemon.host()
    host.boot()
    assert host.ask(b'AT+CIPSNTPCFG=1,0,"127.0.0.1"') == b"\r\nOK\r\n"
    daemon.wait_event("sntp_started")
    host.close()
    assert daemon.stop() == 0
    text = daemon.log_text()
    for warning in ("Task was destroyed but it is pending", "never retrieved", "was never awaited"):
        assert warning not in text, text[-3000:]
    assert daemon.events("front_stopping")
