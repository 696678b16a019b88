"""Platform commands from `P/cmd` (SPEC §6): parse, validate, authorise, dispatch, reply.

A command is `{"schema"?: "simagent/command/1", "id", "name", "args": {}, "token"?}`.
Everything that arrives is hostile until proven otherwise: the size is checked before
the bytes are parsed, the document shape here, and each operation's arguments and who
may call it (a token for `rebind`, `unbind`, `modem_reset`, a writing `at`) against the
one table of operations, `agent.core.operations`. A command that rewrites the IMEI is
refused whatever it carries.

Every refusal gets an error reply and a `command_refused` event (with its evidence
entry) and changes nothing else. The work itself is done by handlers the daemon injects
(`name -> async handler(Command) -> result dict`); a handler refuses by raising
`CommandError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from agent.core.operations import PLATFORM, TELEMETRY_INTERVAL_RANGE, OperationRefused, offered, operations
from agent.core.store import Store

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
# A flood of hostile commands: the first refusals of each window are recorded one by one,
# the rest of the burst as one summary (SPEC §12: rate-limited before they cost a fsync).
REFUSAL_WINDOW = 10.0
REFUSALS_RECORDED = 20
MAX_NAME_CHARS = 64  # of an unknown command's name, as a refusal repeats it
MAX_MESSAGE_CHARS = 300  # of a refusal's message (it may quote the sender's text)
# `export_evidence` answers in one MQTT message: a bundle longer than this is refused
# (`too_large`) and the platform asks again with a later `since`. 256 KiB (about 700
# entries) stays under the packet limits brokers commonly set; the whole log goes
# through `simagent evidence export` on the device.
MAX_EXPORT_REPLY_BYTES = 256 * 1024
COMMAND_SCHEMA = "simagent/command/1"
RESULT_SCHEMA = "simagent/cmd_result/1"
COMMAND_DONE_MESSAGE_ID = "8a3b0c5e2f6d4e1a9b7c3d2e1f0a4b5c"  # journald: a platform command carried out
MAX_ID_LENGTH = 128
_DOCUMENT_KEYS = frozenset({"schema", "id", "name", "args", "token"})


class CommandError(Exception):
    """A refusal: `code` is machine-readable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Command:
    id: str
    name: str
    args: dict[str, Any]
    claims: Mapping[str, Any] | None = None  # the verified token's claims, when one was needed
    token: str | None = field(default=None, repr=False)  # that token, for the handler to consume; a credential


Handler = Callable[[Command], Awaitable[dict[str, Any] | None]]
# (token, action) -> claims. `action` is the command name (for `at`: "at"). Raises an
# exception carrying `.code` (e.g. "token_expired", "token_replayed") when it refuses.
# A coroutine: the daemon checks the signature in a helper process.
TokenVerifier = Callable[[str, str], Awaitable[Mapping[str, Any]]]


def reply_ok(request_id: str, result: dict[str, Any] | None) -> dict[str, Any]:
    return {"schema": RESULT_SCHEMA, "id": request_id, "ok": True, "result": result or {}}


