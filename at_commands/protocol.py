"""Sans-IO AT command protocol core (bytes in, events out), in the style of h11/wsproto.

The caller owns the I/O. It asks the connection what to write (``send_command``), feeds
whatever it read (``receive_data``) and pulls events (``next_event``) until it gets
``NEED_DATA``. The connection never blocks, never sleeps and never touches a file.

Framing: any CR or LF ends a line, so ``\\r\\n``, ``\\r\\r\\n``, bare ``\\n`` and the bare
``\\r`` that ends an echoed command all frame the same way; empty lines are skipped. NUL
bytes and leading junk (anything outside printable ASCII) are stripped from each line.
A line longer than ``max_line`` bytes is dropped while it streams in (the buffer never
holds more than ``max_line`` bytes of one line) and reported once it ends.

Giving up: after ``command_timed_out()`` (the caller timed out *or* was cancelled, at
any point after the command or probe was sent) the reply of the abandoned command may
still be on its way. The connection then discards every non-URC line until the caller
sends ``send_probe()`` and the probe's marker line and final result have both come back.
The modem answers commands in order, so anything before that marker belongs to the old
command and is never handed to the next one. URCs keep flowing while resynchronising.

Probes are distinguishable: each ``send_probe()`` reads the next of V.250's mandatory
S-registers whose defaults are fixed (``ATS3?`` -> ``013`` command-line terminator,
``ATS4?`` -> ``010`` response formatting character, ``ATS5?`` -> ``008`` command-line
editing character), so a new probe may be sent while an older one is unanswered
(PROBING / PROBE_ANSWERED) and the older probe's late answer is stale, never the marker.

Abort: V.250 ("aborting commands") lets the DTE abort a command that is still executing by sending any
character; 27.007 lists ``+COPS=?`` as abortable. ``abort()`` (AWAITING -> ABORTING)
returns that byte; the aborted command's final result, whatever it is, then ends it as an
``Aborted`` event (ABORTING -> IDLE). If none comes the caller gives up as on a timeout
(ABORTING -> DESYNC) and resynchronises.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Pattern, Union

from . import profiles
from .parsers import registration_is_unsolicited

__all__ = [
    "NEED_DATA", "Line", "FinalResult", "ResultKind", "Urc", "Prompt", "Discarded",
    "Resynchronised", "Aborted", "Event", "Connection", "State", "Input", "LocalProtocolError",
    "PROBES", "PROBE_COMMAND", "ABORT_BYTE", "URC_PREFIXES",
]


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class ResultKind(str, enum.Enum):
    OK = "ok"
    ERROR = "error"
    CME_ERROR = "cme_error"
    CMS_ERROR = "cms_error"
    NOT_SUPPORTED = "not_supported"
    NO_CARRIER = "no_carrier"


@dataclass(frozen=True)
class Line:
    """An intermediate response line of the pending command."""

    text: str


@dataclass(frozen=True)
class FinalResult:
    kind: ResultKind
    code: int | None = None  # numeric +CME/+CMS code (with +CMEE=1)
    text: str = ""  # the raw final line, or the verbose error text (with +CMEE=2)

    @property
    def ok(self) -> bool:
        return self.kind is ResultKind.OK

    @property
    def line(self) -> str:
        """The final result as the module printed it (a +CME/+CMS error re-assembled)."""
        if self.kind is ResultKind.CME_ERROR:
            return f"+CME ERROR: {self.text}"
        if self.kind is ResultKind.CMS_ERROR:
            return f"+CMS ERROR: {self.text}"
        return self.text


@dataclass(frozen=True)
class Urc:
    line: str


@dataclass(frozen=True)
class Prompt:
    """The ``> `` prompt of a command that takes a payload (e.g. +CMGS)."""


@dataclass(frozen=True)
class Discarded:
    """Input that was dropped: ``overlong`` (length in bytes), ``stale`` (part of a
    timed-out reply), ``stray`` (a final result with no command pending). ``final`` is
    the dropped line's final result, if it was one: an error final while probing may be
    the probe's own answer (a busy module), which tells the caller the module is alive."""

    reason: str
    text: str = ""
    length: int = 0
    final: FinalResult | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Resynchronised:
    """The probe came back: the line is in step again, the next command may be sent."""


