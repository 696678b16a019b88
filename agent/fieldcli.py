"""`simagent status` and `simagent at`: the field technician's view of the modem (SPEC §8).

While the daemon runs it owns the AT port (TIOCEXCL), so both commands go through its
control socket; otherwise they open the modem themselves (``--port``, else ``[modem]
port``, "auto" = udev discovery). ``--port`` always means "open this port directly".

Which AT commands may be sent (the same rule serves the daemon's `at` op and the
platform's `at` command — import ``is_query`` / ``check_command`` / ``run_at``):

* A command line may hold several commands joined by ``;`` (``AT+CSQ;+CREG?``); the line
  is a *query* only when every one of them is.
* Queries: ``AT`` alone; read forms ``AT+X?`` (also ``^ # $`` prefixes) and S-register
  reads ``ATSn?``; test forms ``AT+X=?``; the action commands in ``READ_ONLY_ACTIONS``
  (identity, IMSI, signal, ICCID, error report, configuration display) and every
  profile's ICCID and extra signal commands (vendor knowledge is data); ``+CRSM`` with a
  read instruction (176 READ BINARY, 178 READ RECORD, 192 GET RESPONSE, 242 STATUS);
  ``+CGSN=<0..3>`` (serial number reads).
* Everything else is a *write* and needs ``--unsafe``: any other set form (``=value``),
  any other action (``ATZ``, ``AT&W``, ``ATD``, ``ATH``...) and unknown commands.
* Commands that rewrite the IMEI (every profile's ``imei_rewrite_commands``) are refused
  always, ``--unsafe`` or not, and so are lines with control characters (a Ctrl-Z would
  turn a command into a payload).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agent import config, exitcodes
from agent.binding import BindingPolicy
from agent.control import BlockingControlClient, ControlError
from agent.status import format_status, read_binding, read_modem_status
from at_commands import discovery, profiles
from at_commands.client import CommandError, CommandTimeout, PortBusy, PortLost, PortNotFound, Response
from at_commands.modem import ICCID_FALLBACKS, Modem
from at_commands.protocol import FinalResult, ResultKind

# Slow commands (an operator scan, AT+COPS=?) take minutes; same bound as the daemon's op.
AT_TIMEOUT = 180.0
DAEMON = "daemon"

# 27.007 / V.250 action commands that only report (normalised: upper case, after "AT").
_BASE_READ_ONLY = (
    "I", "&V", "+CGMI", "+CGMM", "+CGMR", "+CGSN", "+GMI", "+GMM", "+GMR", "+GSN", "+CIMI",
    "+CSQ", "+CESQ", "+CNUM", "+CEER", "+CLAC", "+CPAS",
)
_QUERY_FORMS = (
    re.compile(r"I\d"),  # ATI0..ATI9: identification pages
    re.compile(r"[+^#$%*][A-Z][A-Z0-9]*(\?|=\?)"),  # read and test forms
    re.compile(r"S\d+\?"),  # S-register read
    re.compile(r"\+CRSM=(176|178|192|242)(,.*)?"),  # SIM file reads
    re.compile(r"\+CGSN=[0-3]"),  # serial number reads (IMEI, IMEISV, SVN)
)


class Refused(Exception):
    """A command that must not be sent. ``code`` is the control-socket error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _normalise(line: str) -> str:
    """Upper case and no blanks, except inside double quotes."""
    parts = line.strip().split('"')
    return '"'.join(p if i % 2 else re.sub(r"\s+", "", p).upper() for i, p in enumerate(parts))


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def split_commands(line: str) -> list[str] | None:
    """The commands of one line, each as ``AT...`` in normal form; None when the line is
    not an AT command line."""
    text = _normalise(line)
    if not text.startswith("AT"):
        return None
    parts = [p for p in _split_outside_quotes(text[2:], ";") if p]
    return ["AT" + p for p in parts] or ["AT"]


def _profile_reads() -> frozenset[str]:
    commands = [p.iccid_command for p in profiles.PROFILES.values() if p.iccid_command]
    commands += [c for p in profiles.PROFILES.values() for c in p.extra_signal_commands]
    commands += [c for c, _tag in ICCID_FALLBACKS]
    return frozenset(_normalise(c)[2:] for c in commands)


READ_ONLY_ACTIONS: frozenset[str] = frozenset(_BASE_READ_ONLY) | _profile_reads()


def _is_query_command(body: str) -> bool:
    return body == "" or body in READ_ONLY_ACTIONS or any(p.fullmatch(body) for p in _QUERY_FORMS)


def is_query(command: str) -> bool:
    """True when every command of the line only reads (the rule in the module docstring)."""
    commands = split_commands(command)
    return commands is not None and all(_is_query_command(c[2:]) for c in commands)


def is_imei_rewrite(command: str) -> bool:
    """True when any command of the line would rewrite the IMEI, in any profile's dialect."""
    candidates = {command.strip(), *(split_commands(command) or ())}
    return any(p.is_imei_rewrite(c) for p in profiles.PROFILES.values() for c in candidates)


