"""Shared pieces of the benchmarks: the daemon under test, the socat
baseline, a pty client, TCP servers on 127.0.0.1, timing and CPU helpers.

Rules kept throughout: every wait has a timeout, only 127.0.0.1 is ever
addressed, and every loop is bounded (by a count or by a deadline).
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path
from typing import Iterable

import psutil

__all__ = [
    "BenchError",
    "HashMismatch",
    "REPO",
    "BRIDGED",
    "SOCAT",
    "MB",
    "PtyClient",
    "Daemon",
    "Socat",
    "SinkServer",
    "EchoServer",
    "TreeCpu",
    "median",
    "percentile",
    "now",
]

REPO = Path(__file__).resolve().parent.parent
BRIDGED = REPO / ".venv" / "bin" / "bridged"
SOCAT = shutil.which("socat") or "/usr/bin/socat"
LOCALHOST = "127.0.0.1"
MB = 1_000_000  # throughput and CPU figures use decimal megabytes

CONFIG_TOML = """\
[wifi]
station_interface = "lo"
[uart]
urc_gap_ms = {urc_gap_ms!r}
pace = {pace}
"""
URC_GAP_MS = 5.0  # the default, and every benchmark's unless it says otherwise
# The esp32 profile paces the pty at 115200 baud: benchmarks measure bridged's own
# cost with the pty as fast as it goes, bench/pacing.py aside.

now = time.perf_counter


class BenchError(Exception):
    """The system under test misbehaved (timeout, unexpected bytes, exit)."""


class HashMismatch(BenchError):
    """The bytes that arrived are not the bytes that were sent."""


# --------------------------------------------------------------------- stats


def median(values: Iterable[float]) -> float:
    vals = list(values)
    if not vals:
        return float("nan")
    return statistics.median(vals)


def percentile(values: Iterable[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), p in 0..100."""
    vals = sorted(values)
    if not vals:
        return float("nan")
    k = (len(vals) - 1) * (p / 100.0)
    lo = int(k)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


# ----------------------------------------------------------------------- CPU


