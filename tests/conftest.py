"""Shared fixtures: the daemon on a pty and the host's end of it."""

from __future__ import annotations

import socket

import pytest

from tests.harness import Daemon, EchoServer, Host, SinkServer
from tests.shared import SharedDaemon

# bridged.testing as its pytest11 entry point loads it once installed (the suite needs no install);
# tests.schedule: the longest test files first.
pytest_plugins = ["bridged.testing", "tests.schedule", "tests.cpuclock"]


@pytest.fixture(scope="session")
def _empty_config_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("etc-bridged")


@pytest.fixture(scope="session", autouse=True)
def _bytecode_cache():
    """Every Python the tests start (a daemon for nearly every test) may write
    bridged's compiled bytecode to __pycache__ (ignored by git) and read it back.

    With PYTHONDONTWRITEBYTECODE set (as in some CI shells) each daemon
    compiled bridged's ~70 modules from source again: about 0.2 s of CPU per
    daemon, a few minutes per suite run.  (Not PYTHONPYCACHEPREFIX: a cache
    of its own starts empty for the standard library too, and the first
    daemons then took seconds, enough to fail test_locust's 6 s run.)
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        yield


@pytest.fixture(autouse=True)
def _no_system_config(_empty_config_dir, monkeypatch):
    """No test (nor the daemons it starts) reads the machine's /etc/bridged."""
    monkeypatch.setenv("BRIDGED_CONFIG_DIR", str(_empty_config_dir))


@pytest.fixture
def make_daemon(tmp_path):
    """Start daemons with extra config; each is stopped (and must exit 0) at the end."""
    started: list[Daemon] = []

    def make(config: str = "", args: tuple[str, ...] = (), name: str = "d") -> Daemon:
        directory = tmp_path / f"{name}{len(started)}"
        directory.mkdir()
        daemon = Daemon(directory, config, args).start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        code = daemon.stop()
        assert code == 0, f"daemon exited {code}:\n{daemon.log_text()[-3000:]}"
        errors = [e for e in daemon.events() if e.get("level") in ("error", "critical")
                  and e.get("event") not in daemon.expected_errors]
        assert not errors, f"unexpected errors in the log: {errors}"


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    return make_daemon()


@pytest.fixture
def host(daemon) -> Host:
    """A host MCU that has seen ready, turned echo off and joined the Wi-Fi."""
    h = daemon.host()
    h.boot()
    yield h
    h.close()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    """One default daemon for a module's tests (tests/shared.py), stopped and checked at its end."""
    shared = SharedDaemon(tmp_path_factory.mktemp("shared"))
    yield shared
    shared.stop()


@pytest.fixture
def shared_session(shared_daemon) -> Daemon:
    """The module's shared daemon for this test, factory-fresh and its log marked
    (tests/shared.py): a module whose tests read their daemon's log defines
    ``daemon`` as this, and conftest's ``host`` then boots on it."""
    daemon = shared_daemon.begin()
    yield daemon
    shared_daemon.done()


@pytest.fixture
def shared_host(request, shared_daemon) -> Host:
    """As ``host``, on the module's shared daemon, factory-fresh (AT+RESTORE).

    A module opts in by defining ``host`` as this; a test there that also asks
    for ``daemon`` would get another daemon than its host's, so it may not.
    """
    assert "daemon" not in request.fixturenames, "a test reading its daemon needs conftest's own host"
    h = shared_daemon.host()
    yield h
    h.close()
    shared_daemon.done()


@pytest.fixture
def shared_or_own_host(request) -> Host:
    """``shared_host`` for a test that asks for no ``daemon``; conftest's ``host`` (on the
    test's own daemon) for one that does: a module of both kinds defines ``host`` as this."""
    if "daemon" in request.fixturenames:
        daemon = request.getfixturevalue("daemon")
        h = daemon.host()
        h.boot()
        yield h
        h.close()
    else:
        yield request.getfixturevalue("shared_host")


@pytest.fixture
def echo_server():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def sink_server():
    server = SinkServer()
    yield server
    server.close()


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A bound AF_UNIX datagram socket named by $NOTIFY_SOCKET, as systemd makes."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()
