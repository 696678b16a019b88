"""Every operation the daemon offers, in one table: its name (the same on the control
socket and over MQTT), its arguments, whether a call writes, and who may make it on each
transport. The control socket (`agent.service.control`) and the platform's command
processor (`agent.service.platform_commands`) are transports over this table; the daemon
gives each operation one handler (`agent.service.daemon`), and `simagent-platform` checks
a command against the same table before it sends it.

Who may call (``Operation.allowed``):

* Control socket (``socket=True``): any member of the service group for a call that only
  reads; a call that writes needs uid 0 (read from the kernel, never the request), and
  for ``at`` also ``"unsafe": true``, the caller's explicit "I know this writes".
* Platform (`P/cmd`): ``platform="open"`` needs no token (reads, and the telemetry
  interval); ``"token"`` always needs a signed token for this device and action;
  ``"token_for_writes"`` (``at``) needs one when the line writes.
* What an AT line may contain at all (IMEI rewrites, control characters, framing
  settings, a scan joined to other commands) is `agent.core.at_rules`' for every caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.core import at_rules
from agent.core.config import TelemetryConfig
from at_commands.commands import is_query

MAX_AT_LENGTH = 256
# Seconds: the bounds `[telemetry] interval` takes in the configuration (issue 13: the
# platform could not set what the configuration accepts).
TELEMETRY_INTERVAL_RANGE = tuple(int(bound) for bound in
                                 next(f for f in dataclasses.fields(TelemetryConfig)
                                      if f.name == "interval").metadata["setting"]["range"])
SOCKET, PLATFORM = "socket", "platform"


class OperationRefused(Exception):
    """A call that must not run: ``code`` is machine-readable, the message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Arg:
    type: type
    required: bool = True
    minimum: int | None = None
    maximum: int | None = None
    max_length: int | None = None

    def check(self, operation: str, key: str, value: Any) -> None:
        # bool is an int subclass; a JSON true is never a number of seconds.
        if not isinstance(value, self.type) or (isinstance(value, bool) and self.type is not bool):
            raise OperationRefused("bad_args", f"{operation}: {key} must be a {self.type.__name__}")
        if self.minimum is not None and value < self.minimum:
            raise OperationRefused("bad_args", f"{operation}: {key} must be >= {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise OperationRefused("bad_args", f"{operation}: {key} must be <= {self.maximum}, got {value}")
        if self.max_length is not None and len(value) > self.max_length:
            raise OperationRefused("bad_args", f"{operation}: {key} is longer than {self.max_length} characters")


def _at_writes(args: Mapping[str, Any]) -> bool:
    return not is_query(args["command"])


@dataclass(frozen=True)
class Operation:
    name: str
    args: Mapping[str, Arg] = field(default_factory=dict)
    writes: bool | Callable[[Mapping[str, Any]], bool] = False  # a predicate over checked args
    socket: bool = False  # offered on the control socket
    platform: str | None = None  # None, "open", "token" or "token_for_writes"
    unsafe_flag: bool = False  # a write over the socket must also carry "unsafe": true
    timeout: float = 30.0  # seconds the control socket allows it

    def is_write(self, args: Mapping[str, Any]) -> bool:
        return self.writes(args) if callable(self.writes) else self.writes

    def check_args(self, args: Mapping[str, Any]) -> None:
        """``args`` against the table, and an AT line against `at_rules` (what may be
        sent at all); raises OperationRefused."""
        unknown = set(args) - set(self.args)
        if unknown:
            raise OperationRefused("bad_args", f"{self.name}: unknown arguments: {', '.join(sorted(unknown))[:200]}")
        for key, arg in self.args.items():
            if key in args:
                arg.check(self.name, key, args[key])
            elif arg.required:
                raise OperationRefused("bad_args", f"{self.name}: missing argument {key}")
        if "command" in self.args:
            try:
                at_rules.check_command(args["command"], unsafe=True)  # the write rule is the transport's
            except at_rules.Refused as exc:
                raise OperationRefused(exc.code, str(exc)) from exc

    def needs_token(self, args: Mapping[str, Any]) -> bool:
        """Over MQTT: whether this call (with checked ``args``) needs a signed token."""
        return self.platform == "token" or (self.platform == "token_for_writes" and self.is_write(args))


def operations(telemetry_range: tuple[int, int] = TELEMETRY_INTERVAL_RANGE) -> dict[str, Operation]:
    """The table. ``telemetry_range`` bounds `set_telemetry_interval` (seconds)."""
    low, high = telemetry_range
    table = (
        Operation("ping", platform="open"),
        Operation("status", socket=True, platform="open"),
        Operation("diag", socket=True, platform="open"),
        # The default timeout allows for slow commands such as an operator scan.
        Operation("at", {"command": Arg(str, max_length=MAX_AT_LENGTH), "unsafe": Arg(bool, required=False)},
                  writes=_at_writes, socket=True, platform="token_for_writes", unsafe_flag=True, timeout=180.0),
        Operation("export_evidence", {"since": Arg(str, required=False, max_length=64)}, socket=True, platform="open"),
        Operation("bind_show", socket=True),
        Operation("at_transcript", socket=True),  # the recent AT traffic, redacted (a support bundle's)
        Operation("bind_accept", {"token": Arg(str, max_length=16_384)}, writes=True, socket=True),
        Operation("bind_reset", {"reason": Arg(str, max_length=1_000)}, writes=True, socket=True),
        Operation("set_telemetry_interval", {"interval": Arg(int, minimum=low, maximum=high)}, writes=True,
                  platform="open"),
        Operation("rebind", writes=True, platform="token"),
        Operation("unbind", writes=True, platform="token"),
        Operation("modem_reset", writes=True, platform="token"),
    )
    return {operation.name: operation for operation in table}


OPERATIONS = operations()


def offered(transport: str, table: Mapping[str, Operation] = OPERATIONS) -> dict[str, Operation]:
    """The operations a transport (SOCKET or PLATFORM) offers."""
    return {name: op for name, op in table.items() if (op.socket if transport == SOCKET else op.platform is not None)}
