"""A link slot of the front on real rings: where it starts and what its passive cursor reads."""

from __future__ import annotations

from bridged.ipc.messages import SetOptions
from bridged.ipc.records import DATA, put_record
from bridged.uart.slots import Slot, SlotState
from tests.ringtools import new_ring


def test_a_new_slot_waits_for_its_worker_with_default_options():
    """A slot starts with no worker, no connection and AT+CIPTCPOPT's defaults."""
    with new_ring(4096, "up") as up, new_ring(4096, "down") as down:
        slot = Slot(2, up, down)
        assert slot.state is SlotState.NO_WORKER
        assert (slot.control, slot.conn_id, slot.view) == (None, None, None)
        assert slot.options == SetOptions(linger=-1, nodelay=0, keep_alive=0)
        assert not (slot.passive or slot.silent or slot.unannounced or slot.ended)


def test_the_passive_cursor_reads_the_slots_own_downlink():
    """Slot.rx counts and reads the records of its downlink ring, not of the uplink."""
    with new_ring(4096, "up") as up, new_ring(4096, "down") as down:
        slot = Slot(0, up, down)
        assert put_record(up, DATA, b"to the network")
        assert put_record(down, DATA, b"from the peer")
        assert slot.rx.count() and slot.rx.total == len(b"from the peer")
        assert slot.rx.read(100, one_datagram=True) == b"from the peer"
        assert up.available() > 0  # untouched


def test_two_slots_do_not_share_state():
    """Mutable fields are per slot (a dataclass default shared between slots would leak)."""
    with new_ring(4096) as a_up, new_ring(4096) as a_down, new_ring(4096) as b_up, new_ring(4096) as b_down:
        a, b = Slot(0, a_up, a_down), Slot(1, b_up, b_down)
        a.rx.total = 5
        a.rx.notice.want(5)
        assert b.rx.total == 0 and b.rx.notice.want(1) is not None
        assert a.rx is not b.rx
