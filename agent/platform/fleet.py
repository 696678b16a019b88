"""The fleet as terminals publish it: a table from the retained `P/status` and `P/state`
of every terminal, and one line per event from `P/events` (SPEC §6). Pure: messages in,
rows and lines out; `cli.py` does the MQTT.

Everything a terminal publishes is input from outside: a payload that is not the JSON
object its topic's schema names is counted as invalid and shown as such, strings are cut
to a bounded length and control characters are escaped before they reach a terminal.

Problems come first in the table: a binding violation, then a terminal that is offline
(its Last Will) or never said, then a binding that is not `ok` (no SIM, unknown), then the
healthy ones; by device id within each group.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from agent.core.binding import VIOLATION
from agent.core.facts import STATE_SCHEMA
from agent.service.reporter import STATUS_SCHEMA, Topics

EVENT_SCHEMA = "simagent/event/1"
MAX_TEXT = 64
COLUMNS = ("DEVICE", "ONLINE", "BINDING", "ICCID", "IMEI", "LAST SEEN", "VIOLATION")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(value: Any, limit: int = MAX_TEXT) -> str | None:
    """A string from outside, safe to print: bounded, control characters escaped."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Layout:
    """Where the terminals' topics are: the agent's `topic_prefix` template."""

    def __init__(self, template: str) -> None:
        if template.count("{device_id}") != 1 or any(c in template for c in "+#") or template.startswith("/") or template.endswith("/"):
            raise ValueError(f"--prefix: a topic prefix with {{device_id}} once and no + or #, got {template[:80]!r}")
        self.wildcard = Topics.for_device(template, "+")
        before, _, after = template.partition("{device_id}")
        self._device = re.compile(re.escape(before) + r"([^/+#]+)" + re.escape(after) + r"/(status|state|events|cmd/result)")

    def filters(self, *kinds: str) -> list[str]:
        return [getattr(self.wildcard, kind) for kind in kinds]

    def split(self, topic: str) -> tuple[str, str] | None:
        """(device id, kind) of a terminal's topic, or None."""
        match = self._device.fullmatch(topic)
        return (match.group(1), match.group(2)) if match else None


def document(payload: bytes, schema: str) -> dict | None:
    """The payload as a JSON object carrying `schema`, or None."""
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) and value.get("schema") == schema else None


@dataclass
class Terminal:
    device: str
    status: dict | None = None
    state: dict | None = None
    invalid: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        state = self.state or {}
        binding = _table(state, "binding")
        status = binding.get("status")
        online = self.status.get("online") if self.status else None
        return {
            "device": clean(self.device),
            "online": online if isinstance(online, bool) else None,
            "binding": clean(status) or "unknown",
            "iccid": clean(_table(state, "sim").get("iccid")),
            "imei": clean(_table(state, "modem").get("imei")),
            "last_seen": clean(self.status.get("ts")) if self.status else None,
            "violation": clean(binding.get("reason")) if status == VIOLATION else None,
            "bound_iccid": clean(binding.get("bound_iccid")),
            "invalid": list(self.invalid),
        }


def _table(doc: dict, key: str) -> dict:
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


class Fleet:
    """What the retained messages say about each terminal."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.terminals: dict[str, Terminal] = {}

    def take(self, topic: str, payload: bytes) -> None:
        where = self.layout.split(topic)
        if where is None or where[1] not in ("status", "state"):
            return
        device, kind = where
        if not payload:  # a retained message cleared: the terminal was retired
            terminal = self.terminals.get(device)
            if terminal is not None:
                setattr(terminal, kind, None)
                if terminal.status is None and terminal.state is None:
                    del self.terminals[device]
            return
        terminal = self.terminals.setdefault(device, Terminal(device))
        doc = document(payload, STATUS_SCHEMA if kind == "status" else STATE_SCHEMA)
        if doc is None:
            terminal.invalid.append(kind)
        setattr(terminal, kind, doc)

    def rows(self) -> list[dict[str, Any]]:
        return sorted((t.row() for t in self.terminals.values()), key=lambda r: (problem_rank(r), r["device"]))


def problem_rank(row: dict[str, Any]) -> int:
    if row["binding"] == VIOLATION or row["invalid"]:
        return 0
    if row["online"] is not True:
        return 1
    if row["binding"] != "ok":
        return 2
    return 3


def format_table(rows: list[dict[str, Any]]) -> str:
    def online(value: bool | None) -> str:
        return {True: "yes", False: "NO"}.get(value, "?")

    cells = [COLUMNS] + [(
        r["device"], online(r["online"]),
        r["binding"].upper() if r["binding"] == VIOLATION else r["binding"],
        r["iccid"] or "-", r["imei"] or "-", r["last_seen"] or "-",
        (r["violation"] or "-") + (f" (invalid {', '.join(r['invalid'])})" if r["invalid"] else ""),
    ) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def event_line(device: str, event: dict[str, Any]) -> str:
    """`ts device #seq type key=value ...`, one line."""
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    fields = " ".join(f"{clean(k, 32)}={clean(v, 80)}" for k, v in list(data.items())[:12])
    seq = event.get("seq") if isinstance(event.get("seq"), int) else "?"
    return " ".join(filter(None, (clean(event.get("ts")) or "-", clean(device), f"#{seq}", clean(event.get("type")) or "?", fields)))
