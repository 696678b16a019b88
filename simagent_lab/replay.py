"""A recorded AT transcript served as a module: the state behind ``simagent-fakemodem
--replay FILE`` (the I/O shell, the pty and the control socket are ``fakemodem.FakeModem``'s).

The rules, all of them:

* A command line is looked up by its normalised, redacted form (``commands.normalise``
  after ``commands.redact_secrets``, as the recorder wrote it: ``at+cpin="1234"`` finds
  the recorded ``AT+CPIN=[redacted]``). It is answered with the information lines and
  final result recorded for it; a command recorded several times gets its answers in
  recorded order, and the last one again once they are used up. A recorded command that
  got no final result gets none now (the client times out, as it did).
* A command that was not recorded answers ``ERROR``, as a module does to a command it
  does not know. The V.250 S-register reads the AT client probes with (``ATS3?``,
  ``ATS4?``, ``ATS5?``) answer their fixed defaults unless recorded: they are V.250's,
  not the module's.
* Echo is on at start, as on a module after power-on; a recorded ``ATE0``/``ATE1``
  answered ``OK`` switches it. An empty line is answered with nothing.
* URCs go out only on request: ``replay-urc`` sends the next recorded one (``all``: every
  one left), ``urc LINE`` any line. ``reboot`` (and ``replug``) starts the replay over.
* The transcript is the whole truth: no SIM swap, registration or fault operations.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable

from at_commands.commands import normalise, redact_secrets
from at_commands.protocol import PROBES
from at_commands.transcript import Exchange, Transcript

CRLF = "\r\n"
# V.250 defaults of the S-registers the AT client probes with (protocol.PROBES).
_PROBE_ANSWERS = {probe: f"{int(pattern.pattern.lstrip('0*')):03d}" for probe, pattern in PROBES}


def replay_key(command_line: str) -> str:
    """How a command line is looked up: redacted like the recorder, then normalised."""
    return normalise(redact_secrets(command_line.strip()))


def _frame(line: str) -> bytes:
    return f"{CRLF}{line}{CRLF}".encode("utf-8", "replace")


class ReplayState:
    """A transcript as a module, no I/O (the same surface ``FakeModem`` drives)."""

    CONTROL_OPS = frozenset({"state", "urc", "replay-urc", "reboot", "unplug", "replug"})

    def __init__(self, transcript: Transcript, source: str = "", clock: Callable[[], float] = time.monotonic):
        self.transcript = transcript
        self.source = source
        self.clock = clock
        self._answers: dict[str, list[Exchange]] = defaultdict(list)
        for exchange in transcript.exchanges:
            self._answers[replay_key(exchange.command)].append(exchange)
        self._urcs = transcript.urcs
        self.counters: dict[str, int] = {"commands": 0, "unknown_commands": 0, "reboots": 0}
        self._power_on()

    def _power_on(self) -> None:
        self.echo = True
        self._served: dict[str, int] = defaultdict(int)
        self._next_urc = 0
        self.unknown: list[str] = []

    # -- what FakeModem drives -------------------------------------------------------

    def boot_output(self) -> list[bytes]:
        return []

    def next_due(self) -> float | None:
        return None

    def poll(self) -> list[bytes]:
        return []

    @property
    def abortable_running(self) -> bool:
        return False  # every answer goes out at once: nothing executes long enough to abort

    def abort(self) -> list[bytes]:
        return []

    def handle_line(self, raw: str) -> list[bytes]:
        """One command line (without its CR) in, the recorded bytes out."""
        out = [(raw + "\r").encode("utf-8", "replace")] if self.echo else []
        line = raw.strip()
        if not line:
            return out
        self.counters["commands"] += 1
        key = replay_key(line)
        recorded = self._answers.get(key)
        if recorded:
            exchange = recorded[min(self._served[key], len(recorded) - 1)]
            self._served[key] += 1
            if exchange.final is None:
                return out
            if key in ("ATE0", "ATE", "ATE1") and exchange.final == "OK":
                self.echo = key == "ATE1"
            return out + [b"".join(_frame(x) for x in (*exchange.lines, exchange.final))]
        if key in _PROBE_ANSWERS:
            return out + [_frame(_PROBE_ANSWERS[key]) + _frame("OK")]
        self.counters["unknown_commands"] += 1
        self.unknown.append(key)
        return out + [_frame("ERROR")]

    def reboot(self) -> list[bytes]:
        self.counters["reboots"] += 1
        self._power_on()
        return []

    def replay_urc(self, every: bool = False) -> list[bytes]:
        """The next recorded URC (``every``: all that are left), in recorded order."""
        if self._next_urc >= len(self._urcs):
            raise ValueError(f"replay-urc: no recorded URC left ({len(self._urcs)} recorded)")
        end = len(self._urcs) if every else self._next_urc + 1
        lines, self._next_urc = self._urcs[self._next_urc:end], end
        return [_frame(line) for line in lines]

    def snapshot(self) -> dict[str, Any]:
        return {
            "replay": self.source,
            "recorded_at": self.transcript.header.get("recorded_at"),
            "echo": self.echo,
            "counters": dict(self.counters),
            "commands": dict(self._served),
            "unknown": list(self.unknown),
            "urcs_recorded": len(self._urcs),
            "urcs_left": len(self._urcs) - self._next_urc,
        }