@dataclass(frozen=True)
class Aborted:
    """The final result that ended an aborted command (whatever it says)."""

    final: FinalResult


Event = Union[Line, FinalResult, Urc, Prompt, Discarded, Resynchronised, Aborted]


class LocalProtocolError(RuntimeError):
    """The caller used the connection in a way its state does not allow."""


class State(enum.Enum):
    IDLE = "idle"  # no command pending
    AWAITING = "awaiting"  # a command was sent, its final result has not come
    ABORTING = "aborting"  # the abort byte was sent; the command's final result has not come
    DESYNC = "desync"  # the caller gave up on a command or probe; no new probe sent yet
    PROBING = "probing"  # probe sent, its marker line has not come
    PROBE_ANSWERED = "probe-answered"  # marker seen, waiting for the probe's final result


class Input(enum.Enum):
    # Caller actions
    SEND = "send"
    TIMEOUT = "timeout"  # the caller gave up: timed out or cancelled
    PROBE = "probe"
    ABORT = "abort"
    RESTART = "restart"  # the module restarted: nothing sent before it can still be answered
    # Line classes
    ECHO = "echo"
    URC = "urc"
    FINAL = "final"
    MARKER = "marker"  # the current probe's answer (an older probe's answer is TEXT)
    TEXT = "text"


class Action(enum.Enum):
    START = "start"  # -> AWAITING
    START_PROBE = "start-probe"  # -> PROBING
    DESYNC = "desync"  # -> DESYNC
    EMIT_URC = "emit-urc"
    EMIT_LINE = "emit-line"
    FINISH = "finish"  # emit the final result -> IDLE
    START_ABORT = "start-abort"  # -> ABORTING
    FINISH_ABORTED = "finish-aborted"  # emit Aborted(final) -> IDLE
    DROP = "drop"  # silently (echo)
    DISCARD_STALE = "discard-stale"
    DISCARD_STRAY = "discard-stray"
    MARK = "mark"  # -> PROBE_ANSWERED
    RESYNCED = "resynced"  # emit Resynchronised -> IDLE
    RESET = "reset"  # forget the pending command or probe -> IDLE
    REFUSE = "refuse"  # LocalProtocolError


S, I, A = State, Input, Action

