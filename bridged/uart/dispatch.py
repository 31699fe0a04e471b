"""The UART front's command dispatch (a part of ``Front``).

Theory of operation.  ``_process`` takes the parser's events while the
session takes input (``Session.processes``): command lines are echoed
(ATE1), dispatched to their handler and answered through ``Output``; a
handler that returns a coroutine makes the session BUSY until its answer; an
answer's after-action (a baud change, a restart) holds input until the
output drained (HOLDING).  Commands also wait while the UART output is
backlogged (ESP-AT's AT task blocks on a full UART): the read gate is held.

A flood of commands is handled ``_PASS_SHARE`` at a time: the rest of the
read waits in the parser for the event loop's next pass (``call_soon``), the
port unread meanwhile, so the supervisor's heartbeat, ``bridged status``,
the +++ guard timer and the links' messages are never far behind.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import Awaitable

import structlog

from bridged.at import format as fmt
from bridged.at.errors import AtError
from bridged.at.parser import NEED_DATA, BadLine, CommandLine, LineTooLong
from bridged.at.session import Answered, Hold, Released, State, Waits
from bridged.commands import registry
from bridged.commands.registry import Reply
from bridged.commands.recv import quick_recv
from bridged.commands.send import quick_send
from bridged.uart.transcript import MarkKind

__all__ = ["COMMAND_NAME", "CommandDispatch"]

log = structlog.get_logger()

_BACKLOG = "output backlog"  # read-gate holds: the UART output is above its high-water mark
_AFTER = "after-action"  # ... an answer's after-action waits for the output to drain
_SHARE = "command share"  # ... a pause: the last read's commands wait for the loop's next pass

# Command lines handled in one go before the rest waits for the loop's next pass.  A flood
# (a 4 KiB read holds ~1,000 short commands) was handled whole: 6-16 ms of CPU per read,
# 65 ms seen on a loaded machine, while the supervisor's heartbeat, `bridged status`, the +++
# guard timer, output draining and the link workers' messages waited.  64 short commands
# are ~0.4 ms of the front's CPU (AT, echoed: ~6 us each, measured) to ~1.4 ms (a bad line,
# logged: ~21 us), 2-5 ms on a loaded machine: the loop comes round within that.  A pass
# costs ~4 us (a loop iteration, a call_soon, two epoll_ctl): ~1% of the cheapest share;
# a smaller share would cost more, for little.  Only command lines count: a data phase's
# payload moves in chunks of at most one read.
_PASS_SHARE = 64
# ... or fewer, once a share has taken this long: a command that writes the settings store
# (AT+CWAUTOCONN, AT+SAVETRANSLINK, ..._DEF) fsyncs twice on the loop, which on a Pi's SD
# card can take tens of ms, so 64 of them could hold the loop for seconds.  A budget far
# over a share of quick commands, so a front preempted on a loaded machine (for a few ms)
# still ends its shares by count.
_PASS_TIME = 0.020


def _command_var() -> contextvars.ContextVar:
    """The ContextVar structlog keeps the bound ``command`` in (bind_contextvars' own,
    through its public token): set straight, it costs one C call per command line."""
    token = structlog.contextvars.bind_contextvars(command=None)["command"]
    token.var.reset(token)  # nothing stays bound in the importing context
    return token.var


COMMAND_NAME = _command_var()  # the log lines' bound ``command`` (uart.direct sets it too)


def forget_command() -> None:
    """No command is running from here on in this context (a restart: the new session's boot
    task and reader are made from it, and must not log as the command that restarted it)."""
    COMMAND_NAME.set(None)


class CommandDispatch:
    """Command lines to handlers and answers; a part of ``bridged.uart.front.Front``."""

    _next_pass: asyncio.Handle | None = None  # the rest of a flood's commands, on the loop's next pass

    def _process(self) -> None:
        """Handle parser events until it needs data, the session is busy, or this go's
        share of command lines (``_PASS_SHARE``, ``_PASS_TIME``) is handled: the rest waits a loop pass."""
        handled, began = 0, time.monotonic()
        while self.session.processes:
            if self.parser.in_data_mode:
                if not self._process_data():
                    break
                continue
            if self.output.backlogged and self._backlogged():
                break  # the rest waits in the parser: at most one read
            if handled and (handled == _PASS_SHARE or time.monotonic() - began >= _PASS_TIME):
                self._pass_on()
                break
            event = self.parser.next_event()
            if event is NEED_DATA:
                break
            handled += 1
            self._handle_line(event)
        if handled > self.counters.max_command_batch:
            self.counters.max_command_batch = handled  # `bridged status` (bridged.ops.status)

    def _pass_on(self) -> None:
        """The rest of the commands wait for the loop's next pass; no input is read meanwhile
        (it would queue behind them): the gate pauses (RTS stays up), reopened once they are
        handled, or as soon as they wait on something else (a busy command, the output)."""
        if self._next_pass is None:
            self._gate.hold(_SHARE, press=False)
            self._next_pass = self.loop.call_soon(self._next_share)

    def _next_share(self) -> None:
        self._next_pass = None
        if self._stopped.done():
            return  # the front is closing: its output too
        try:
            self._process()
        finally:
            # Even past a bug of ours that raised in there: from the port's read callback it
            # cost a log line, the next read going on; here the hold would keep the port
            # unread for good, the heartbeat still answered (no restart would come).
            if self._next_pass is None:
                self._gate.release(_SHARE)

    def _handle_line(self, event: CommandLine | BadLine | LineTooLong) -> None:
        """One command-mode event: echoed, executed or refused, answered."""
        if isinstance(event, CommandLine):
            if self.faults.at_commands and self.faults.refuse(event):
                return  # at_busy: answered busy p..., dropped
            self._echo(event.raw)
            try:
                self._execute(event)
            except Exception:
                # Our bug, not the host's (as in `_await_reply`): answer ERROR so the
                # MCU never waits for an answer that cannot come.
                log.exception("command_crashed")
                self._error(AtError("internal error"))
        elif isinstance(event, BadLine):
            self._echo(event.raw)
            COMMAND_NAME.set(event.name)
            self._log_error("bad_line", event.name, event.error)
            self._error(event.error)
        elif isinstance(event, LineTooLong):
            log.info("line_too_long", length=event.length, limit=self.config.uart.max_line)
            self._error(AtError(f"command line longer than {self.config.uart.max_line} bytes"))

    def _echo(self, raw: bytes) -> None:
        if self.ctx.state.echo:
            self.output.reply(raw)

    def _error(self, error: AtError) -> None:
        if error.body:
            self.output.reply(error.body)
        if self.ctx.state.syslog:
            self.output.reply(fmt.err_code(error.code))
        self.output.reply(fmt.ERROR)

    def _execute(self, line: CommandLine) -> None:
        COMMAND_NAME.set(line.name)  # structlog.contextvars.bind_contextvars(command=...)
        if self.tap is not None:
            self.tap.mark(MarkKind.COMMAND, name="AT" + line.name, kind=line.kind.name.lower())
        if not self.faults.at_commands:
            # A send line this session prompted before, every check passing the same way:
            # the prompt without the registry's walk (its answer would be the same).
            quick = quick_send(self.ctx, line.raw)
            if quick is not None:
                self._start_send(quick[0])
                self.output.reply_now(fmt.PROMPT)  # (as queued before the send started: it queues nothing)
                return
            read = quick_recv(self.ctx, line)  # the same for a read line (passive mode)
            if read is not None:
                self._answer(read)
                return
        try:
            result = self.faults.dispatch(self.ctx, line)  # the registry's, unless a fault says
        except AtError as error:
            self._log_error("command_error", line.name, error)
            self._error(error)
            return
        if isinstance(result, Reply):
            self._answer(result)
            return
        self.session.handle(Waits(), self.loop.time())
        if self.parser.buffered:
            self._refuse_busy(self.parser.discard_pending())
            if self.session.state is State.BOOTING:  # an AT+RST behind it forced a restart: the command goes too
                if asyncio.iscoroutine(result):
                    result.close()
                return
        self._command = self.tasks.spawn(self._await_reply(result, line.name))

    @staticmethod
    def _log_error(event: str, name: str, error: AtError) -> None:
        """Why a line failed; the offending parameter only if it cannot be a secret."""
        if error.value and not registry.carries_secret(name):
            log.info(event, why=error.why, value=error.value)
        else:
            log.info(event, why=error.why)

    async def _await_reply(self, pending: Awaitable[Reply], name: str) -> None:
        try:
            reply = await pending
        except asyncio.CancelledError:
            self.links.announced()  # a forced restart: no CONNECT will come
            raise
        except AtError as error:
            self._log_error("command_error", name, error)
            self._error(error)
            reply = None
        except Exception:
            # Our bug, not the host's: answer ERROR so the MCU never hangs.
            log.exception("command_crashed")
            self._error(AtError("internal error"))
            reply = None
        self._command = None
        self.session.handle(Answered(), self.loop.time())
        if reply is not None:
            self._answer(reply)
        self.links.announced()  # an AT+CIPSTART's CONNECT is out: its data may follow
        self._process()

    def _answer(self, reply: Reply) -> None:
        if reply.body:
            self.output.reply(reply.body)
        self.output.reply(reply.final)
        if reply.then is not None:
            reply.then()
        if reply.send is not None:
            self._start_send(reply.send)
        if reply.after is not None:
            # Input that comes meanwhile is held (not read), not refused: the action
            # is immediate, only ordered after the answer (a baud change, a restart).
            self.session.handle(Hold(), self.loop.time())
            self._gate.hold(_AFTER)
            self._hold_off()
            ctx = self.ctx
            self.output.when_empty(lambda: self._run_after(reply.after, ctx))

    def _run_after(self, action, ctx) -> None:
        """The answer is out: run its after-action, unless the chip restarted meanwhile (an
        at_reset fault: a restart makes a new session, ``ctx``): the restarted chip never
        ran it (no baud change after the boot, no second restart)."""
        if self.session.state is State.HOLDING:
            self.session.handle(Released(), self.loop.time())
        self._gate.release(_AFTER)
        if ctx is self.ctx:
            action()
        else:
            log.info("after_action_dropped", why="the chip restarted before the answer was out")
        self._resume_reading()
        self._process()

    def _backlogged(self) -> bool:
        """Hold commands while the output is backlogged; a data phase goes on."""
        if self.output.backlogged and not self.parser.in_data_mode:
            self._gate.hold(_BACKLOG)
            self._hold_off()
            return True
        return False

    def _on_output_eased(self) -> None:
        self._gate.release(_BACKLOG)
        self._process()
