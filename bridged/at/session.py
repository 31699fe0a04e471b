"""The AT session as a state machine, in the manner of h11's ``_state.py``.  Sans I/O.

Theory of operation.  The session is in exactly one of these states::

    BOOTING           the chip (re)boots: input is dropped, nothing is said
    COMMAND           command lines are read and answered
    BUSY              a command waits on the network: input gets "busy p..."
    HOLDING           an answer's after-action waits for the output to drain:
                      input is left unread (the tty buffer fills, RTS drops)
    DATA              after ">" of AT+CIPSEND / CIPSENDEX / CIPSENDL: payload
    AWAITING_SEND_OK  the payload is complete; part of it waits for ring room
    PASSTHROUGH       AT+CIPSEND in CIPMODE=1: payload until "+++"

Events move it along ``TRANSITIONS``; a (state, event) pair missing from the
table is a bug of the caller and raises ``SessionError`` (the state is left
as it was).  ``handle`` takes the event and ``now`` and returns ``Effects``:
what to write to the UART, what to do with input from now on, and the next
deadline the owner must call ``handle(Tick(), now)`` at.  The owner (the UART
front) does the I/O: it reads and writes the port, runs command handlers and
puts payload into the link's uplink ring.

One rule for SEND OK, SEND FAIL and +IPD (``send_result``, ``settle_first``):
a send is over once its whole payload is admitted into the link's uplink ring
(SEND OK), or once its link is gone before that (SEND FAIL); whatever the
link receives is written after that result (the peer's answer to a send
never precedes its SEND OK).  AT+CIPTCPOPT's so_sndtimeo bounds the wait for
room: the send fails at the deadline.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bridged.at import format as fmt
from bridged.at.datamode import DataKind

__all__ = [
    "State", "Input", "Effects", "Session", "SessionError", "TRANSITIONS", "send_result",
    "Ready", "Restart", "Waits", "Answered", "Hold", "Released", "Prompt", "PayloadDone",
    "Settled", "Escaped", "Tick", "prompt_event",
]


class State(enum.Enum):
    BOOTING = enum.auto()
    COMMAND = enum.auto()
    BUSY = enum.auto()
    HOLDING = enum.auto()
    DATA = enum.auto()
    AWAITING_SEND_OK = enum.auto()
    PASSTHROUGH = enum.auto()

    # Members are singletons: hashing by identity is the C slot, not Enum's
    # Python-level hash of the name (a key of every event's lookup).
    __hash__ = object.__hash__


class Input(enum.Enum):
    """What the owner does with bytes from the UART in a state."""

    DROP = enum.auto()  # read and forget (a booting chip hears nothing)
    PARSE = enum.auto()  # read into the parser
    REFUSE = enum.auto()  # read, answer "busy p..." (an AT+RST among them still restarts)
    LEAVE = enum.auto()  # do not read: the port holds them

    __hash__ = object.__hash__  # as State's


INPUT = {
    State.BOOTING: Input.DROP,
    State.COMMAND: Input.PARSE,
    State.BUSY: Input.REFUSE,
    State.HOLDING: Input.LEAVE,
    State.DATA: Input.PARSE,
    State.AWAITING_SEND_OK: Input.REFUSE,
    State.PASSTHROUGH: Input.PARSE,
}


class SessionError(RuntimeError):
    """An event the session cannot take in its state: a bug of the owner."""


# -- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The boot is over (``ready`` was written)."""


@dataclass(frozen=True, slots=True)
class Restart:
    """AT+RST, AT+RESTORE, a forced restart: the session starts over."""


@dataclass(frozen=True, slots=True)
class Waits:
    """The command's handler waits on the network."""


@dataclass(frozen=True, slots=True)
class Answered:
    """The waiting command has its answer (written by the owner)."""


@dataclass(frozen=True, slots=True)
class Hold:
    """The answer's after-action waits for the output to drain."""