# The one table of state rules. A missing (state, input) pair is a bug, so every pair
# is listed; tests check the table is complete.
TRANSITIONS: dict[tuple[State, Input], Action] = {
    (S.IDLE, I.SEND): A.START,
    (S.IDLE, I.RESTART): A.RESET,
    (S.IDLE, I.TIMEOUT): A.REFUSE,
    (S.IDLE, I.PROBE): A.REFUSE,
    (S.IDLE, I.ABORT): A.REFUSE,  # nothing to abort: the shell checks before writing
    (S.IDLE, I.ECHO): A.EMIT_URC,  # unreachable: echo needs a pending command
    (S.IDLE, I.URC): A.EMIT_URC,
    (S.IDLE, I.TEXT): A.EMIT_URC,  # with nothing pending every line is unsolicited
    (S.IDLE, I.MARKER): A.EMIT_URC,  # unreachable: a marker needs a pending probe
    (S.IDLE, I.FINAL): A.DISCARD_STRAY,

    (S.AWAITING, I.SEND): A.REFUSE,
    (S.AWAITING, I.RESTART): A.RESET,
    (S.AWAITING, I.TIMEOUT): A.DESYNC,
    (S.AWAITING, I.PROBE): A.REFUSE,
    (S.AWAITING, I.ABORT): A.START_ABORT,
    (S.AWAITING, I.ECHO): A.DROP,
    (S.AWAITING, I.URC): A.EMIT_URC,
    (S.AWAITING, I.TEXT): A.EMIT_LINE,
    (S.AWAITING, I.MARKER): A.EMIT_LINE,  # unreachable: a marker needs a pending probe
    (S.AWAITING, I.FINAL): A.FINISH,

    (S.ABORTING, I.SEND): A.REFUSE,
    (S.ABORTING, I.RESTART): A.RESET,
    (S.ABORTING, I.TIMEOUT): A.DESYNC,  # no final result within the grace: resynchronise
    (S.ABORTING, I.PROBE): A.REFUSE,
    (S.ABORTING, I.ABORT): A.REFUSE,  # one abort byte per command
    (S.ABORTING, I.ECHO): A.DROP,
    (S.ABORTING, I.URC): A.EMIT_URC,
    (S.ABORTING, I.TEXT): A.EMIT_LINE,  # what the command printed before it stopped
    (S.ABORTING, I.MARKER): A.EMIT_LINE,  # unreachable: a marker needs a pending probe
    (S.ABORTING, I.FINAL): A.FINISH_ABORTED,

    (S.DESYNC, I.SEND): A.REFUSE,
    (S.DESYNC, I.RESTART): A.RESET,
    (S.DESYNC, I.TIMEOUT): A.DESYNC,
    (S.DESYNC, I.PROBE): A.START_PROBE,
    (S.DESYNC, I.ABORT): A.REFUSE,
    (S.DESYNC, I.ECHO): A.DISCARD_STALE,
    (S.DESYNC, I.URC): A.EMIT_URC,
    (S.DESYNC, I.TEXT): A.DISCARD_STALE,
    (S.DESYNC, I.MARKER): A.DISCARD_STALE,  # the answer of a probe given up on
    (S.DESYNC, I.FINAL): A.DISCARD_STALE,

    (S.PROBING, I.SEND): A.REFUSE,
    (S.PROBING, I.RESTART): A.RESET,
    (S.PROBING, I.TIMEOUT): A.DESYNC,
    (S.PROBING, I.PROBE): A.START_PROBE,  # a new, distinguishable probe
    (S.PROBING, I.ABORT): A.REFUSE,
    (S.PROBING, I.ECHO): A.DISCARD_STALE,
    (S.PROBING, I.URC): A.EMIT_URC,
    (S.PROBING, I.TEXT): A.DISCARD_STALE,  # the old command's lines, or an old probe's
    (S.PROBING, I.MARKER): A.MARK,
    (S.PROBING, I.FINAL): A.DISCARD_STALE,  # the old command's (or an old probe's) final result

    (S.PROBE_ANSWERED, I.SEND): A.REFUSE,
    (S.PROBE_ANSWERED, I.RESTART): A.RESET,
    (S.PROBE_ANSWERED, I.TIMEOUT): A.DESYNC,
    (S.PROBE_ANSWERED, I.PROBE): A.START_PROBE,
    (S.PROBE_ANSWERED, I.ABORT): A.REFUSE,
    (S.PROBE_ANSWERED, I.ECHO): A.DISCARD_STALE,
    (S.PROBE_ANSWERED, I.URC): A.EMIT_URC,
    (S.PROBE_ANSWERED, I.TEXT): A.DISCARD_STALE,
    (S.PROBE_ANSWERED, I.MARKER): A.DISCARD_STALE,  # unreachable: the modem answers once
    (S.PROBE_ANSWERED, I.FINAL): A.RESYNCED,
}

# V.250 mandatory S-registers with fixed defaults: (probe command, its answer). The
# parameter is read, never written, so a probe changes nothing on the module.
PROBES: tuple[tuple[str, "re.Pattern[str]"], ...] = (
    ("ATS3?", re.compile(r"0*13")),  # command-line termination character (CR)
    ("ATS4?", re.compile(r"0*10")),  # response formatting character (LF)
    ("ATS5?", re.compile(r"0*8")),  # command-line editing character (BS)
)
PROBE_COMMAND = PROBES[0][0]  # the first probe of a session
# The abort byte is a bare CR (S3). Any character aborts an abortable command (V.250,
# aborting commands); CR is the one that is harmless if the command has finished before
# it arrives: it ends an empty command line, which the DCE ignores (no "AT" prefix; V.250
# ignores characters before the prefix), and unlike a printable byte it cannot become
# part of the next command line (a stray "A" then "/..." would be A/, repeat last line).
ABORT_BYTE = b"\r"


