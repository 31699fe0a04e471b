"""The front's fault hooks without a daemon: untouched byte paths when no fault is
configured, and per-byte draws that do not depend on how the stream is split."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from bridged.config import default_config
from bridged.faults import FaultPlan, Where, parse_spec
from bridged.faults.front import FrontFaults
from bridged.faults.uart import ByteFaults
from bridged.net import resolver


def fake_front(faults: dict | None = None, seed: int = 1):
    config = default_config()
    specs = {name: parse_spec(name, table) for name, table in (faults or {}).items()}
    config = dataclasses.replace(config, faults=dataclasses.replace(config.faults, seed=seed, **specs))
    return SimpleNamespace(config=config, links=SimpleNamespace(on_fault=None), output=SimpleNamespace(mangle=None, batched=0),
                           rx_fault=None, tap=None, counters=SimpleNamespace(rx_bytes=0))


def _read(front, data: bytes) -> bytes:
    """One UART read as uart.reading does it: counted, then through the hook while there is one."""
    front.counters.rx_bytes += len(data)
    if front.rx_fault is not None:
        data = front.rx_fault(data)
    return data


def _write(front, data: bytes) -> bytes:
    """One batch of output as uart.output makes it: counted, then through the hook while there is one."""
    front.output.batched += len(data)
    if front.output.mangle is not None:
        data = front.output.mangle(data)
    return data


def test_no_fault_configured_leaves_the_byte_paths_and_resolver_alone():
    """Without [faults] the output and input hooks stay None and no command draws anything."""

    async def main():
        front = fake_front()
        faults = FrontFaults(front)
        faults.start()
        assert front.output.mangle is None and front.rx_fault is None
        assert faults.refuse(SimpleNamespace(name="+GMR")) is False
        assert faults.plan.next_deadline() is None and faults._timer is None
        faults.close()
        assert resolver._fault_hook is None

    asyncio.run(main())


def test_a_uart_fault_installs_only_its_own_path():
    """uart_drop hooks the output only; uart_overrun the input only."""

    async def main():
        out = fake_front({"uart_drop": {"rate": 0.1}})
        FrontFaults(out).start()
        assert out.output.mangle is not None and out.rx_fault is None
        inp = fake_front({"uart_overrun": {"rate": 0.1}})
        FrontFaults(inp).start()
        assert inp.output.mangle is None and inp.rx_fault is not None
        resolver.set_fault_hook(None)

    asyncio.run(main())


def test_an_on_demand_overrun_unhooks_the_input_once_over():
    """uart_overrun on demand (count 2, bytes 4) loses its two runs, one across reads, then the input hook
    is removed (uart.direct reads again); a second demand hooks it again with the offsets of the whole stream."""

    async def main():
        front = fake_front()
        faults = FrontFaults(front)
        faults.start()
        fired = []
        faults.plan.report = lambda name, details: fired.append(details["offset"])
        assert _read(front, b"0123456789") == b"0123456789" and front.rx_fault is None
        faults.demand("uart_overrun", {"count": 2, "bytes": 4})
        assert front.rx_fault is not None
        assert _read(front, b"ab") == b""  # the first run goes on into the next read
        assert front.rx_fault is not None
        assert _read(front, b"cdefghijk") == b"ijk"  # "cd" ends the first run, "efgh" is the second
        assert front.rx_fault is None and fired == [0, 4]
        assert _read(front, b"untouched") == b"untouched"
        faults.demand("uart_overrun", {"bytes": 1})
        assert _read(front, b"xyz") == b"yz" and front.rx_fault is None
        assert fired == [0, 4, 2 + 9 + 9]  # the stream's bytes since the first demand, hooked or not
        faults.close()

    asyncio.run(main())


def test_an_on_demand_drop_unhooks_the_output_once_over():
    """uart_drop on demand (count 2) drops the next two bytes out, then the output hook is removed
    (output goes the plain way: status faults.uart_hooks says so); uart_corrupt on demand hooks it
    again, its offset that of the whole stream since the first demand."""

    async def main():
        front = fake_front()
        faults = FrontFaults(front)
        faults.start()
        fired = []
        faults.plan.report = lambda name, details: fired.append((name, details["offset"]))
        assert _write(front, b"0123456789") == b"0123456789" and front.output.mangle is None
        faults.demand("uart_drop", {"count": 2})
        assert faults.line.hooked() == {"input": False, "output": True}
        assert _write(front, b"a") == b""
        assert front.output.mangle is not None  # one more to drop
        assert _write(front, b"bcd") == b"cd"
        assert front.output.mangle is None and faults.line.hooked() == {"input": False, "output": False}
        assert fired == [("uart_drop", 0), ("uart_drop", 1)]
        assert _write(front, b"untouched") == b"untouched"
        faults.demand("uart_corrupt", {})
        out = _write(front, b"xyz")
        assert out[0] != ord("x") and out[1:] == b"yz" and front.output.mangle is None
        assert fired[2] == ("uart_corrupt", 1 + 3 + 9)  # the stream's bytes since the first demand
        faults.close()

    asyncio.run(main())


def byte_faults(name: str, rate: float, seed: int = 7, **params) -> ByteFaults:
    spec = parse_spec(name, {"rate": rate, **params})
    return ByteFaults(FaultPlan([spec], seed, where=Where.FRONT, scope="front", start=0.0), lambda: 1.0)


STREAM = bytes(range(256)) * 8


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, len(STREAM)), max_size=12), name=st.sampled_from(["uart_drop", "uart_corrupt"]))
def test_outgoing_faults_hit_the_same_bytes_however_the_stream_is_written(cuts, name):
    """Any split of the output into writes gives the same bytes on the line as one write."""
    whole = byte_faults(name, 0.02).outgoing(STREAM)
    bounds = [0, *sorted(cuts), len(STREAM)]
    split = byte_faults(name, 0.02)
    assert b"".join(split.outgoing(STREAM[a:b]) for a, b in zip(bounds, bounds[1:])) == whole
    assert whole != STREAM


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_overruns_lose_the_same_bytes_however_the_input_is_read(cuts):
    """Any split of the input into reads keeps the same bytes, runs of `bytes` crossing reads."""
    whole = byte_faults("uart_overrun", 0.01, bytes=9).incoming(STREAM)
    bounds = [0, *sorted(cuts), len(STREAM)]
    split = byte_faults("uart_overrun", 0.01, bytes=9)
    assert b"".join(split.incoming(STREAM[a:b]) for a, b in zip(bounds, bounds[1:])) == whole
    assert (len(STREAM) - len(whole)) % 9 == 0 and len(whole) < len(STREAM)


def test_a_clean_write_is_passed_through_as_the_same_object():
    """Between hits the output hook returns the very bytes it was given (no copy)."""
    faults = byte_faults("uart_drop", 0.0001, seed=3)
    data = b"x" * 10
    assert faults.outgoing(data) is data


def test_the_readme_lists_every_fault_kind_with_its_keys():
    """README's Faults table has a row per catalog kind naming where it applies and its keys."""
    import re
    from pathlib import Path

    from bridged.faults.catalog import CATALOG

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for fault in CATALOG:
        row = re.search(rf"^\| `{fault.name}` \| {fault.where.value} \|(.*)$", readme, re.M)
        assert row, fault.name
        for p in fault.params:
            assert f"`{p.name}` {p.allowed()}" in row.group(1), (fault.name, p.name)


