"""Typed session settings and their stored form, without a daemon."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from bridged.commands.context import SessionState
from bridged.commands.options import SslClientConf, SysMsg, TcpOptions, decode_stored, encode_stored
from bridged.store import Store

DEFAULT = TcpOptions()


def test_old_positional_lists_load(tmp_path):
    """A store written before the types (per-link lists, sysmsg an int) loads into typed values."""
    store = Store(tmp_path / "nvs.json")
    store.update({"tcpopts": [[1, 1, 5000, 60], [-1, 0, 0, 0], [0, 0, 0, 7200], [-1, 0, 0, 0], [-1, 0, 0, 0]],
                  "sslconf": [[0, 0, 0], [3, 1, 2], [0, 0, 0], [0, 0, 0], [0, 0, 0]], "sysmsg": 5})
    state = SessionState()
    state.load_persisted(Store(tmp_path / "nvs.json"))
    assert state.tcpopts[0] == TcpOptions(so_linger=1, tcp_nodelay=1, so_sndtimeo=5000, keep_alive=60)
    assert state.tcpopts[2] == TcpOptions(so_linger=0, keep_alive=7200)
    assert state.tcpopts[1] == DEFAULT
    assert state.sslconf[1] == SslClientConf(auth_mode=3, pki_number=1, ca_number=2)
    assert state.sysmsg == SysMsg.QUIT_MESSAGE | SysMsg.PASSTHROUGH_STATUS
    assert SysMsg.LINK_CONN not in state.sysmsg


def test_saved_with_named_fields_and_read_back(tmp_path):
    """persist() writes each link's options as an object with named fields; a new session reads them back."""
    store = Store(tmp_path / "nvs.json")
    state = SessionState()
    state.tcpopts[3] = TcpOptions(so_linger=7, tcp_nodelay=1, so_sndtimeo=250, keep_alive=30)
    state.sslconf[4] = SslClientConf(2, 0, 1)
    state.sysmsg = SysMsg.LINK_CONN
    state.persist(store, "tcpopts", "sslconf", "sysmsg")
    saved = Store(tmp_path / "nvs.json").snapshot()
    assert saved["tcpopts"][3] == {"so_linger": 7, "tcp_nodelay": 1, "so_sndtimeo": 250, "keep_alive": 30}
    assert saved["sslconf"][4] == {"auth_mode": 2, "pki_number": 0, "ca_number": 1}
    assert saved["sysmsg"] == 2
    again = SessionState()
    again.load_persisted(Store(tmp_path / "nvs.json"))
    assert again.tcpopts == state.tcpopts
    assert again.sslconf == state.sslconf
    assert again.sysmsg is SysMsg.LINK_CONN


@pytest.mark.parametrize("entry", [
    [1, 2, 3],                      # too short
    [1, 2, 0, 0],                   # tcp_nodelay out of range
    [-2, 0, 0, 0],                  # so_linger out of range
    [0, True, 0, 0],                # a bool is no integer here
    {"so_linger": 1, "tcp_nodelay": 0, "so_sndtimeo": 0},  # a field missing
    {"so_linger": 1, "tcp_nodelay": 0, "so_sndtimeo": 0, "keep_alive": 0, "x": 1},  # an unknown one
    {"so_linger": 1, "tcp_nodelay": 0, "so_sndtimeo": 0, "keep_alive": "9"},
    "so_linger=1",
])
def test_a_bad_link_entry_keeps_the_default_and_says_so(entry):
    """A hand-edited entry of the wrong shape or range is logged; that link keeps its default, the others load."""
    with capture_logs() as logs:
        links = decode_stored("tcpopts", [entry, [5, 1, 0, 0]])
    assert links[0] == DEFAULT
    assert links[1] == TcpOptions(so_linger=5, tcp_nodelay=1)
    assert links[2:] == [DEFAULT] * 3
    assert [e["event"] for e in logs] == ["store_value_ignored"]
    assert logs[0]["key"] == "tcpopts" and logs[0]["link_id"] == 0


@pytest.mark.parametrize("key, stored", [("tcpopts", {"0": [1, 0, 0, 0]}), ("sslconf", 3), ("sysmsg", 8),
                                         ("sysmsg", "1"), ("sysmsg", -1)])
def test_a_value_of_the_wrong_kind_is_ignored(key, stored):
    """Not a per-link list, or a SYSMSG out of 0..7: the session keeps its default and the log says which key."""
    with capture_logs() as logs:
        assert decode_stored(key, stored) is None
    assert logs == [{"event": "store_value_ignored", "key": key, "log_level": "warning",
                     "reason": logs[0]["reason"]}]


def test_untyped_keys_pass_through():
    """Keys without a type (cwmode, wifi_ssid ...) are stored and loaded as they are."""
    assert decode_stored("cwmode", 3) == 3
    assert encode_stored("ssid") == "ssid"
    assert encode_stored([1, 2]) == [1, 2]


def test_sysmsg_bits_are_the_spec_bits():
    """Bit 0 +QUITT, bit 1 +LINK_CONN, bit 2 status messages in passthrough (esp-at-behavior.md 1.9)."""
    assert (SysMsg.QUIT_MESSAGE, SysMsg.LINK_CONN, SysMsg.PASSTHROUGH_STATUS) == (1, 2, 4)
    assert int(SysMsg(7)) == 7 and str(int(SysMsg(6))) == "6"