# Lines that are unsolicited whatever is pending, unless the pending command queries
# the same tag (then the line is its answer). Bare words are matched whole.
# 27.007 / 27.005 / V.250 unsolicited result codes: lines starting with these are URCs
# (unless the pending command asked for that tag). Vendors' URCs are data in
# ``profiles`` (``profiles.known_urc_patterns``), which every Connection also applies.
URC_PREFIXES: tuple[str, ...] = (
    "+CREG:", "+CGREG:", "+CEREG:", "+C5GREG:", "+CTZE:", "+CTZEU:", "+CTZV:", "+CTZU:", "+CTZDST:",
    "+CPIN:", "+CFUN:", "+CMTI:", "+CMT:", "+CDS:", "+CBM:", "+CUSD:", "+CRING:", "+CLIP:", "+CIEV:",
    "+CGEV:", "+CSCON:",
)
_URC_WORDS = frozenset({"RING"})
# Registration URCs are recognised by shape even while +CREG? etc. is pending:
# solicited answers start with <n>, unsolicited ones do not (see parsers).
_REGISTRATION_TAGS = ("+CREG:", "+CGREG:", "+CEREG:", "+C5GREG:")

_TAG_RE = re.compile(r"^([+^#$*%][A-Z0-9_]+)")
_EOL_RE = re.compile(rb"[\r\n]")
_EOL_SPLIT = re.compile(rb"[\r\n]+")
_JUNK = bytes(b for b in range(256) if not 0x21 <= b <= 0x7E)


def _classify_final(text: str) -> FinalResult | None:
    if text == "OK":
        return FinalResult(ResultKind.OK, None, text)
    if text == "ERROR":
        return FinalResult(ResultKind.ERROR, None, text)
    upper = text.upper()
    for prefix, kind in (("+CME ERROR", ResultKind.CME_ERROR), ("+CMS ERROR", ResultKind.CMS_ERROR)):
        if upper.startswith(prefix):
            detail = text[len(prefix):].lstrip(" :").strip()
            # ASCII digits only: str.isdigit() also holds for "²", which int() refuses.
            code = int(detail) if detail.isascii() and detail.isdigit() and len(detail) <= 6 else None
            return FinalResult(kind, code, detail)
    if upper.startswith("COMMAND NOT SUPPORT"):
        return FinalResult(ResultKind.NOT_SUPPORTED, None, text)
    if upper == "NO CARRIER":
        return FinalResult(ResultKind.NO_CARRIER, None, text)
    return None


