"""The AT session machine (bridged.at.session): state by state, then random event sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridged.at import format as fmt
from bridged.at.datamode import DataKind
from bridged.at.session import (
    TRANSITIONS,
    Answered,
    Escaped,
    Hold,
    Input,
    PayloadDone,
    Prompt,
    Ready,
    Released,
    Restart,
    Session,
    SessionError,
    Settled,
    State,
    Tick,
    Waits,
    send_result,
)


def _in(state: State) -> Session:
    """A session brought into ``state`` by the events that lead there."""
    session = Session()
    path = {
        State.BOOTING: [],
        State.COMMAND: [Ready()],
        State.BUSY: [Ready(), Waits()],
        State.HOLDING: [Ready(), Hold()],
        State.DATA: [Ready(), Prompt(DataKind.SEND)],
        State.AWAITING_SEND_OK: [Ready(), Prompt(DataKind.SEND, timeout=0.3), PayloadDone(None)],
        State.PASSTHROUGH: [Ready(), Prompt(DataKind.PASSTHROUGH)],
    }[state]
    for event in path:
        session.handle(event, now=1.0)
    assert session.state is state
    return session


def test_booting_drops_input_until_ready():
    """A booting chip hears nothing; ready opens the command state."""
    session = Session()
    assert session.state is State.BOOTING and session.input is Input.DROP and not session.processes
    effects = session.handle(Ready(), now=0.0)
    assert effects.state is State.COMMAND and effects.input is Input.PARSE and effects.out == b""


def test_command_waiting_on_the_network_refuses_input():
    """A command that waits makes the session BUSY (busy p...); its answer brings COMMAND back."""
    session = _in(State.COMMAND)
    assert session.handle(Waits(), 0.0).input is Input.REFUSE
    assert session.handle(Answered(), 0.0).state is State.COMMAND


def test_holding_leaves_input_unread():
    """An after-action pending: input is left in the port until it ran."""
    session = _in(State.HOLDING)
    assert session.input is Input.LEAVE and not session.processes
    assert session.handle(Released(), 0.0).input is Input.PARSE


@pytest.mark.parametrize("kind", [DataKind.SEND, DataKind.SENDEX, DataKind.SENDL])
def test_payload_admitted_at_once_is_send_ok_at_once(kind):
    """A payload the ring admits whole ends the data phase with SEND OK, no waiting state."""
    session = _in(State.COMMAND)
    assert session.handle(Prompt(kind), 0.0).state is State.DATA
    effects = session.handle(PayloadDone(fmt.SEND_OK), 0.1)
    assert (effects.state, effects.out, effects.deadline) == (State.COMMAND, fmt.SEND_OK, None)


def test_payload_waiting_for_room_refuses_input_and_settles_later():
    """Part of the payload waits for ring room: busy p... meanwhile, then SEND OK, and +IPD only after it."""
    session = _in(State.COMMAND)
    session.handle(Prompt(DataKind.SEND), 0.0)
    effects = session.handle(PayloadDone(None), 0.1)
    assert effects.state is State.AWAITING_SEND_OK and effects.input is Input.REFUSE
    assert effects.deadline is None and session.settle_first()
    assert session.handle(Settled(fmt.SEND_OK), 0.2).out == fmt.SEND_OK
    assert not session.settle_first()


def test_so_sndtimeo_fails_a_send_still_waiting_at_its_deadline():
    """so_sndtimeo: the deadline comes with the waiting state; a Tick before it changes nothing, at it SEND FAIL."""
    session = _in(State.COMMAND)
    session.handle(Prompt(DataKind.SEND, timeout=0.3), 1.0)
    assert session.handle(PayloadDone(None), 2.0).deadline == pytest.approx(2.3)
    early = session.handle(Tick(), 2.2)
    assert (early.state, early.out) == (State.AWAITING_SEND_OK, b"")
    due = session.handle(Tick(), 2.3)
    assert (due.state, due.out, due.deadline) == (State.COMMAND, fmt.SEND_FAIL, None)


@pytest.mark.parametrize("kind, out", [(DataKind.SEND, fmt.SEND_CANCELED), (DataKind.SENDEX, fmt.SEND_CANCELED),
                                       (DataKind.SENDL, fmt.SEND_CANCELLED)])
def test_escape_cancels_a_send(kind, out):
    """+++ in a send: SEND Canceled (SEND CANCELLED for CIPSENDL), back to commands."""
    session = _in(State.COMMAND)
    session.handle(Prompt(kind), 0.0)
    assert session.handle(Escaped(), 0.0).out == out


@pytest.mark.parametrize("quitt, out", [(False, b""), (True, fmt.QUITT)])
def test_escape_leaves_passthrough(quitt, out):
    """+++ in passthrough: back to commands, +QUITT only with AT+SYSMSG bit 0."""
    session = _in(State.PASSTHROUGH)
    assert session.input is Input.PARSE and session.in_data
    effects = session.handle(Escaped(quitt), 0.0)
    assert (effects.state, effects.out) == (State.COMMAND, out)


@pytest.mark.parametrize("state", list(State))
def test_restart_from_every_state_boots(state):
    """AT+RST (or a forced restart) is taken in every state and drops the data phase."""
    session = _in(state)
    effects = session.handle(Restart(), 5.0)
    assert (effects.state, effects.deadline, session.kind) == (State.BOOTING, None, None)


@pytest.mark.parametrize("state, event", [(State.BOOTING, Waits()), (State.BUSY, Prompt(DataKind.SEND)),
                                          (State.COMMAND, PayloadDone(None)), (State.HOLDING, Ready()),
                                          (State.PASSTHROUGH, PayloadDone(fmt.SEND_OK)),
                                          (State.DATA, Settled(fmt.SEND_OK)), (State.COMMAND, Escaped())])
def test_unknown_pairs_raise_and_change_nothing(state, event):
    """An event the table has no entry for is the owner's bug: SessionError, the state stays."""
    session = _in(state)
    with pytest.raises(SessionError):
        session.handle(event, 0.0)
    assert session.state is state


