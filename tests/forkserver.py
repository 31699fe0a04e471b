"""Start the tests' daemons by forking a process that has imported bridged already.

Most of a daemon's start is its Python's: the interpreter, then every module
of bridged and its dependencies (about half a second of CPU, more on a busy
machine), for nearly every test.  The fork server pays that once per pytest
process: ``python -m tests.forkserver`` imports everything and then, per
request, forks a child that becomes ``python -m bridged ARGS`` as an exec
would make it:

- standard input /dev/null, output and errors appended to the test's log,
  every other descriptor closed (as ``subprocess.Popen(close_fds=True)``);
- the test's environment, working directory and umask; a process group of
  its own when asked (``process_group=0``);
- the signal dispositions and mask of a fresh interpreter (the server never
  changes its own), the random generator seeded anew;
- then ``runpy.run_module("bridged", run_name="__main__")`` at the top level
  of the server's ``__main__``, so ``sys.argv``, SystemExit, an uncaught
  exception's traceback and exit status, atexit and the interpreter's
  shutdown are those of ``python -m bridged``.

What differs: the daemon's parent is the server, not pytest, its
/proc/PID/cmdline is the server's, and what the server imported is in the
collector's permanent generation (``gc.freeze()``, as bridged's supervisor
does for its own children; a cycle made at import time is never collected).
The server reports each child's exit status (``ForkedProcess`` stands in for the ``subprocess.Popen`` the harness
keeps), and sends signals for the tests: the server reaps its children, so a
pid it signals is never one the kernel gave to another process meanwhile.

The harness uses it for ``Daemon.start`` without ``wrap`` (a daemon inside a
network namespace is exec'd by ``ip netns exec``); ``BRIDGED_TEST_FORKSERVER=0``
turns it off: every daemon is then a new ``python -m bridged``.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["ForkedProcess", "enabled", "run", "spawn"]

_MAXFD = os.sysconf("SC_OPEN_MAX")
_TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the client, in the pytest process ---------------------------------------------------


def enabled() -> bool:
    return os.environ.get("BRIDGED_TEST_FORKSERVER", "1") != "0"


class ForkedProcess:
    """The parts of ``subprocess.Popen`` the tests use, for a daemon the server forked."""

    def __init__(self, server: "_Client", pid: int, args: list[str]) -> None:
        self._server, self.pid, self.args = server, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            self._server.signal(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        self.send_signal(9)


class _Client:
    """The pytest process's end of one fork server."""

    def __init__(self) -> None:
        # From the checkout's top, whatever directory the test that starts it is in
        # (the children go to the test's own): `-m` imports tests and bridged from there.
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.forkserver"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=_TOP, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self._lock = threading.Lock()
        self._buf = b""
        self._exits: dict[int, int] = {}
        self._answers: list[dict] = []
        if self._request({"hello": True}).get("ready") is not True:
            raise RuntimeError("the fork server did not start")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(self, args: list[str], env: dict[str, str], streams: dict[str, str], group: bool,
              cwd: str | None = None) -> int:
        umask = os.umask(0)
        os.umask(umask)
        answer = self._request({"args": args, "env": env, "cwd": cwd or os.getcwd(), "umask": umask,
                                "group": group, **streams})
        if "pid" not in answer:
            raise OSError(answer.get("error", "the fork server failed"))
        return answer["pid"]

    def signal(self, pid: int, sig: int) -> None:
        self._request({"kill": pid, "signal": sig})

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while pid not in self._exits:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._read(left) and left == 0:
                    return None
            return self._exits[pid]

    def _request(self, message: dict) -> dict:
        with self._lock:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
            deadline = time.monotonic() + 30
            while not self._answers:
                if time.monotonic() > deadline:
                    raise TimeoutError("the fork server did not answer")
                self._read(deadline - time.monotonic())
            return self._answers.pop(0)

    def _read(self, timeout: float | None) -> bool:
        """Take in what the server said within ``timeout``: exits and answers; False if nothing."""
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            return False
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError(f"the fork server ended (status {self.proc.wait()})")
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if "exit" in message:
                self._exits[message["exit"]] = message["code"]
            else:
                self._answers.append(message)
        return True

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


_client: _Client | None = None
_client_lock = threading.Lock()


def _the_client() -> _Client:
    global _client
    with _client_lock:
        if _client is None or not _client.alive():
            _client = _Client()
            # Reaped by this process, so that the daemons' CPU time counts in its children's.
            atexit.register(_client.close)
        return _client


def spawn(args: list[str], env: dict[str, str], log: str, group: bool = False) -> ForkedProcess:
    """``python -m bridged ARGS`` with ``env``, its output appended to ``log``, forked
    from this process's fork server (started at the first call)."""
    client = _the_client()
    pid = client.spawn(args, env, {"log": log}, group)
    return ForkedProcess(client, pid, [sys.executable, "-m", "bridged", *args])


