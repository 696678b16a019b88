"""`simagent status` and `simagent at`: the field technician's view of the modem (SPEC §8).

While the daemon runs it owns the AT port (TIOCEXCL), so both commands go through its
control socket; otherwise they open the modem themselves (``--port``, else ``[modem]
port``, "auto" = udev discovery). ``--port`` always means "open this port directly".

Which AT commands may be sent is `agent.core.at_rules`; this module applies it before any
I/O, and the daemon applies it again (with the radio gate's rule) on its side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.core import config
from agent import exitcodes
from agent.core.at_rules import Refused, at_result, check_command
from agent.service.control import BlockingControlClient, ControlError
from agent.core.facts import (ANSWERING, LIVE, MISSING, NOT_ANSWERING, NOT_READ, SECTIONS, modem_link, read_binding, read_modem_status,
                              source)
from agent.cli.status import format_status
from agent.core.store import StoreDamaged, StoreError
from at_commands import discovery, profiles
from at_commands.client import CommandError, CommandTimeout, PortBusy, PortLost, PortNotFound, Transcript
from at_commands.commands import is_abortable
from at_commands.modem import Modem
from at_commands.transcript import Recorder

# Slow commands (an operator scan, AT+COPS=?) take minutes; same bound as the daemon's op.
AT_TIMEOUT = 180.0
DAEMON = "daemon"
# This process's own AT traffic when it opens the modem directly (a support bundle's).
DIRECT_TRANSCRIPT = Transcript()


async def run_at(modem: Modem, command: str, unsafe: bool, timeout: float = AT_TIMEOUT) -> dict[str, Any]:
    """Checks and sends one command line; raises ``Refused``, ``CommandTimeout`` or
    ``PortLost``. The daemon's `at` op handler maps ``Refused.code`` to a ControlError."""
    check_command(command, unsafe)
    line = command.strip()
    return at_result(await modem.client.command(line, timeout, check=False, abortable=is_abortable(line)))


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
    def from_config(cls, cfg: config.Config, port: str | None = None, profile: str | None = None) -> "ModemTarget":
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
async def opened_modem(target: ModemTarget, recorder: Recorder | None = None) -> AsyncIterator[Modem]:
    """The modem, opened exclusively and answering AT; ``Unavailable`` otherwise.
    ``recorder``: gets the session's AT transcript, from the first ``AT`` on."""
    port, profile = target.resolve()
    try:
        modem = await Modem.open(port, profile, baudrate=target.baudrate, command_timeout=target.command_timeout)
    except PortNotFound as exc:
        raise Unavailable("missing", str(exc)) from None
    except PortBusy:
        raise Unavailable("busy", f"{port}: held by another program (is simagent running?)") from None
    modem.client.transcript = DIRECT_TRANSCRIPT
    modem.client.record(recorder)
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


async def read_status_direct(target: ModemTarget, recorder: Recorder | None = None) -> dict[str, Any]:
    async with opened_modem(target, recorder) as modem:
        await modem.identify()  # not initialise(): a read changes no setting (SPEC §3: no NV write)
        async with modem.numeric_errors():
            doc = await read_modem_status(modem)
    now = time.time()
    doc["modem"]["port"] = modem.client.port
    doc["modem_link"] = modem_link(ANSWERING, modem.client.port)
    doc["freshness"] = {section: source(LIVE, now, now) for section in SECTIONS}
    return doc


def connect_daemon(cfg: config.Config) -> BlockingControlClient | None:
    try:
        return BlockingControlClient.connect(cfg.control.socket)
    except PermissionError:
        raise Unavailable("daemon", f"{cfg.control.socket}: permission denied: the daemon runs; join its group or use sudo") from None