def _proc_cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _threads_runtime(pid: int) -> dict[int, int] | None:
    """Nanoseconds on CPU of each live thread (``/proc/PID/task/TID/schedstat``).

    None where the kernel does not offer it.  A thread that ends while we
    read is left out.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    out: dict[int, int] = {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out or None


class TreeCpu:
    """CPU seconds (user + system) of a process and all its descendants.

    ``start()`` samples every live process of the tree; ``stop()`` samples
    again and returns the sum of the differences (a process born in between
    counts in full).  A process that died in between is lost; the daemon's
    processes live for the whole benchmark.

    Each process's time is the sum of its threads' ``schedstat`` run time
    (nanosecond resolution), so short windows and a light socat are measured
    exactly; psutil's user + system (10 ms clock ticks) is the fallback for a
    process where schedstat is missing or one of whose threads ended during
    the window (its run time would be lost from the sum).  ``precise`` tells
    whether every process was measured the precise way.  ``wakeups`` counts
    the tree's voluntary context switches over the window: at a paced rate,
    CPU follows them more than bytes.
    """

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self._before: dict[tuple[int, float], tuple[float, dict[int, int] | None]] = {}
        self._switches: dict[tuple[int, float], int] = {}
        self.precise = True
        self.wakeups = 0

    def _sample(self) -> dict[tuple[int, float], tuple[float, dict[int, int] | None]]:
        procs = [self.root]
        try:
            procs += self.root.children(recursive=True)
        except psutil.Error:
            pass
        out: dict[tuple[int, float], tuple[float, dict[int, int] | None]] = {}
        self._last_switches: dict[tuple[int, float], int] = {}
        for p in procs:
            try:
                key = (p.pid, p.create_time())
                out[key] = (_proc_cpu(p), _threads_runtime(p.pid))
                self._last_switches[key] = p.num_ctx_switches().voluntary
            except psutil.Error:
                pass
        return out

    def start(self) -> None:
        self._before = self._sample()
        self._switches = self._last_switches
        self.precise = True

    def stop(self) -> float:
        after = self._sample()
        self.wakeups = sum(n - self._switches.get(key, 0) for key, n in self._last_switches.items())
        total = 0.0
        for key, (ticks, threads) in after.items():
            before = self._before.get(key)
            if before is None:  # born during the window: all of it counts
                if threads is not None:
                    total += sum(threads.values()) / 1e9
                else:
                    total += ticks
                    self.precise = False
                continue
            b_ticks, b_threads = before
            if threads is not None and b_threads is not None and set(b_threads) <= set(threads):
                total += sum(ns - b_threads.get(tid, 0) for tid, ns in threads.items()) / 1e9
            else:
                total += ticks - b_ticks
                self.precise = False
        return total


# ----------------------------------------------------------------------- pty


class PtyClient:
    """The MCU's end of the serial line: a raw, non-blocking pty slave."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        deadline = now() + timeout
        fd = -1
        for _ in range(1000):
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
                break
            except (FileNotFoundError, PermissionError):
                if now() > deadline:
                    raise BenchError(f"could not open {path} within {timeout} s")
                time.sleep(0.01)
        if fd < 0:
            raise BenchError(f"could not open {path}")
        tty.setraw(fd)
        os.set_blocking(fd, False)
        self.fd = fd
        self.path = path
        self.buf = bytearray()

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1

    def write(self, data: bytes, timeout: float = 10.0) -> None:
        view = memoryview(data)
        deadline = now() + timeout
        while view:
            try:
                n = os.write(self.fd, view)
                view = view[n:]
                continue
            except BlockingIOError:
                pass
            left = deadline - now()
            if left <= 0:
                raise BenchError(
                    f"write to {self.path} stalled: {len(view)} of {len(data)} bytes "
                    f"not accepted within {timeout} s"
                )
            select.select([], [self.fd], [], left)

    def _fill(self, left: float) -> bool:
        r, _, _ = select.select([self.fd], [], [], max(left, 0.0))
        if not r:
            return False
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError as exc:
            raise BenchError(f"read from {self.path} failed: {exc}") from exc
        if not chunk:
            raise BenchError(f"{self.path}: end of file")
        self.buf += chunk
        return True

    def read_until(self, terms: tuple[bytes, ...], timeout: float = 5.0) -> bytes:
        """Consume and return the buffer up to and including the first of ``terms``."""
        deadline = now() + timeout
        while True:
            best = -1
            best_end = 0
            for t in terms:
                i = self.buf.find(t)
                if i >= 0 and (best < 0 or i < best):
                    best, best_end = i, i + len(t)
            if best >= 0:
                out = bytes(self.buf[:best_end])
                del self.buf[:best_end]
                return out
            left = deadline - now()
            if left <= 0:
                raise BenchError(
                    f"timeout after {timeout} s waiting for {terms!r} on {self.path}; "
                    f"received so far: {bytes(self.buf[-400:])!r}"
                )
            self._fill(left)

    def read_exact(self, n: int, timeout: float = 5.0) -> bytes:
        deadline = now() + timeout
        while len(self.buf) < n:
            left = deadline - now()
            if left <= 0:
                raise BenchError(
                    f"timeout after {timeout} s waiting for {n} bytes on {self.path}; "
                    f"received: {bytes(self.buf[-400:])!r}"
                )
            self._fill(left)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def drain(self, quiet: float = 0.1, timeout: float = 2.0) -> bytes:
        """Read until nothing arrives for ``quiet`` seconds (at most ``timeout``)."""
        deadline = now() + timeout
        while now() < deadline:
            if not self._fill(min(quiet, deadline - now())):
                break
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def expect(self, request: bytes | None, reply: bytes, timeout: float = 5.0,
               failures: tuple[bytes, ...] = (b"ERROR\r\n", b"FAIL\r\n")) -> bytes:
        """Send ``request`` (if any), then require exactly ``reply``."""
        if request is not None:
            self.write(request, timeout)
        got = self.read_until((reply,) + failures, timeout)
        if got != reply:
            raise BenchError(f"sent {request!r}: expected {reply!r}, got {got!r}")
        return got


# -------------------------------------------------------------- processes


def _stop_process(popen: subprocess.Popen, name: str, grace: float,
                  descendants: list[psutil.Process]) -> tuple[int | None, list[str]]:
    """SIGTERM ``popen``; wait; SIGKILL it and the listed descendants if needed."""
    notes: list[str] = []
    if popen.poll() is None:
        try:
            popen.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        t0 = now()
        try:
            popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            notes.append(f"{name} (pid {popen.pid}) still running {grace} s after SIGTERM; SIGKILL")
            popen.kill()
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                notes.append(f"{name} (pid {popen.pid}) survived SIGKILL for 5 s")
        else:
            took = now() - t0
            if took > 5.0:
                notes.append(f"{name} took {took:.1f} s to exit after SIGTERM")
    # Descendants we saw while it ran: they must be gone too.
    alive = []
    for p in descendants:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    if alive:
        _, still = psutil.wait_procs(alive, timeout=3)
        for p in still:
            notes.append(f"{name}: descendant pid {p.pid} still alive after exit; SIGKILL")
            try:
                p.kill()
            except psutil.Error:
                pass
    return popen.returncode, notes