def test_send_result_rule():
    """SEND OK once all is admitted; SEND FAIL once the link is gone first; nothing while waiting."""
    assert send_result(complete=False, admitted_all=False, alive=True) is None
    assert send_result(complete=True, admitted_all=True, alive=True) == fmt.SEND_OK
    assert send_result(complete=True, admitted_all=True, alive=False) == fmt.SEND_OK  # lost later: CLOSED
    assert send_result(complete=True, admitted_all=False, alive=True) is None
    assert send_result(complete=True, admitted_all=False, alive=False) == fmt.SEND_FAIL
    assert send_result(complete=True, admitted_all=True, alive=False, dropped=5) == fmt.SEND_FAIL


_EVENTS = st.one_of(
    st.just(Ready()), st.just(Restart()), st.just(Waits()), st.just(Answered()), st.just(Hold()),
    st.just(Released()), st.builds(Prompt, st.sampled_from(list(DataKind)), st.sampled_from([0.0, 0.5])),
    st.builds(PayloadDone, st.sampled_from([None, fmt.SEND_OK, fmt.SEND_FAIL])),
    st.builds(Settled, st.sampled_from([fmt.SEND_OK, fmt.SEND_FAIL])), st.builds(Escaped, st.booleans()),
    st.just(Tick()),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_EVENTS, st.floats(0, 1)), max_size=40))
def test_random_event_sequences(steps):
    """Any sequence: each event is taken as the table says or raises with the state kept; one send
    result per data phase; a deadline only while a send waits; input is dropped only while booting."""
    session = Session()
    now = 0.0
    results = 0
    for event, step in steps:
        now += step
        before = session.state
        if (before, type(event)) not in TRANSITIONS:
            with pytest.raises(SessionError):
                session.handle(event, now)
            assert session.state is before
            continue
        if isinstance(event, Prompt):
            results = 0
        effects = session.handle(event, now)
        assert effects.state is session.state and effects.input is session.input
        if effects.out in (fmt.SEND_OK, fmt.SEND_FAIL):
            results += 1
            assert results == 1 and before in (State.DATA, State.AWAITING_SEND_OK)
        assert (effects.deadline is not None) <= (session.state is State.AWAITING_SEND_OK)
        assert (effects.input is Input.DROP) == (session.state is State.BOOTING)
        assert (session.kind is not None) == session.in_data