def obtain_status(cfg: config.Config, port: str | None = None, profile: str | None = None,
                  state_dir: str | None = None, recorder: Recorder | None = None
                  ) -> tuple[dict[str, Any], str, StoreError | None]:
    """(status document, source, store problem): from the daemon when it answers and no
    port was named (source "daemon"), else read directly (source: the port as given) with
    the binding verdict from the state store (``state_dir`` or the configured one) added;
    a store that is damaged or cannot be read leaves the verdict null and is returned for
    the caller to report (nothing is repaired by looking). ``recorder`` gets the AT
    transcript of a direct read."""
    if port is None:
        client = connect_daemon(cfg)
        if client is not None:
            with client:
                try:
                    return client.call("status"), DAEMON, None
                except (ControlError, ConnectionError) as exc:
                    raise Unavailable("daemon", f"the daemon did not answer status: {exc}") from None
    target = ModemTarget.from_config(cfg, port, profile)
    doc = asyncio.run(read_status_direct(target, recorder))
    try:
        doc["binding"] = read_binding(state_dir or cfg.device.state_dir, cfg.binding.policy(), doc)
        if doc["binding"] is None:  # no state store yet: nothing is known about the binding
            doc["freshness"]["binding"] = source(NOT_READ, None, 0.0)
    except StoreError as exc:
        doc["binding"] = None
        doc["freshness"]["binding"] = source(NOT_READ, None, 0.0)
        return doc, target.port, exc
    return doc, target.port, None


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
        doc, _source, store_problem = obtain_status(cfg, args.port, args.profile, state_dir=args.state_dir)
    except Unavailable as exc:
        print(f"simagent status: {exc}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    via = "held by the daemon" if _source == DAEMON else "opened directly"
    print(json.dumps(doc, indent=2, ensure_ascii=False) if args.json else format_status(doc, via=via))
    if (doc.get("modem_link") or {}).get("state") in (MISSING, NOT_ANSWERING):  # SPEC §8: 69, said first
        return exitcodes.UNAVAILABLE
    if isinstance(store_problem, StoreDamaged):  # SPEC §8: a check failed; the daemon records the reset
        print(f"simagent status: the state store is damaged, binding unknown: {store_problem}", file=sys.stderr)
        return exitcodes.CHECK_FAILED
    if store_problem is not None:  # locked, I/O error: nothing was changed
        print(f"simagent status: the state store cannot be read now: {store_problem}", file=sys.stderr)
        return exitcodes.TEMPFAIL
    return exitcodes.OK


class _DirectSession:
    """One modem held open for a series of commands, on an event loop of its own."""

    def __init__(self, target: ModemTarget, on_urc: Callable[[str], None], recorder: Recorder | None = None) -> None:
        self._runner = asyncio.Runner()
        self._stack = contextlib.AsyncExitStack()
        try:
            self._modem = self._runner.run(self._stack.enter_async_context(opened_modem(target, recorder)))
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
    def __init__(self, client: BlockingControlClient, recorder: Recorder | None = None) -> None:
        self._client = client
        self._recorder = recorder  # the daemon's answers (its URCs do not come this way)

    def send(self, command: str, unsafe: bool) -> dict[str, Any]:
        try:
            result = self._client.call("at", command=command.strip(), unsafe=unsafe)
            if self._recorder is not None:
                self._recorder.exchange(command, result["lines"], result["final"])
            return result
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
    """The console's lines; at a terminal with line editing and history (readline), and
    Ctrl-D or Ctrl-C at the prompt end it cleanly on a line of its own."""
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (input() edits lines and keeps history once it is loaded)
    while True:
        try:
            line = input("AT> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print()  # the shell prompt starts on a line of its own
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
            others = len(args.commands) - 1
            nothing = f"; nothing was sent (a batch is checked whole before any of its {others + 1} commands goes out)" if others else ""
            print(f"{command.strip()}: {exc}{nothing}", file=sys.stderr)
            return exitcodes.CHECK_FAILED
    urcs: list[str] = []
    recorder = None
    try:
        client = None if args.port else connect_daemon(cfg)
        if args.record:
            recorder = Recorder(args.record, port=DAEMON if client else (args.port or cfg.modem.port), tool="simagent at")
        session = (_DaemonSession(client, recorder) if client else
                   _DirectSession(ModemTarget.from_config(cfg, args.port, args.profile), urcs.append, recorder))
    except OSError as exc:
        print(f"simagent at: --record: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    except Unavailable as exc:
        if recorder is not None:
            recorder.close()
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
        if recorder is not None:
            recorder.close()
    return exitcodes.CHECK_FAILED if failed else exitcodes.OK


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    profile_names = ["auto", *sorted(profiles.PROFILES)]

    status = subparsers.add_parser(
        "status",
        help="what the box sees: modem, SIM, network, binding",
        description="Through the daemon when it runs; otherwise opens the modem itself. "
        "Exit 0, or 69 when the modem is missing or busy.",
    )
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
    at.add_argument("--record", metavar="FILE",
                    help="save the session's AT transcript to FILE (secrets redacted; "
                    "simagent-fakemodem --replay FILE serves it)")
    at.add_argument("commands", nargs="*", metavar="CMD", help="e.g. AT+CSQ; none: interactive console")
    at.set_defaults(func=at_command)