def check_command(command: str, unsafe: bool) -> None:
    """Raises ``Refused`` unless ``command`` may be sent (with ``unsafe`` for writes)."""
    if any(not 32 <= ord(c) < 127 for c in command.strip()):
        raise Refused("bad_request", "refused: control or non-ASCII characters in the command")
    if split_commands(command) is None:
        raise Refused("bad_request", "refused: not an AT command (a command line starts with AT)")
    if is_imei_rewrite(command):
        raise Refused("imei_rewrite_refused", "refused: this command rewrites the IMEI; simagent never sends it")
    if not unsafe and not is_query(command):
        raise Refused("unsafe_required", "refused: this command changes the modem; repeat it with --unsafe")


def final_line(final: FinalResult) -> str:
    if final.kind is ResultKind.CME_ERROR:
        return f"+CME ERROR: {final.text}"
    if final.kind is ResultKind.CMS_ERROR:
        return f"+CMS ERROR: {final.text}"
    return final.text


def at_result(response: Response) -> dict[str, Any]:
    """The JSON result of one AT command (also the daemon's `at` op result)."""
    return {"lines": list(response.lines), "final": final_line(response.final), "ok": response.final.ok}


async def run_at(modem: Modem, command: str, unsafe: bool, timeout: float = AT_TIMEOUT) -> dict[str, Any]:
    """Checks and sends one command line; raises ``Refused``, ``CommandTimeout`` or
    ``PortLost``. The daemon's `at` op handler maps ``Refused.code`` to a ControlError."""
    check_command(command, unsafe)
    return at_result(await modem.client.send_raw_line(command.strip(), timeout))


# -- reaching the modem --------------------------------------------------------------------