def test_worker_faults_are_counted_with_the_fronts_and_marked():
    """A FaultFired from link 2 adds to the counts status shows and marks the transcript with its details."""
    from bridged.ipc.messages import FaultFired
    from bridged.uart.transcript import MarkKind

    async def main():
        marks = []
        front = fake_front({"at_busy": {"rate": 1}})
        front.tap = SimpleNamespace(mark=lambda kind, **fields: marks.append((kind, fields)))
        faults = FrontFaults(front)
        faults.plan.fired("net_udp_loss")  # as if the front had one too
        faults._on_worker_fault(SimpleNamespace(link_id=2), FaultFired("net_udp_loss", 7, '{"bytes": 12}'))
        faults._on_worker_fault(SimpleNamespace(link_id=2), FaultFired("tls_fail", 8, "not json"))
        assert faults.counts() == {"net_udp_loss": 2, "tls_fail": 1}
        assert (MarkKind.FAULT, {"name": "net_udp_loss", "link": 2, "bytes": 12}) in marks
        assert (MarkKind.FAULT, {"name": "tls_fail", "link": 2}) in marks
        faults.close()

    asyncio.run(main())


def test_an_on_demand_at_fault_once_spent_draws_no_more_lines():
    """at_busy on demand (count 1) takes one command line; then no AT kind is left and the front
    stops drawing for each line (at_commands off: its quick AT+CIPSEND line is back) until the
    next demand turns it on again. A configured AT kind keeps it on for good."""

    async def main():
        front = fake_front()
        faults = FrontFaults(front)
        faults.start()
        front.ctx = SimpleNamespace(state=SimpleNamespace(syslog=False))
        replies: list[bytes] = []
        front.output = SimpleNamespace(reply=replies.append, mangle=None, batched=0)
        assert not faults.at_commands
        faults.demand("at_busy", {"count": 1})
        assert faults.at_commands
        assert faults.refuse(SimpleNamespace(name="+GMR")) is True and replies  # busy p...
        assert faults.refuse(SimpleNamespace(name="+GMR")) is False
        assert not faults.at_commands
        faults.demand("at_busy", {"count": 1})
        assert faults.at_commands
        faults.close()
        configured = FrontFaults(fake_front({"at_delay": {"rate": 0.0, "ms": 10}}))
        configured.start()
        assert configured.refuse(SimpleNamespace(name="+GMR")) is False and configured.at_commands
        configured.close()
        resolver.set_fault_hook(None)

    asyncio.run(main())
