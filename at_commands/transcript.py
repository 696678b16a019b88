"""AT transcripts: what a client asked a module and what the module answered, kept as a
file that is safe to commit and that a fake modem replays (``simagent-fakemodem --replay``).

Format ``simagent/at-transcript/1``: UTF-8 JSON lines.

* Line 1, the header: ``{"schema": "simagent/at-transcript/1", "recorded_at": "<ISO-8601
  UTC>", "port": "<what was opened>", "tool": "<who recorded>", "redacted": true}``.
* Then one record per line, in the order things happened on the line:

  - an exchange: ``{"t": 0.012, "cmd": "AT+CGSN", "lines": ["867400030000015"], "final": "OK"}``
    (``lines``: the information lines, echo left out; ``final``: the final result line as
    the module printed it, or ``null`` when none came: a timeout, the port lost;
    ``"aborted": true`` when the command was aborted for a priority command);
  - an unsolicited line: ``{"t": 1.503, "urc": "+QSIMSTAT: 1,0"}``.

  ``t`` is seconds since the recording started (monotonic clock, milliseconds).

Readers ignore record keys they do not know and refuse another schema. A record is written
(line-buffered) as soon as its exchange ends, so a capture cut short keeps what it saw.
Secrets never reach the file: command lines and answers go through
``commands.redact_secrets`` (PIN and password arguments, APN credentials) first.

The recorder is fed by the AT client (``ATClient.record``): every command it sends
(probes and abort bytes aside), with its answer, and every URC.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, TextIO, Union

from .commands import redact_secrets

__all__ = ["SCHEMA", "TranscriptError", "Exchange", "Unsolicited", "Transcript", "Recorder", "parse", "load"]

SCHEMA = "simagent/at-transcript/1"


class TranscriptError(ValueError):
    """Not a transcript this version reads (names the line)."""


@dataclass(frozen=True)
class Exchange:
    t: float
    command: str
    lines: tuple[str, ...]
    final: str | None  # None: no final result came
    aborted: bool = False


@dataclass(frozen=True)
class Unsolicited:
    t: float
    line: str


Record = Union[Exchange, Unsolicited]


@dataclass(frozen=True)
class Transcript:
    header: dict[str, Any]
    records: tuple[Record, ...]

    @property
    def exchanges(self) -> tuple[Exchange, ...]:
        return tuple(r for r in self.records if isinstance(r, Exchange))

    @property
    def urcs(self) -> tuple[str, ...]:
        return tuple(r.line for r in self.records if isinstance(r, Unsolicited))


def _record(number: int, obj: Any) -> Record:
    if not isinstance(obj, dict):
        raise TranscriptError(f"line {number}: expected a JSON object")
    t = obj.get("t", 0.0)
    if not isinstance(t, (int, float)):
        raise TranscriptError(f"line {number}: \"t\" must be a number")
    if isinstance(obj.get("urc"), str):
        return Unsolicited(float(t), obj["urc"])
    command, lines, final = obj.get("cmd"), obj.get("lines", []), obj.get("final")
    if (not isinstance(command, str) or not isinstance(lines, list) or not all(isinstance(x, str) for x in lines)
            or not (final is None or isinstance(final, str))):
        raise TranscriptError(f"line {number}: expected {{\"cmd\": str, \"lines\": [str], \"final\": str|null}} "
                              "or {\"urc\": str}")
    return Exchange(float(t), command, tuple(lines), final, bool(obj.get("aborted", False)))


def parse(text: str) -> Transcript:
    """A transcript from its text; ``TranscriptError`` names the first bad line."""
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not numbered:
        raise TranscriptError("empty: no header line")
    objects = []
    for n, line in numbered:
        try:
            objects.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise TranscriptError(f"line {n}: not JSON ({exc.msg})") from None
    (_, header), rest = objects[0], objects[1:]
    if not isinstance(header, dict) or header.get("schema") != SCHEMA:
        found = header.get("schema") if isinstance(header, dict) else None
        raise TranscriptError(f"line 1: expected the header {{\"schema\": \"{SCHEMA}\", ...}}, found schema {found!r}")
    return Transcript(header, tuple(_record(n, obj) for n, obj in rest))


def load(path: str | os.PathLike) -> Transcript:
    with open(path, encoding="utf-8") as file:
        return parse(file.read())


class Recorder:
    """Writes a transcript as the client talks: the header at once, then one line per
    exchange or URC, redacted and flushed, to ``out`` (a path or a text file; ``close()``
    closes a file it opened). ``keep``: also (or, without ``out``, only) keep the newest
    records of at most that many bytes in memory, for ``text()`` (a daemon's recent
    traffic: bounded, however long it runs)."""

    def __init__(self, out: str | os.PathLike | TextIO | None = None, *, keep: int = 0, port: str = "",
                 tool: str = "", clock: Callable[[], float] = time.monotonic):
        self._owned = out is not None and not hasattr(out, "write")
        self._file: TextIO | None = (open(out, "w", encoding="utf-8", buffering=1)  # type: ignore[arg-type]
                                     if self._owned else out)  # type: ignore[assignment]
        self._keep = keep
        self._kept: deque[str] = deque()
        self._kept_bytes = 0
        self._clock = clock
        self._start = clock()
        self._header = json.dumps({"schema": SCHEMA, "recorded_at": datetime.now(timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z", "port": port, "tool": tool, "redacted": True}) + "\n"
        self._emit(self._header)

    def text(self) -> str:
        """The header and the records kept in memory (``keep``), as a transcript file."""
        return self._header + "".join(self._kept)

    def exchange(self, command: str, lines: Iterable[str], final: str | None, *, aborted: bool = False) -> None:
        record: dict[str, Any] = {"t": self._t(), "cmd": redact_secrets(command.strip()),
                                  "lines": [redact_secrets(line) for line in lines], "final": final}
        if aborted:
            record["aborted"] = True
        self._write(record)

    def urc(self, line: str) -> None:
        self._write({"t": self._t(), "urc": redact_secrets(line)})

    def close(self) -> None:
        if self._owned and self._file is not None and not self._file.closed:
            self._file.close()

    def _t(self) -> float:
        return round(self._clock() - self._start, 3)

    def _write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        if self._keep:
            self._kept.append(line)
            self._kept_bytes += len(line)
            while self._kept_bytes > self._keep:
                self._kept_bytes -= len(self._kept.popleft())
        self._emit(line)

    def _emit(self, line: str) -> None:
        if self._file is not None and not self._file.closed:
            self._file.write(line)
            self._file.flush()
