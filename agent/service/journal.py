"""The daemon's log as a technician reads it (`journalctl -u simagent -f`): one INFO line
per recorded event (SIM removed/inserted, binding decisions, radio blocked/restored,
platform commands refused, tokens, ...), and under systemd the same lines with structured
fields (`journalctl -u simagent -o verbose`): ``SIMAGENT_EVENT=``, ``ICCID=``, ``IMEI=``
and a stable ``MESSAGE_ID=`` per event type.

journald is "present" when systemd connected stderr to it (``$JOURNAL_STREAM``) and its
native socket exists; the log then goes to that socket (``$SIMAGENT_JOURNAL_SOCKET``
overrides the path, for containers and tests) instead of stderr, so no line is doubled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import sys
import uuid
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# MESSAGE_ID = uuid5(this namespace, event type): stable across versions and terminals.
MESSAGE_ID_NAMESPACE = uuid.UUID("6f1c2a52-4d0e-4b53-9a8e-5c1d0f6b2a17")
# Logged by the daemon in its own words already ("modem found on ...").
ALREADY_LOGGED = frozenset({"modem_found", "modem_lost"})
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

log = logging.getLogger("simagent.events")


def message_id(event_type: str) -> str:
    return uuid.uuid5(MESSAGE_ID_NAMESPACE, event_type).hex


def event_fields(event_type: str, data: dict[str, Any]) -> dict[str, str]:
    fields = {"SIMAGENT_EVENT": event_type, "MESSAGE_ID": message_id(event_type)}
    for key, field in (("iccid", "ICCID"), ("imei", "IMEI")):
        value = data.get(key)
        if isinstance(value, str) and value:
            fields[field] = value
    return fields


def _words(data: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in data.items() if isinstance(v, (str, int, float, bool)) and v != ""]
    return ", ".join(parts)[:300]


def log_event(event_type: str, data: dict[str, Any]) -> None:
    """The store's record listener: one INFO line per event, with its fields."""
    if event_type in ALREADY_LOGGED:
        return
    words = _words(data)
    log.info("%s%s", event_type, f": {words}" if words else "", extra={"journal_fields": event_fields(event_type, data)})


class JournalHandler(logging.Handler):
    """Sends each record to journald's native socket with its structured fields."""

    def __init__(self, path: str, identifier: str = "simagent") -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                "MESSAGE": self.format(record),
                "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
                "SYSLOG_IDENTIFIER": self.identifier,
                "LOGGER": record.name,
                **getattr(record, "journal_fields", {}),
            }
            self._sock.sendto(_serialise(fields), self.path)
        except OSError:  # journald restarting or gone: the line still goes somewhere
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(f"{record.levelname} {record.name}: {fields['MESSAGE']}\n")
        except Exception:  # noqa: BLE001  (logging must never take the daemon down)
            self.handleError(record)

    def close(self) -> None:
        self._sock.close()
        super().close()


def _serialise(fields: dict[str, str]) -> bytes:
    out = bytearray()
    for key, value in fields.items():
        data = str(value).encode()
        if b"\n" in data:  # the binary form: name, newline, 64-bit length, value
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def journal_socket() -> str | None:
    """journald's socket when the daemon runs under it, else None (log to stderr)."""
    if not os.environ.get("JOURNAL_STREAM"):
        return None
    path = os.environ.get("SIMAGENT_JOURNAL_SOCKET") or JOURNAL_SOCKET
    return path if os.path.exists(path) else None
