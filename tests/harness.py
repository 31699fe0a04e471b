"""Real parts for the end-to-end tests: the daemon on a pty, the host MCU's
side of the serial line, and loopback peers.

Nothing here mocks a socket or the serial port: the daemon runs as
``python -m bridged run --pty LINK`` and the tests talk to it through the pty
exactly as an MCU talks to an ESP32.  Every wait has a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import termios
import tomllib
import tty
from pathlib import Path

from tests import forkserver

__all__ = ["Daemon", "Host", "parse_events", "Demux", "EchoServer", "SinkServer", "Timeout", "udp_peer",
           "wait_udp_read", "with_boot_ms", "with_test_timing", "with_default", "notify_state"]

DEFAULT_TIMEOUT = 10.0


def with_boot_ms(config: str, boot_ms: int = 0) -> str:
    """``config`` with the suite's speed settings, each unless it sets it itself:
    ``[firmware] boot_ms`` and ``[uart] pace = false``.

    The suite restarts the daemon's session hundreds of times; it should not
    wait a real chip's boot each time, nor move its megabytes at the esp32
    profile's 115200 baud.
    """
    return with_default(with_default(config, "firmware", "boot_ms", boot_ms), "uart", "pace", False)


def with_test_timing(config: str) -> str:
    """``config`` without a real chip's waits, unless the test sets them: no
    boot silence (``[firmware] boot_ms``), a pty as fast as it goes (``[uart]
    pace``), no association time (``[wifi] connect_delay_ms``).  The esp32
    profile has all three; a test of the timing itself sets the key."""
    return with_default(with_boot_ms(config), "wifi", "connect_delay_ms", 0)


def with_default(config: str, section: str, key: str, value: int | bool) -> str:
    """``config`` with ``[section] key = value`` unless it sets the key itself.

    TOML forbids a table twice, so a ``[section]`` table of the test's own gets
    the key inside it.
    """
    try:
        doc = tomllib.loads(config)
    except tomllib.TOMLDecodeError:
        return config  # a test of a broken file: leave it as it is
    table = doc.get(section)
    if isinstance(table, dict) and key in table:
        return config
    line = f"{key} = {str(value).lower() if isinstance(value, bool) else value}\n"
    header = re.search(rf"^[ \t]*\[[ \t]*{section}[ \t]*\][ \t]*(#.*)?$\n?", config, re.M)
    if header is not None:
        at = header.end()
        return config[:at] + ("" if config[:at].endswith("\n") else "\n") + line + config[at:]
    if table is not None:  # dotted keys or an inline table: nothing safe to add
        return config
    return config + ("" if not config or config.endswith("\n") else "\n") + f"[{section}]\n" + line


class Timeout(AssertionError):
    pass


def parse_events(text: str, name: str | None = None) -> list[dict]:
    """The JSON log events in a daemon's output (each line is '<N>{json}'), all or those named ``name``."""
    out = []
    for line in text.splitlines():
        m = re.match(r"<\d>(\{.*\})$", line)
        if m:
            event = json.loads(m.group(1))
            if name is None or event.get("event") == name:
                out.append(event)
    return out