@dataclass
class Connection:
    """One AT command channel. Not thread-safe; one command at a time."""

    urc_patterns: Iterable[str | Pattern[str]] = ()
    max_line: int = 4096
    state: State = State.IDLE
    _patterns: Pattern[str] = field(init=False, repr=False)
    _buf: bytearray = field(default_factory=bytearray, init=False, repr=False)
    _overlong: int = field(default=0, init=False, repr=False)  # bytes skipped in a long line
    _events: deque = field(default_factory=deque, init=False, repr=False)
    _pending: str = field(default="", init=False)
    # The timed-out command: while resynchronising, lines answering it are stale even
    # when their tag looks like a URC (a late "+CPIN: READY" is not a SIM insertion).
    _stale: str = field(default="", init=False)
    _expect_prompt: bool = field(default=False, init=False)
    _probes_sent: int = field(default=0, init=False)  # which probe is current (rotates)
    _marker: Pattern[str] | None = field(default=None, init=False)  # the current probe's answer

    def __post_init__(self) -> None:
        # One alternation: every answer line is checked against it.
        sources = (p.pattern if isinstance(p, re.Pattern) else p
                   for p in (*profiles.known_urc_patterns(), *self.urc_patterns))
        self._patterns = re.compile("|".join(f"(?:{source})" for source in sources), re.IGNORECASE)

    # -- caller actions -------------------------------------------------------------

    def send_command(self, command: str, *, expect_prompt: bool = False) -> bytes:
        """Start ``command`` (e.g. ``"AT+CSQ"``); returns the bytes to write."""
        if not command or any(c in command for c in "\r\n\x00"):
            raise ValueError(f"invalid AT command {command!r}")
        self._step(Input.SEND)
        self._pending = command.strip()
        self._expect_prompt = expect_prompt
        return self._pending.encode("ascii", "strict") + b"\r"

    def send_payload(self, payload: bytes, *, terminator: bytes = b"\x1a") -> bytes:
        """Bytes to write after a ``Prompt`` (the payload, then Ctrl-Z by default)."""
        if self.state is not State.AWAITING:
            raise LocalProtocolError("no command is waiting for a payload")
        self._expect_prompt = False
        return payload + terminator

    def command_timed_out(self) -> None:
        """The caller gave up waiting (timeout or cancellation) on the command, the
        abort or the probe; discard its reply until resynchronised."""
        self._step(Input.TIMEOUT)

    def module_restarted(self) -> None:
        """The module restarted (its boot URC came): a command or probe pending before it
        will never be answered, and nothing of it can arrive any more, so the line is in
        step and idle at once (no probe needed)."""
        self._step(Input.RESTART)

    def give_up(self) -> None:
        """``command_timed_out()`` unless nothing is pending (idle): for a caller that
        leaves at any point, whether or not its exchange had started."""
        if self.state is not State.IDLE:
            self._step(Input.TIMEOUT)

    def send_probe(self) -> bytes:
        """Start (or restart) resynchronising; returns the probe bytes to write. Each
        probe reads the next S-register of ``PROBES``, so an older probe's late answer
        is never taken for this one's."""
        self._step(Input.PROBE)
        return self._pending.encode() + b"\r"

    def abort(self) -> bytes:
        """Abort the pending command (V.250: any character aborts an abortable command);
        returns the byte to write. Its final result then comes as ``Aborted``."""
        self._step(Input.ABORT)
        return ABORT_BYTE

    @property
    def needs_resync(self) -> bool:
        return self.state in (State.DESYNC, State.PROBING, State.PROBE_ANSWERED)

    @property
    def pending(self) -> str:
        """The command (or probe) whose answer is awaited, "" when idle."""
        return self._pending if self.state is not State.IDLE else ""

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        self._buf += data
        self._parse()

    def next_event(self) -> Event | _NeedData:
        if self._events:
            return self._events.popleft()
        return NEED_DATA

    def events(self) -> list[Event]:
        """All events available now."""
        out = list(self._events)
        self._events.clear()
        return out

    # -- state machine ----------------------------------------------------------------

    def _step(self, inp: Input, text: str = "", final: FinalResult | None = None) -> None:
        action = TRANSITIONS[(self.state, inp)]
        if action is A.REFUSE:
            raise LocalProtocolError(f"cannot {inp.value} in state {self.state.value}")
        if action is A.START:
            self.state = State.AWAITING
        elif action is A.START_PROBE:
            self._pending, self._marker = PROBES[self._probes_sent % len(PROBES)]
            self._probes_sent += 1
            self.state = State.PROBING
        elif action is A.DESYNC:
            if self.state in (State.AWAITING, State.ABORTING):
                self._stale = self._pending
            self._expect_prompt = False
            self.state = State.DESYNC
        elif action is A.RESET:
            self._stale = ""
            self._expect_prompt = False
            self.state = State.IDLE
        elif action is A.START_ABORT:
            self._expect_prompt = False
            self.state = State.ABORTING
        elif action is A.FINISH_ABORTED:
            self.state = State.IDLE
            self._events.append(Aborted(final))
        elif action is A.EMIT_URC:
            self._events.append(Urc(text))
        elif action is A.EMIT_LINE:
            self._events.append(Line(text))
        elif action is A.FINISH:
            self.state = State.IDLE
            self._expect_prompt = False
            self._events.append(final)
        elif action is A.DISCARD_STALE:
            self._events.append(Discarded("stale", text, final=final))
        elif action is A.DISCARD_STRAY:
            self._events.append(Discarded("stray", text, final=final))
        elif action is A.MARK:
            self.state = State.PROBE_ANSWERED
        elif action is A.RESYNCED:
            self._stale = ""
            self._marker = None
            self.state = State.IDLE
            self._events.append(Resynchronised())
        # A.DROP: nothing

    def _classify(self, text: str) -> tuple[Input, FinalResult | None]:
        pending = self.state is not State.IDLE
        if pending and text.upper() == self._pending.upper():
            return Input.ECHO, None
        final = _classify_final(text)
        if final is not None:
            return Input.FINAL, final
        if self._is_urc(text, pending):
            return Input.URC, None
        if self._marker is not None and self._marker.fullmatch(text):
            return Input.MARKER, None
        return Input.TEXT, None

    def _is_urc(self, text: str, pending: bool) -> bool:
        if text.upper() in _URC_WORDS:
            return True
        tag_match = _TAG_RE.match(text.upper())
        tag = tag_match.group(1) if tag_match else None
        asked = pending and tag is not None and (
            tag in self._pending.upper() or (self._stale and tag in self._stale.upper()))
        if asked:
            # The pending command queries this tag: the line is its answer, unless it
            # has the unsolicited registration shape.
            return text.startswith(_REGISTRATION_TAGS) and registration_is_unsolicited(text)
        if text.upper().startswith(URC_PREFIXES):
            return True
        return self._patterns.search(text) is not None

    # -- framing --------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buf
        while buf:
            if self._expect_prompt and self.state is State.AWAITING:
                if not self._parse_one_with_prompt():
                    return
                continue
            # Fast path: every complete line in one C-level split.
            last = max(buf.rfind(b"\r"), buf.rfind(b"\n"))
            if last < 0:
                self._bound_partial()
                return
            pieces = _EOL_SPLIT.split(bytes(buf[: last + 1]))
            del buf[: last + 1]
            for raw in pieces[:-1]:  # the last piece is the empty tail after a terminator
                self._frame(raw)
            self._bound_partial()
            return

    def _parse_one_with_prompt(self) -> bool:
        """One step while a ``> `` prompt may come: the prompt has no line end. It starts a
        line, so not while an overlong line is still being skipped (that line ends first)."""
        buf = self._buf
        if not self._overlong:
            start = 0
            while start < len(buf) and buf[start] in b"\r\n\x00":
                start += 1
            if start < len(buf) and buf[start] == ord(">"):
                del buf[: start + 1]
                self._expect_prompt = False
                self._events.append(Prompt())
                return True
        eol = _EOL_RE.search(buf)
        if eol is None:
            self._bound_partial()
            return False
        raw = bytes(buf[: eol.start()])
        del buf[: eol.start() + 1]
        self._frame(raw)
        return True

    def _bound_partial(self) -> None:
        if len(self._buf) > self.max_line:
            self._overlong += len(self._buf)
            self._buf.clear()

    def _frame(self, raw: bytes) -> None:
        if self._overlong:
            length = self._overlong + len(raw)
            self._overlong = 0
            self._events.append(Discarded("overlong", "", length))
        elif len(raw) > self.max_line:
            self._events.append(Discarded("overlong", "", len(raw)))
        elif raw:
            self._line(raw)

    def _line(self, raw: bytes) -> None:
        raw = raw.replace(b"\x00", b"").lstrip(_JUNK).rstrip(b" \t")
        if not raw:
            return
        text = raw.decode("utf-8", "replace")
        inp, final = self._classify(text)
        self._step(inp, text, final)