class Unavailable(Exception):
    """The modem cannot be used: ``kind`` is missing, busy, silent, lost or daemon."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ModemTarget:
    """Where and how to open the modem directly."""

    port: str  # device path, pyserial URL or "auto"
    profile: str = "auto"
    port_role: str = "secondary"
    baudrate: int = 115200
    command_timeout: float = 5.0

    @classmethod
    def from_config(cls, cfg: Any, port: str | None = None, profile: str | None = None) -> "ModemTarget":
        modem = cfg.modem
        return cls(port or modem.port, profile or modem.profile, modem.port_role, modem.baudrate, modem.command_timeout)

    def resolve(self) -> tuple[str, str]:
        """(port, profile), discovering the port when it is "auto"."""
        if self.port != "auto":
            return self.port, self.profile
        found = discovery.find_at_port(profiles.PROFILES, self.port_role)
        if found is None:
            raise Unavailable("missing", "no modem found (auto-discovery): check USB cable and power, or name the port with --port")
        return found.devnode, found.profile_name if self.profile == "auto" else self.profile


@contextlib.asynccontextmanager
async def opened_modem(target: ModemTarget) -> AsyncIterator[Modem]:
    """The modem, opened exclusively and answering AT; ``Unavailable`` otherwise."""
    port, profile = target.resolve()
    try:
        modem = await Modem.open(port, profile, baudrate=target.baudrate, command_timeout=target.command_timeout)
    except PortNotFound as exc:
        raise Unavailable("missing", str(exc)) from None
    except PortBusy:
        raise Unavailable("busy", f"{port}: held by another program (is simagent running?)") from None
    try:
        try:
            await modem.client.command("AT", target.command_timeout)
        except CommandTimeout:
            raise Unavailable("silent", f"{port}: no answer to AT (not the modem's AT interface, or the modem hangs)") from None
        except CommandError:
            pass  # an error is an answer: something AT-speaking is there
        yield modem
    except PortLost as exc:
        raise Unavailable("lost", f"the modem went away: {exc}") from None
    finally:
        modem.close()


async def read_status_direct(target: ModemTarget) -> dict[str, Any]:
    async with opened_modem(target) as modem:
        await modem.initialise()
        return await read_modem_status(modem)


def connect_daemon(cfg: Any) -> BlockingControlClient | None:
    try:
        return BlockingControlClient.connect(cfg.control.socket)
    except PermissionError:
        raise Unavailable("daemon", f"{cfg.control.socket}: permission denied: the daemon runs; join its group or use sudo") from None


def obtain_status(cfg: Any, port: str | None = None, profile: str | None = None,
                  state_dir: str | None = None) -> tuple[dict[str, Any], str]:
    """(status document, source): from the daemon when it answers and no port was
    named (source "daemon"), else read directly (source: the port as given) with the
    binding verdict from the state store (``state_dir`` or the configured one) added."""
    if port is None:
        client = connect_daemon(cfg)
        if client is not None:
            with client:
                try:
                    return client.call("status"), DAEMON
                except (ControlError, ConnectionError) as exc:
                    raise Unavailable("daemon", f"the daemon did not answer status: {exc}") from None
    target = ModemTarget.from_config(cfg, port, profile)
    doc = asyncio.run(read_status_direct(target))
    doc["binding"] = read_binding(state_dir or cfg.device.state_dir, BindingPolicy.from_config(cfg.binding), doc)
    return doc, target.port


# -- the sub-commands -------------------------------------------------------------------


def _load_config(args: argparse.Namespace) -> Any | None:
    try:
        return config.load(args.config)
    except config.ConfigError as exc:
        print(f"simagent: {exc}", file=sys.stderr)
        return None


def status_command(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if cfg is None:
        return exitcodes.CONFIG
    try:
        doc, _source = obtain_status(cfg, args.port, args.profile)
    except Unavailable as exc:
        print(f"simagent status: {exc}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    print(json.dumps(doc, indent=2, ensure_ascii=False) if args.json else format_status(doc))
    return exitcodes.OK


class _DirectSession:
    """One modem held open for a series of commands, on an event loop of its own."""

    def __init__(self, target: ModemTarget, on_urc: Callable[[str], None]) -> None:
        self._runner = asyncio.Runner()
        self._stack = contextlib.AsyncExitStack()
        try:
            self._modem = self._runner.run(self._stack.enter_async_context(opened_modem(target)))
        except BaseException:
            self._runner.close()
            raise
        self._modem.client.subscribe_urcs(on_urc)

    def send(self, command: str, unsafe: bool) -> dict[str, Any]:
        return self._runner.run(run_at(self._modem, command, unsafe))

    def close(self) -> None:
        try:
            self._runner.run(self._stack.aclose())
        finally:
            self._runner.close()


class _DaemonSession:
    def __init__(self, client: BlockingControlClient) -> None:
        self._client = client

    def send(self, command: str, unsafe: bool) -> dict[str, Any]:
        try:
            return self._client.call("at", command=command.strip(), unsafe=unsafe)
        except ControlError as exc:
            raise Refused(exc.code, f"daemon: {exc.message}") from None
        except ConnectionError as exc:
            raise Unavailable("daemon", f"the daemon closed the connection: {exc}") from None

    def close(self) -> None:
        self._client.close()


def _exchange(session: _DirectSession | _DaemonSession, command: str, unsafe: bool, urcs: list[str]) -> bool:
    """Sends one line and prints the answer; True when the command succeeded."""
    try:
        check_command(command, unsafe)  # before any I/O, whichever way the command goes
        result = session.send(command, unsafe)
    except Refused as exc:
        print(f"{command.strip()}: {exc}", file=sys.stderr)
        return False
    except CommandTimeout as exc:
        print(f"timeout: {exc}", file=sys.stderr)
        return False
    for line in result["lines"]:
        print(line)
    print(result["final"])
    for urc in urcs:
        print(f"(unsolicited) {urc}")
    urcs.clear()
    sys.stdout.flush()
    return bool(result["ok"])


def _console_lines() -> Iterator[str]:
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("AT> " if interactive else "")
        except EOFError:
            return
        if line.strip().lower() in ("quit", "exit"):
            return
        if line.strip():
            yield line


def at_command(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if cfg is None:
        return exitcodes.CONFIG
    for command in args.commands:  # refuse a one-shot batch before touching the modem
        try:
            check_command(command, args.unsafe)
        except Refused as exc:
            print(f"{command.strip()}: {exc}", file=sys.stderr)
            return exitcodes.CHECK_FAILED
    urcs: list[str] = []
    try:
        client = None if args.port else connect_daemon(cfg)
        session = _DaemonSession(client) if client else _DirectSession(ModemTarget.from_config(cfg, args.port, args.profile), urcs.append)
    except Unavailable as exc:
        print(f"simagent at: {exc}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    failed = False
    try:
        if not args.commands and sys.stdin.isatty():
            print(f"AT console ({'through the daemon' if client else 'direct'}); quit or Ctrl-D ends; writes need --unsafe")
        for command in args.commands or _console_lines():
            failed |= not _exchange(session, command, args.unsafe, urcs)
    except Unavailable as exc:
        print(f"simagent at: {exc}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    finally:
        session.close()
    return exitcodes.CHECK_FAILED if failed else exitcodes.OK


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    profile_names = ["auto", *sorted(profiles.PROFILES)]

    status = subparsers.add_parser(
        "status",
        help="what the box sees: modem, SIM, network, binding",
        description="Through the daemon when it runs; otherwise opens the modem itself. "
        "Exit 0, or 69 when the modem is missing or busy.",
    )
    status.add_argument("--json", action="store_true", help="print the status document as JSON")
    status.add_argument("--port", help="open this AT port directly (path or pyserial URL), even if the daemon runs")
    status.add_argument("--profile", choices=profile_names, help="vendor profile (default: from the configuration)")
    status.set_defaults(func=status_command)

    at = subparsers.add_parser(
        "at",
        help="send AT commands (one-shot or interactive console)",
        description="Sends each CMD and prints the response and final result (exit 1 if one fails), "
        "or reads commands from stdin. Queries are always allowed; write commands need --unsafe; "
        "IMEI-rewrite commands are always refused.",
    )
    at.add_argument("--port", help="open this AT port directly (path or pyserial URL), even if the daemon runs")
    at.add_argument("--unsafe", action="store_true", help="allow commands that change the modem")
    at.add_argument("--profile", choices=profile_names, help="vendor profile (default: from the configuration)")
    at.add_argument("commands", nargs="*", metavar="CMD", help="e.g. AT+CSQ; none: interactive console")
    at.set_defaults(func=at_command)