class Daemon:
    """bridged run on a pty (or with ``port``: --port on a serial device the test owns), with a config written for the test."""

    def __init__(self, tmp: Path, config: str = "", args: tuple[str, ...] = (),
                 wrap: tuple[str, ...] = (), station: str = "lo", own_group: bool = False,
                 port: str | None = None) -> None:
        self.tmp = tmp
        self.port = port
        self.link = port or str(tmp / "tty")
        self.state_dir = tmp / "state"
        self.config_path = tmp / "bridged.toml"
        self.station = station
        self.write_config(config)
        self.wrap = wrap  # e.g. ("ip", "netns", "exec", NAME): run inside a test host
        self.log_path = tmp / "bridged.log"
        self.args = args
        self.own_group = own_group  # a process group of its own, as a shell gives a foreground job
        self.proc: subprocess.Popen | forkserver.ForkedProcess | None = None
        self.expected_errors: set[str] = set()  # log events a test provokes on purpose
        # Where log_text() and events() start: a daemon shared by several tests
        # (tests/shared.py) shows each test only what was logged since its mark().
        self.log_from = 0
        self.pending_host: Host | None = None  # handed out by the next host() (tests/shared.py)

    def write_config(self, config: str) -> None:
        """(Re)write the config file: the station, then ``config`` (`with_test_timing`)."""
        self.config_path.write_text(with_test_timing(f'[wifi]\nstation_interface = "{self.station}"\n' + config))

    def start(self) -> "Daemon":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        args = ["run", "--config", str(self.config_path), "--port" if self.port else "--pty", self.link,
                "--state-dir", str(self.state_dir), *self.args]
        if not self.wrap and forkserver.enabled():
            # python -m bridged without its imports' half second (tests/forkserver.py)
            self.proc = forkserver.spawn(args, env, str(self.log_path), group=self.own_group)
        else:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([*self.wrap, sys.executable, "-m", "bridged", *args],
                                             stdout=log, stderr=subprocess.STDOUT, env=env,
                                             process_group=0 if self.own_group else None)
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while not os.path.exists(self.link):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise Timeout(f"daemon did not create {self.link}:\n{self.log_text()}")
            time.sleep(0.02)
        return self

    def host(self) -> "Host":
        if self.pending_host is not None:
            host, self.pending_host = self.pending_host, None
            return host
        return Host(self.link)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise Timeout(f"daemon ignored SIGTERM:\n{self.log_text()}")

    def log_text(self) -> str:
        """The log from the mark on (all of it unless mark() was called)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_from)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return text.replace("\r\n", "\n").replace("\r", "\n")  # as read_text() gives it

    def read_log(self, start: int) -> tuple[str, int]:
        """The log's complete lines from byte ``start`` on, and the byte offset after them
        (a line still being written is left for the next read)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                data = f.read()
        except OSError:
            return "", start
        whole = data[: data.rfind(b"\n") + 1]
        return whole.decode(errors="replace"), start + len(whole)

    def mark(self) -> None:
        """From now on, log_text() and events() show only what is logged after this point."""
        self.log_from = self.read_log(self.log_from)[1]

    def events(self, name: str | None = None) -> list[dict]:
        """The daemon's JSON log events (each line is '<N>{json}')."""
        return parse_events(self.log_text(), name)

    def wait_event(self, name: str, count: int = 1, timeout: float = DEFAULT_TIMEOUT, **fields) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(name) if all(e.get(k) == v for k, v in fields.items())]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise Timeout(f"no {count}x {name} {fields} in the log:\n{self.log_text()[-4000:]}")
            time.sleep(0.02)

    def worker_pid(self, link_id: int) -> int:
        started = self.wait_event("child_started", role="link", link_id=link_id)
        return started[-1]["pid"]

    def front_pid(self) -> int:
        """The running front's pid (the last one started)."""
        return self.wait_event("child_started", role="front")[-1]["pid"]