@dataclass(frozen=True, slots=True)
class Released:
    """The after-action ran."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """``>`` went out: a data phase of ``kind`` begins (``timeout``: so_sndtimeo, s, 0 none)."""

    kind: DataKind
    timeout: float = 0.0


_PROMPTS: dict[tuple[DataKind, float], Prompt] = {}  # (kind, so_sndtimeo s): cleared at 64


def prompt_event(kind: DataKind, timeout: float) -> Prompt:
    """``Prompt(kind, timeout)``, made once (a frozen dataclass costs a call per field:
    a prompt comes with every send)."""
    event = _PROMPTS.get((kind, timeout))
    if event is None:
        if len(_PROMPTS) >= 64:
            _PROMPTS.clear()
        event = _PROMPTS[(kind, timeout)] = Prompt(kind, timeout)
    return event


@dataclass(frozen=True, slots=True)
class PayloadDone:
    """Every byte of a finite data phase arrived; ``result`` is send_result() now."""

    result: bytes | None = None


@dataclass(frozen=True, slots=True)
class Settled:
    """A send waiting for room got its result (send_result(): SEND OK or SEND FAIL)."""

    result: bytes


@dataclass(frozen=True, slots=True)
class Escaped:
    """``+++`` ended the data phase (``quitt``: AT+SYSMSG bit 0, +QUITT on leaving passthrough)."""

    quitt: bool = False


@dataclass(frozen=True, slots=True)
class Tick:
    """The deadline Effects named has come."""


Event = Ready | Restart | Waits | Answered | Hold | Released | Prompt | PayloadDone | Settled | Escaped | Tick

_ANY = tuple(State)
_MISSING = object()

# (state, event type) -> next state; Prompt, PayloadDone and Tick have their own choices.
TRANSITIONS: dict[tuple[State, type], State | None] = {
    **{(state, Restart): State.BOOTING for state in _ANY},
    (State.BOOTING, Ready): State.COMMAND,
    (State.COMMAND, Waits): State.BUSY,
    (State.BUSY, Answered): State.COMMAND,
    (State.COMMAND, Hold): State.HOLDING,
    (State.HOLDING, Released): State.COMMAND,
    (State.COMMAND, Prompt): None,  # DATA, or PASSTHROUGH for that kind
    (State.DATA, PayloadDone): None,  # COMMAND with its result, or AWAITING_SEND_OK
    (State.DATA, Escaped): State.COMMAND,
    (State.PASSTHROUGH, Escaped): State.COMMAND,
    (State.AWAITING_SEND_OK, Settled): State.COMMAND,
    (State.AWAITING_SEND_OK, Tick): None,  # so_sndtimeo: COMMAND with SEND FAIL when due
    **{(state, Tick): state for state in _ANY if state is not State.AWAITING_SEND_OK},
}


def send_result(complete: bool, admitted_all: bool, alive: bool, dropped: int = 0) -> bytes | None:
    """SEND OK once the whole payload is in the ring, SEND FAIL once its link is gone first.

    ``dropped``: bytes a streaming send (AT+CIPSENDL) had to drop while its link was down.
    """
    if not complete:
        return None
    if admitted_all and not dropped:
        return fmt.SEND_OK
    if not alive or dropped:
        return fmt.SEND_FAIL
    return None


@dataclass(frozen=True, slots=True)
class Effects:
    """What the owner does after an event, in this order."""

    state: State
    out: bytes = b""  # for the UART, as one reply
    input: Input = Input.PARSE  # what to do with UART input from now on
    deadline: float | None = None  # call handle(Tick(), now) then


_PROCESSING = frozenset({State.COMMAND, State.DATA, State.PASSTHROUGH})
_QUIET = {state: Effects(state, b"", INPUT[state], None) for state in State}  # nothing to do but move
# Effects with something to say and no deadline, made once each: the messages are
# format's few constants (SEND OK, SEND FAIL, SEND CANCELED ...), so this stays small.
_SAYING: dict[tuple[State, bytes], Effects] = {}


class Session:
    def __init__(self) -> None:
        self.kind: DataKind | None = None  # of the data phase (DATA, AWAITING_SEND_OK, PASSTHROUGH)
        self._timeout = 0.0
        self.deadline: float | None = None
        self._enter(State.BOOTING)

    def _enter(self, state: State) -> None:
        # Plain attributes, not properties: the owner reads them on every read and event.
        self.state = state
        self.input = INPUT[state]  # what to do with UART input now
        self.processes = state in _PROCESSING  # the owner takes events from its parser (commands, payload)

    @property
    def in_data(self) -> bool:
        return self.state in (State.DATA, State.AWAITING_SEND_OK, State.PASSTHROUGH)

    def settle_first(self) -> bool:
        """Before writing what a link received: is a complete send to be settled first?"""
        return self.state is State.AWAITING_SEND_OK

    def handle(self, event: Event, now: float) -> Effects:
        cls = type(event)  # the events are final: their type says which they are
        nxt = TRANSITIONS.get((self.state, cls), _MISSING)
        if nxt is _MISSING:
            raise SessionError(f"{cls.__name__} in {self.state.name}")
        out = b""
        if cls is Prompt:
            nxt = State.PASSTHROUGH if event.kind is DataKind.PASSTHROUGH else State.DATA
            self.kind, self._timeout = event.kind, event.timeout
        elif cls is PayloadDone:
            nxt, out = self._payload_done(event, now)
        elif cls is Settled or cls is Escaped or cls is Tick:
            nxt, out = self._ending(event, now, nxt)
        if nxt is State.BOOTING or nxt is State.COMMAND:
            self.kind, self.deadline = None, None
        if nxt is not self.state:
            self._enter(nxt)
        if self.deadline is None:
            if not out:
                return _QUIET[nxt]  # the usual answer, made once (a frozen dataclass costs a call per field)
            effects = _SAYING.get((nxt, out))
            if effects is None:
                effects = _SAYING[(nxt, out)] = Effects(nxt, out, INPUT[nxt], None)
            return effects
        return Effects(nxt, out, INPUT[nxt], self.deadline)

    def _payload_done(self, event: PayloadDone, now: float) -> tuple[State, bytes]:
        if event.result is not None:
            return State.COMMAND, event.result
        if self._timeout:
            self.deadline = now + self._timeout
        return State.AWAITING_SEND_OK, b""

    def _ending(self, event: Settled | Escaped | Tick, now: float, nxt: State | None) -> tuple[State, bytes]:
        if isinstance(event, Settled):
            return State.COMMAND, event.result
        if isinstance(event, Escaped):
            if self.kind is DataKind.PASSTHROUGH:
                return State.COMMAND, fmt.QUITT if event.quitt else b""
            return State.COMMAND, fmt.SEND_CANCELLED if self.kind is DataKind.SENDL else fmt.SEND_CANCELED
        if nxt is None:  # a Tick while AWAITING_SEND_OK
            if self.deadline is not None and now >= self.deadline:
                return State.COMMAND, fmt.SEND_FAIL
            return State.AWAITING_SEND_OK, b""
        return nxt, b""