class Daemon:
    """``bridged run`` on a fresh pty, config and state directory.

    Use as a context manager; ``client`` is a ready PtyClient with echo off.
    """

    READY_LINE = "bridged: serial port ready at"

    def __init__(self, start_timeout: float = 20.0, urc_gap_ms: float = URC_GAP_MS,
                 config: str = "", pace: bool = False) -> None:
        self.start_timeout = start_timeout
        self.pace = pace
        self.urc_gap_ms = float(urc_gap_ms)
        self.extra_config = config  # appended to CONFIG_TOML (e.g. a [log] section)
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-bridged-"))
        self.link = str(self.tmp / "tty")
        self.config = self.tmp / "bridged.toml"
        self.state = self.tmp / "state"
        self.logfile = self.tmp / "bridged.log"
        self.popen: subprocess.Popen | None = None
        self.client: PtyClient | None = None
        self.returncode: int | None = None
        self.notes: list[str] = []
        self._descendants: list[psutil.Process] = []

    # context manager
    def __enter__(self) -> "Daemon":
        try:
            self.start()
        except BaseException:
            self.stop(keep_logs_on_error=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(keep_logs_on_error=exc_type is not None)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def start(self) -> None:
        self.config.write_text(CONFIG_TOML.format(urc_gap_ms=self.urc_gap_ms, pace=str(self.pace).lower()) + self.extra_config)
        self.state.mkdir()
        log = open(self.logfile, "wb")
        try:
            self.popen = subprocess.Popen(
                [str(BRIDGED), "run", "--config", str(self.config), "--pty", self.link,
                 "--state-dir", str(self.state)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=str(REPO),
            )
        finally:
            log.close()
        deadline = now() + self.start_timeout
        while True:
            if self.popen.poll() is not None:
                raise BenchError(
                    f"bridged exited with {self.popen.returncode} during start:\n{self.log_tail()}")
            if self.READY_LINE in self.logfile.read_text(errors="replace"):
                break
            if now() > deadline:
                raise BenchError(f"bridged did not print '{self.READY_LINE}' within "
                                 f"{self.start_timeout} s:\n{self.log_tail()}")
            time.sleep(0.02)
        self.client = PtyClient(self.link, timeout=max(deadline - now(), 1.0))
        # Ready when "\r\n" then "AT\r\n" gets OK (the front may still be starting).
        for attempt in range(100):
            self.client.write(b"\r\n")
            self.client.drain(quiet=0.05, timeout=0.5)
            self.client.write(b"AT\r\n")
            try:
                got = self.client.read_until((b"OK\r\n", b"ERROR\r\n"), timeout=1.0)
            except BenchError:
                got = b""
            if got.endswith(b"OK\r\n"):
                break
            if now() > deadline or self.popen.poll() is not None:
                raise BenchError(f"bridged never answered AT with OK (last: {got!r}):\n"
                                 f"{self.log_tail()}")
        else:
            raise BenchError("bridged never answered AT with OK")
        self.client.drain(quiet=0.05, timeout=0.5)
        # Echo off; the reply still carries the echo of ATE0 itself.
        self.client.write(b"ATE0\r\n")
        self.client.read_until((b"OK\r\n",), timeout=5.0)
        self.client.drain(quiet=0.05, timeout=0.5)
        self.client.expect(b"AT\r\n", b"\r\nOK\r\n")
        try:
            self._descendants = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            self._descendants = []

    def join_wifi(self) -> None:
        assert self.client is not None
        self.client.write(b'AT+CWJAP="bridged","x"\r\n')
        got = self.client.read_until((b"\r\nOK\r\n", b"ERROR\r\n", b"FAIL\r\n"), timeout=20.0)
        if not got.endswith(b"\r\nOK\r\n"):
            raise BenchError(f"AT+CWJAP failed: {got!r}")

    def tcp_connect(self, port: int) -> None:
        assert self.client is not None
        req = b'AT+CIPSTART="TCP","127.0.0.1",%d\r\n' % port
        self.client.write(req)
        got = self.client.read_until((b"\r\nOK\r\n", b"ERROR\r\n"), timeout=10.0)
        if got != b"CONNECT\r\n\r\nOK\r\n":
            raise BenchError(f"{req!r}: expected b'CONNECT\\r\\n\\r\\nOK\\r\\n', got {got!r}")

    def stop(self, keep_logs_on_error: bool = False) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.popen is not None:
            if not self._descendants:
                try:
                    self._descendants = psutil.Process(self.pid).children(recursive=True)
                except psutil.Error:
                    pass
            self.returncode, notes = _stop_process(self.popen, "bridged", 10.0,
                                                   self._descendants)
            if self.returncode not in (0, None):
                notes.append(f"bridged exited with status {self.returncode}")
            self.notes += notes
            self.popen = None
        if self.notes or keep_logs_on_error:
            for n in self.notes:
                print(f"  ! {n}", file=sys.stderr)
            print(f"  ! bridged log kept in {self.logfile}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


class Socat:
    """socat PTY,link=...,raw,echo=0 TCP:127.0.0.1:PORT; ``client`` is the pty."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-socat-"))
        self.link = str(self.tmp / "tty")
        self.logfile = self.tmp / "socat.log"
        self.timeout = timeout
        self.port = port
        self.popen: subprocess.Popen | None = None
        self.client: PtyClient | None = None
        self.notes: list[str] = []

    def __enter__(self) -> "Socat":
        try:
            self.start()
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(keep_logs=exc_type is not None)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def peer_address(self) -> str:
        """socat's second address: where the pty's bytes go."""
        return f"TCP:{LOCALHOST}:{self.port}"

    def start(self) -> None:
        log = open(self.logfile, "wb")
        try:
            self.popen = subprocess.Popen(
                [SOCAT, "-d", f"PTY,link={self.link},raw,echo=0", self.peer_address()],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = now() + self.timeout
        while not os.path.islink(self.link):
            if self.popen.poll() is not None:
                raise BenchError(f"socat exited with {self.popen.returncode}: "
                                 f"{self.logfile.read_text(errors='replace')}")
            if now() > deadline:
                raise BenchError(f"socat did not create {self.link} within {self.timeout} s")
            time.sleep(0.01)
        self.client = PtyClient(self.link, timeout=max(deadline - now(), 1.0))

    def stop(self, keep_logs: bool = False) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.popen is not None:
            _, notes = _stop_process(self.popen, "socat", 5.0, [])
            self.notes += notes
            self.popen = None
        if keep_logs or self.notes:
            for n in self.notes:
                print(f"  ! {n}", file=sys.stderr)
            print(f"  ! socat log kept in {self.logfile}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------- TCP servers


class _Server:
    """A TCP listener on 127.0.0.1 (port 0) served by daemon threads."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOCALHOST, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.connections = 0
        self.errors: list[str] = []
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept_loop, name=f"{type(self).__name__}-accept",
                             daemon=True)
        t.start()
        self._threads.append(t)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            conn.settimeout(0.2)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve_wrapper, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve_wrapper(self, conn: socket.socket) -> None:
        try:
            self.serve(conn)
        except Exception as exc:  # recorded, reported by the benchmark
            self.errors.append(repr(exc))
        finally:
            conn.close()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stopping.set()
        try:
            self.sock.close()
        except OSError:
            pass
        for t in self._threads:
            t.join(timeout=2.0)


class SinkServer(_Server):
    """Hashes (sha256) and counts every byte it receives, over all connections."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.nbytes = 0
        self.closed_connections = 0
        self._cond = threading.Condition()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                data = conn.recv(1 << 20)
            except socket.timeout:
                continue
            if not data:
                break
            with self._cond:
                self.hash.update(data)
                self.nbytes += len(data)
                self._cond.notify_all()
        with self._cond:
            self.closed_connections += 1
            self._cond.notify_all()

    def wait_bytes(self, n: int, timeout: float) -> bool:
        """Wait until at least ``n`` bytes arrived; False on timeout."""
        deadline = now() + timeout
        with self._cond:
            while self.nbytes < n:
                left = deadline - now()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def wait_connections(self, n: int, timeout: float) -> bool:
        deadline = now() + timeout
        while self.connections < n:
            if now() > deadline:
                return False
            time.sleep(0.005)
        return True

    def digest(self) -> str:
        with self._cond:
            return self.hash.copy().hexdigest()


class EchoServer(_Server):
    """Sends back whatever it receives."""

    def serve(self, conn: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                data = conn.recv(1 << 16)
            except socket.timeout:
                continue
            if not data:
                break
            conn.sendall(data)