def run(args: list[str], *, timeout: float, env: dict[str, str] | None = None,
        cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """As ``subprocess.run([sys.executable, "-m", "bridged", *args], capture_output=True,
    text=True, ...)``, forked from the fork server: a process of its own with its
    own exit status, standard streams and environment, without a new interpreter's
    start and imports (a `bridged --version`: 0.35 s of CPU exec'd, 0.05 s forked).

    Standard input is /dev/null; the output is captured in files rather than
    pipes, so the command must not leave processes behind that go on writing
    (a ``run`` or ``fleet`` that would keep serving is exec'd by its test); an
    environment variable read at the interpreter's start (PYTHONPATH, ...) is
    the server's, so a test that needs one execs.  With
    ``BRIDGED_TEST_FORKSERVER=0`` every call is ``subprocess.run``.
    """
    argv = [sys.executable, "-m", "bridged", *args]
    env = dict(os.environ) if env is None else env
    if not enabled():
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                              stdin=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix="bridged-cli-") as scratch:
        streams = {"stdin": os.devnull, "stdout": os.path.join(scratch, "out"), "stderr": os.path.join(scratch, "err")}
        client = _the_client()
        child = ForkedProcess(client, client.spawn(args, env, streams, False, cwd), argv)
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)
            raise
        # Text as text=True decodes a pipe's: the locale's encoding, universal newlines.
        with open(streams["stdout"]) as out, open(streams["stderr"]) as err:
            return subprocess.CompletedProcess(argv, code, out.read(), err.read())


# -- the server ----------------------------------------------------------------------------


def _serve() -> dict:
    """Answer requests until one forks a child; return that request, in the child.

    Requests (a JSON line each on standard input): ``hello``; ``args`` (fork a
    daemon, answer its ``pid``); ``kill`` (a signal to a child not yet reaped).
    Each child's end comes as ``{"exit": pid, "code": status}``, the status as
    Popen.returncode gives it.  The server ends at the end of its input.
    """
    requests = os.dup(0)
    replies = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)  # a child's standard input; nothing of the requests is buffered on it
    os.dup2(null, 1)
    os.close(null)
    children: dict[int, int] = {}  # pid -> pidfd, until reaped
    buf = b""

    def say(message: dict) -> None:
        os.write(replies, json.dumps(message).encode() + b"\n")

    while True:
        readable = select.select([requests, *children.values()], [], [])[0]
        for pid, pidfd in list(children.items()):
            if pidfd in readable:
                _, status = os.waitpid(pid, 0)
                os.close(pidfd)
                del children[pid]
                say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if requests not in readable:
            continue
        chunk = os.read(requests, 65536)
        if not chunk:
            sys.exit(0)
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            request = json.loads(line)
            if "hello" in request:
                say({"ready": True})
            elif "kill" in request:
                if request["kill"] in children:
                    os.kill(request["kill"], request["signal"])
                say({"done": True})
            else:
                sys.stdout.flush()
                sys.stderr.flush()
                try:
                    pid = os.fork()
                except OSError as exc:
                    say({"error": str(exc)})
                    continue
                if pid == 0:
                    _become(request)
                    return request
                children[pid] = os.pidfd_open(pid)
                say({"pid": pid})


def _become(request: dict) -> None:
    """In the child: the process ``python -m bridged`` would start as (see the module's doc)."""
    import random

    if request["group"]:
        os.setpgid(0, 0)
    if "log" in request:  # a daemon: both streams appended to its log
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        os.dup2(log, 1)
        os.dup2(log, 2)
    else:  # a command line (run()): each stream its own file
        os.dup2(os.open(request["stdin"], os.O_RDONLY), 0)
        os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), 1)
        os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), 2)
    os.closerange(3, _MAXFD)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    random.seed()
    sys.argv = ["-m", *request["args"]]  # runpy puts the module's path first, as -m does
    del sys.modules["bridged.__main__"]  # run afresh as __main__, as -m runs it


if __name__ == "__main__":
    import runpy

    import gc

    import bridged.__main__  # noqa: F401 - imported once here, for every daemon forked
    import bridged.supervisor  # noqa: F401

    # What the imports made goes to the collector's permanent generation, as
    # gc.freeze's documentation advises for a process that forks workers: else
    # each child's first full collection and its interpreter's exit walk that
    # heap and so copy every page of it (copy-on-write): 0.15 s of CPU for a
    # forked `bridged --version`, 0.04 s frozen.
    gc.freeze()
    _serve()  # returns in a forked child only
    runpy.run_module("bridged", run_name="__main__", alter_sys=True)