class Host:
    """The MCU's end of the serial line."""

    def __init__(self, path: str | None, fd: int | None = None) -> None:
        """Open ``path``, or drive ``fd`` (a pty master whose slave the daemon opened with --port)."""
        if fd is None:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
            tty.setraw(fd, termios.TCSANOW)  # TCSAFLUSH would discard "ready"
        self.fd = fd
        os.set_blocking(self.fd, False)
        self.buf = bytearray()

    def close(self) -> None:
        os.close(self.fd)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while view:
            try:
                n = os.write(self.fd, view)
                view = view[n:]
            except BlockingIOError:
                # Wait until the daemon reads, collecting what it sends meanwhile.
                readable, writable, _ = select.select([self.fd], [self.fd], [], 0.05)
                if readable:
                    self._fill(0)
                if time.monotonic() > deadline:
                    raise Timeout("the daemon stopped reading the pty")

    def _fill(self, wait: float) -> bool:
        readable, _, _ = select.select([self.fd], [], [], wait)
        if not readable:
            return False
        try:
            chunk = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return False
        self.buf += chunk
        return bool(chunk)

    def expect(self, pattern: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Read until ``pattern``; return everything up to and including it."""
        deadline = time.monotonic() + timeout
        while (i := self.buf.find(pattern)) < 0:
            if time.monotonic() > deadline:
                raise Timeout(f"waited for {pattern!r}, have {bytes(self.buf[-2000:])!r}")
            self._fill(0.05)
        out = bytes(self.buf[: i + len(pattern)])
        del self.buf[: i + len(pattern)]
        return out

    def read_exactly(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """The next ``n`` bytes from the device (anything after them stays buffered)."""
        got = bytearray(self.buf)
        self.buf.clear()
        deadline = time.monotonic() + timeout
        while len(got) < n:
            if time.monotonic() >= deadline:
                raise Timeout(f"{len(got)} of {n} bytes in {timeout} s")
            self._fill(0.005)
            got += self.buf
            self.buf.clear()
        self.buf += got[n:]
        return bytes(got[:n])

    def read_quiet(self, quiet: float = 0.15, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Everything until the line has been silent for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while self._fill(quiet):
            if time.monotonic() > deadline:
                break
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def command(self, line: bytes, final: bytes = b"\r\nOK\r\n", timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Send one command line; return the answer through ``final``."""
        self.write(line + b"\r\n")
        return self.expect(final, timeout)

    def ask(self, line: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Send a command; return its answer through OK or ERROR, whichever ends it."""
        self.write(line + b"\r\n")
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(rb"\r\n(OK|ERROR)\r\n", self.buf)
            if m:
                out = bytes(self.buf[: m.end()])
                del self.buf[: m.end()]
                return out
            if time.monotonic() > deadline:
                raise Timeout(f"no final result for {line!r}: {bytes(self.buf[-500:])!r}")
            self._fill(0.05)

    def send_data(self, command: bytes, payload: bytes) -> bytes:
        """A send command (AT+CIPSEND=..., CIPSENDEX, CIPSENDL): wait for its
        prompt, write ``payload``, return the answer through SEND OK."""
        self.write(command + b"\r\n")
        self.expect(b">")
        self.write(payload)
        return self.expect(b"SEND OK\r\n")

    def boot(self) -> None:
        """Wait for ``ready``, turn echo off and join the emulated Wi-Fi."""
        self.expect(b"\r\nready\r\n")
        self.command(b"ATE0")
        self.command(b'AT+CWJAP="bridged","password"')

    def reset_into_passthrough(self, server: "EchoServer") -> None:
        """AT+RST with AT+SAVETRANSLINK stored: ``ready``, then ``>`` with no OK, and
        bytes echoed back through the link bridged opened to ``server`` by itself."""
        self.write(b"AT+RST\r\n")
        self.expect(b"\r\nready\r\n")
        self.expect(b"\r\n>")
        server.wait_connections(1)
        self.write(b"boot data")
        # The rejoin's WIFI lines are unsolicited: they may still be on their way.
        echoed = self.expect(b"boot data").replace(b"WIFI CONNECTED\r\nWIFI GOT IP\r\n", b"")
        assert echoed == b"boot data", echoed

    def read_ipd(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[int | None, bytes]:
        """Read one active-mode +IPD message; return (link id or None, payload)."""
        self.expect(b"+IPD,", timeout)
        head = self.expect(b":", timeout)[:-1]
        parts = head.split(b",")
        link_id = int(parts[0]) if len(parts) >= 2 and b'"' not in parts[1] else None
        length = int(parts[1] if link_id is not None else parts[0])
        deadline = time.monotonic() + timeout
        while len(self.buf) < length:
            if time.monotonic() > deadline:
                raise Timeout(f"+IPD payload short: {len(self.buf)} of {length}")
            self._fill(0.05)
        data = bytes(self.buf[:length])
        del self.buf[:length]
        return link_id, data


def free_port(kind: int = socket.SOCK_STREAM, family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """A port nothing on ``host`` uses now (bound once and let go): for a listener the daemon opens."""
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def udp_peer(host: str = "127.0.0.1", family: int = socket.AF_INET) -> socket.socket:
    """A bound UDP socket on loopback (port 0) whose reads wait 5 s at most."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(5)
    return sock


def wait_udp_read(port: int, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Until the UDP socket bound to 127.0.0.1:``port`` holds nothing unread (/proc/net/udp's
    rx_queue): every datagram sent to it so far has been taken by its reader."""
    local = "0100007F:%04X" % port
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/net/udp") as table:
            queues = [int(fields[4].split(":")[1], 16) for fields in map(str.split, table) if fields[1] == local]
        if queues and not any(queues):
            return
        if time.monotonic() > deadline:
            raise Timeout(f"127.0.0.1:{port} still holds {queues} bytes unread")
        time.sleep(0.02)


class _Server:
    def __init__(self, family: int = socket.AF_INET, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.closed_by_peer = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def wait_connections(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> list[socket.socket]:
        deadline = time.monotonic() + timeout
        while len(self.conns) < n:
            if time.monotonic() > deadline:
                raise Timeout(f"{len(self.conns)} of {n} connections")
            time.sleep(0.01)
        return self.conns

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


class EchoServer(_Server):
    """Sends back what it receives; notes when the peer closes."""

    def _serve(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            return
        self.closed_by_peer.set()


class SinkServer(_Server):
    """Hashes what it receives, per connection, in accept order."""

    def __init__(self, *args, **kwargs) -> None:
        self.hashes: dict[int, "hashlib._Hash"] = {}
        self.counts: dict[int, int] = {}
        super().__init__(*args, **kwargs)

    def _serve(self, conn: socket.socket) -> None:
        key = id(conn)
        self.hashes[key] = hashlib.sha256()
        self.counts[key] = 0
        try:
            while data := conn.recv(65536):
                self.hashes[key].update(data)
                self.counts[key] += len(data)
        except OSError:
            return
        self.closed_by_peer.set()


class StampedSink:
    """A TCP peer noting when each byte count arrived and when the FIN came."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.arrivals: list[tuple[float, int]] = []
        self.data = bytearray()
        self.fin_at: float | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        conn.settimeout(20)
        with conn:
            while chunk := conn.recv(65536):
                self.data += chunk
                self.arrivals.append((time.monotonic(), len(self.data)))
            self.fin_at = time.monotonic()

    def first_at(self, count: int) -> float:
        return next(t for t, n in self.arrivals if n >= count)

    def close(self) -> None:
        self.thread.join(20)
        self.server.close()


class Demux:
    """Splits what the daemon sends into +IPD payloads (per link) and the rest.

    Payloads are taken by their announced length, so random payload bytes are
    never mistaken for messages.
    """

    def __init__(self, host: Host) -> None:
        self.host = host
        self.text = bytearray()
        self.data: dict[int | None, bytearray] = {}

    def pump(self, wait: float = 0.02) -> None:
        self.host._fill(wait)
        self._parse()

    def _parse(self) -> None:
        buf = self.host.buf
        while True:
            i = buf.find(b"+IPD,")
            if i < 0:
                # Hold back only a tail that may be the start of a split "+IPD,".
                keep = next((k for k in range(4, 0, -1) if buf.endswith(b"+IPD,"[:k])), 0)
                self.text += buf[: len(buf) - keep]
                del buf[: len(buf) - keep]
                return
            colon = buf.find(b":", i)
            if colon < 0:
                self._to_text(i)
                return
            parts = bytes(buf[i + 5 : colon]).split(b",")
            mux = len(parts) >= 2 and b'"' not in parts[1]
            link_id = int(parts[0]) if mux else None
            length = int(parts[1] if mux else parts[0])
            if len(buf) < colon + 1 + length:
                self._to_text(i)
                return
            self.text += buf[:i]
            self.data.setdefault(link_id, bytearray()).extend(buf[colon + 1 : colon + 1 + length])
            del buf[: colon + 1 + length]

    def _to_text(self, i: int) -> None:
        self.text += self.host.buf[:i]
        del self.host.buf[:i]

    def expect(self, pattern: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while (i := self.text.find(pattern)) < 0:
            if time.monotonic() > deadline:
                raise Timeout(f"waited for {pattern!r}; text {bytes(self.text[-300:])!r}")
            self.pump()
        out = bytes(self.text[: i + len(pattern)])
        del self.text[: i + len(pattern)]
        return out

    def wait_data(self, link_id: int | None, length: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.data.get(link_id, b"")) < length:
            if time.monotonic() > deadline:
                raise Timeout(f"link {link_id}: {len(self.data.get(link_id, b''))} of {length} bytes")
            self.pump()
        return bytes(self.data[link_id])

    def send(self, link_id: int | None, payload: bytes) -> bytes:
        """AT+CIPSEND one payload; return the text from the prompt to SEND OK/FAIL."""
        target = b"%d," % link_id if link_id is not None else b""
        self.host.write(b"AT+CIPSEND=" + target + b"%d\r\n" % len(payload))
        self.expect(b"\r\nOK\r\n\r\n>")
        self.host.write(payload)
        out = self.expect(b"\r\nSEND ")
        return out + self.expect(b"\r\n")


def notify_state(sock: socket.socket) -> bytes:
    """The next sd_notify message that is not a STATUS= summary or a watchdog
    ping (those may come at any moment); the socket's timeout bounds each wait."""
    while (message := sock.recv(4096)).startswith((b"STATUS=", b"WATCHDOG=1")):
        pass
    return message