def reply_error(request_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {"schema": RESULT_SCHEMA, "id": request_id, "ok": False, "error": {"code": code, "message": message}}


@dataclass
class CommandProcessor:
    store: Store
    handlers: Mapping[str, Handler]
    verify_token: TokenVerifier
    telemetry_range: tuple[int, int] = TELEMETRY_INTERVAL_RANGE
    refusal_window: float = REFUSAL_WINDOW
    _operations: dict[str, Any] = field(init=False, repr=False)
    # Refusals recorded one by one in the current window, and those only counted since.
    _recorded: int = field(default=0, init=False, repr=False)
    _window_ends: float = field(default=0.0, init=False, repr=False)
    _unrecorded: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._operations = offered(PLATFORM, operations(self.telemetry_range))
        unknown = set(self.handlers) - set(self._operations)
        if unknown:
            raise ValueError(f"handlers for unknown commands: {sorted(unknown)}")

    async def handle(self, payload: bytes, *, retained: bool = False) -> dict[str, Any]:
        """Returns the reply for one `P/cmd` payload; never raises for bad input.
        `retained`: the broker delivered it as a retained message (at a subscribe): it
        is refused, or it would be carried out again at every connect and restart."""
        request_id: str | None = None
        name: str | None = None
        try:
            if len(payload) > MAX_COMMAND_BYTES:
                raise CommandError("too_large", f"command is {len(payload)} bytes, the limit is {MAX_COMMAND_BYTES}")
            document = _decode(payload)
            request_id = _request_id(document)
            name = document.get("name") if isinstance(document.get("name"), str) else None
            if retained:
                raise CommandError("retained", "a retained command is not carried out (it would run again at every "
                                   "connect): publish commands to P/cmd without retain, and clear this one")
            command = self._validate(document)
            if command.token is not None:
                command = replace(command, claims=await self._verify(command.token, command.name))
            handler = self.handlers.get(command.name)
            if handler is None:
                raise CommandError("unsupported", f"{command.name} is not available on this device")
            result = await handler(command)
            log.info("platform command %s (id %s) done", command.name, command.id,
                     extra={"journal_fields": {"SIMAGENT_EVENT": "command_done", "SIMAGENT_COMMAND": command.name,
                                               "MESSAGE_ID": COMMAND_DONE_MESSAGE_ID}})
            return reply_ok(command.id, result)
        except CommandError as exc:
            return self._refuse(request_id, name, exc.code, exc.message)
        except Exception as exc:  # a handler bug must not take the agent down
            log.exception("command %s (%s) failed", name, request_id)
            return self._refuse(request_id, name, "internal_error", f"{type(exc).__name__}: command failed")

    def _validate(self, document: dict[str, Any]) -> Command:
        extra = set(document) - _DOCUMENT_KEYS
        if extra:
            raise CommandError("bad_request", f"unknown fields: {', '.join(sorted(extra))[:200]}")
        if "schema" in document and document["schema"] != COMMAND_SCHEMA:
            raise CommandError("bad_request", f"schema must be {COMMAND_SCHEMA}")
        request_id = _request_id(document)
        if request_id is None:
            raise CommandError("bad_request", f"id must be a non-empty string of at most {MAX_ID_LENGTH} characters")
        name = document.get("name")
        if not isinstance(name, str):
            raise CommandError("bad_request", "name must be a string")
        operation = self._operations.get(name)
        if operation is None:
            raise CommandError("unknown_command", f"unknown command {name[:64]!r}")
        args = document.get("args", {})
        if not isinstance(args, dict):
            raise CommandError("bad_args", f"{name}: args must be an object")
        token = document.get("token")
        if token is not None and not isinstance(token, str):
            raise CommandError("bad_request", "token must be a string")
        try:
            operation.check_args(args)
        except OperationRefused as exc:
            raise CommandError(exc.code, exc.message) from exc
        if not operation.needs_token(args):
            return Command(request_id, name, args)  # a token given anyway is not used
        if not token:
            raise CommandError("token_required", f"{name} needs a signed token")
        return Command(request_id, name, args, token=token)  # `handle` verifies it next

    async def _verify(self, token: str, action: str) -> Mapping[str, Any]:
        try:
            return await self.verify_token(token, action)
        except Exception as exc:  # fail closed, whatever the verifier raised
            raise CommandError(getattr(exc, "code", None) or "token_invalid", f"token refused: {exc}") from exc

    def _refuse(self, request_id: str | None, name: str | None, code: str, message: str) -> dict[str, Any]:
        """An error reply always; a `command_refused` record (a durable commit) for the
        first REFUSALS_RECORDED refusals of each REFUSAL_WINDOW, and one summary record
        with the counts per code for the rest of a burst: a flood costs no fsync each."""
        # Both come from the sender: bounded before they reach the log, the reply and the
        # append-only evidence log (a 60 KB command name was kept whole, for good).
        name, message = name if name is None else name[:MAX_NAME_CHARS], message[:MAX_MESSAGE_CHARS]
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._window_ends:
            self._flush_refusals()
            self._recorded, self._window_ends = 0, now + self.refusal_window
        if self._recorded < REFUSALS_RECORDED:
            self._recorded += 1
            log.warning("command %s (id %s) refused: %s: %s", name, request_id, code, message)
            # The token is never copied into the record: it is a credential.
            self.store.record("command_refused", {"command_id": request_id, "name": name, "code": code, "reason": message})
        else:
            if not self._unrecorded:
                loop.call_at(self._window_ends, self._flush_refusals)
            self._unrecorded[code] = self._unrecorded.get(code, 0) + 1
        return reply_error(request_id, code, message)

    def _flush_refusals(self) -> None:
        """The summary of a burst's refusals that were only counted."""
        if not self._unrecorded:
            return
        counts, self._unrecorded = self._unrecorded, {}
        total = sum(counts.values())
        log.warning("%d more commands refused in %g s: %s", total, self.refusal_window, counts)
        try:
            self.store.record("command_refused", {"burst": True, "count": total, "codes": counts,
                                                  "window_s": self.refusal_window})
        except sqlite3.Error as exc:
            log.error("refusal summary not recorded: %s", exc)


def _decode(payload: bytes) -> dict[str, Any]:
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, absurd nesting
        raise CommandError("malformed", f"not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(document, dict):
        raise CommandError("malformed", "a command is a JSON object")
    return document


def _request_id(document: dict[str, Any]) -> str | None:
    value = document.get("id")
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH:
        return value
    return None
