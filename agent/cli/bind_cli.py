"""`simagent bind show | accept TOKEN | reset --reason TEXT` (SPEC §8).

While the daemon runs they go through its control socket, so an accepted token or a
reset is enforced on the modem at once (and the device key stays the daemon's);
otherwise, or with ``--state-dir``, they work directly on the state store. The logic
lives in agent.core.binding / agent.core.tokens, shared by both paths.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import exitcodes
from agent.core import config as config_module, facts
from agent.core.binding import LAST_IMEI_KEY, VIOLATION, reset_bindings
from agent.core.store import Store, StoreError
from agent.core.tokens import accept_token, load_trusted_keys
from agent.service.control import DEFAULT_SOCKET, BlockingControlClient, ControlError

DEFAULT_STATE_DIR = "/var/lib/simagent"
DEFAULT_CONFIG = "/etc/simagent/agent.toml"


class ConfigProblem(Exception):
    pass


@dataclass(frozen=True)
class CliSettings:
    state_dir: Path
    binding: Any | None  # Config.binding when a configuration was loaded
    device_id: str | None  # [device] id when it is a literal (not "imei")
    control_socket: str | None  # the daemon's socket; None: work on state_dir directly


def cli_settings(args: argparse.Namespace) -> CliSettings:
    """The one place the bind/evidence commands look up configuration; --state-dir wins
    over the configuration and means "work on this directory, not through a daemon"."""
    config = None
    path = args.config or os.environ.get("SIMAGENT_CONFIG")
    if path or Path(DEFAULT_CONFIG).exists():
        try:
            config = config_module.load(path or DEFAULT_CONFIG)
        except config_module.ConfigError as exc:  # names the file and the key
            raise ConfigProblem(str(exc)) from exc
    state_dir = args.state_dir or (config.device.state_dir if config else DEFAULT_STATE_DIR)
    device_id = config.device.id if config and config.device.id != "imei" else None
    control_socket = None if args.state_dir else (config.control.socket if config else DEFAULT_SOCKET)
    return CliSettings(Path(state_dir), config.binding if config else None, device_id, control_socket)


class DaemonUnreachable(Exception):
    """The daemon runs but this user may not talk to it."""


def daemon_call(settings: CliSettings, op: str, **args: Any) -> Any | None:
    """The daemon's answer to `op`, or None when no daemon runs (work directly then).
    Raises ControlError for a refusal and DaemonUnreachable without permission."""
    if settings.control_socket is None:
        return None
    try:
        client = BlockingControlClient.connect(settings.control_socket)
    except PermissionError:
        raise DaemonUnreachable(f"{settings.control_socket}: permission denied: the daemon runs; "
                                "join its group or use sudo") from None
    if client is None:
        return None
    with client:
        return client.call(op, **args)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bind = subparsers.add_parser("bind", help="show or change the machine-card binding")
    actions = bind.add_subparsers(dest="bind_command", metavar="ACTION", required=True, parser_class=type(bind))

    show = actions.add_parser("show", help="stored bindings and the last decision (exit 1 on a violation)")
    show.set_defaults(func=with_settings(show_command))

    accept = actions.add_parser("accept", help="apply a signed rebind/unbind token ('-' reads it from stdin)")
    accept.add_argument("token", metavar="TOKEN", help="the signed rebind/unbind token, or - to read it from stdin")
    accept.set_defaults(func=with_settings(accept_command))

    reset = actions.add_parser("reset", help="forget all bindings (root only, audited)")
    reset.add_argument("--reason", required=True, help="why (recorded in the evidence log)")
    reset.set_defaults(func=with_settings(reset_command))


def with_settings(command):
    def run(args: argparse.Namespace) -> int:
        try:
            settings = cli_settings(args)
        except ConfigProblem as exc:
            print(f"simagent: configuration error: {exc}", file=sys.stderr)
            return exitcodes.CONFIG
        try:
            return command(args, settings)
        except DaemonUnreachable as exc:
            print(f"simagent: {exc}", file=sys.stderr)
            return exitcodes.UNAVAILABLE
        except ControlError as exc:
            print(f"simagent: the daemon refused: {exc.message}", file=sys.stderr)
            return exitcodes.CHECK_FAILED
        except StoreError as exc:  # locked, disk full, I/O error: nothing was changed
            print(f"simagent: state store: {exc}", file=sys.stderr)
            return exitcodes.TEMPFAIL
        except ConnectionError as exc:  # the daemon went away, or cut a streamed reply short
            print(f"simagent: {exc}", file=sys.stderr)
            return exitcodes.UNAVAILABLE

    return run


def show_command(args: argparse.Namespace, settings: CliSettings) -> int:
    view = daemon_call(settings, "bind_show")
    if view is None:
        try:
            store = Store.open_read_only(settings.state_dir)
        except StoreError as exc:  # read-only: the daemon records the damage, `bind show` only says it
            print(f"simagent bind show: {exc}", file=sys.stderr)
            return exitcodes.CHECK_FAILED
        try:
            view = facts.binding_view(store, settings.binding)
        except ValueError as exc:  # a trusted key in the configuration is unusable
            print(f"simagent: configuration error: [binding] {exc}", file=sys.stderr)
            return exitcodes.CONFIG
        finally:
            store.close()
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        print(f"mode:          {view['mode'] or 'unknown (no configuration)'}")
        print(f"terminal IMEI: {view['imei'] or 'not read yet'}")
        decision = view["last_decision"]
        if decision:
            detail = f" ({decision['reason']})" if decision.get("reason") else ""
            print(f"last decision: {decision['status']}{detail} at {decision['since']}, ICCID {decision['iccid']}")
        else:
            print("last decision: none since the bindings last changed")
        print(f"bindings:      {len(view['bindings']) or 'none'}")
        for row in view["bindings"]:
            print(f"  ICCID {row['iccid']}  IMEI {row['imei']}  since {row['since']}  ({row['source']})")
        if view["trusted_key_ids"] is not None:
            print(f"trusted keys:  {', '.join(view['trusted_key_ids']) or 'none'}")
    violation = (view["last_decision"] or {}).get("status") == VIOLATION
    return exitcodes.CHECK_FAILED if violation else exitcodes.OK


def accept_command(args: argparse.Namespace, settings: CliSettings) -> int:
    token = sys.stdin.read() if args.token == "-" else args.token
    answer = daemon_call(settings, "bind_accept", token=token)
    if answer is not None:
        if not answer["accepted"]:
            print(f"refused ({answer['code']}): {answer['message']}", file=sys.stderr)
            return exitcodes.CHECK_FAILED
        print(f"accepted: {answer['act']} (applied by the running daemon)")
        return exitcodes.OK
    try:
        keys = load_trusted_keys(settings.binding.trusted_keys if settings.binding else ())
    except ValueError as exc:
        print(f"simagent: configuration error: [binding] {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    store = Store.open(settings.state_dir)
    try:
        result = accept_token(store, token, keys, store.read().get_meta(LAST_IMEI_KEY))
    finally:
        store.close()
    if not result.accepted:
        print(f"refused ({result.code}): {result.message}", file=sys.stderr)
        return exitcodes.CHECK_FAILED
    claims = result.claims
    clock_note = "" if result.time_trusted else " (clock not trusted: expiry judged against the trusted time floor)"
    print(f"accepted: {claims.act} ICCID {claims.iccid} / IMEI {claims.sub}{clock_note}")
    return exitcodes.OK


def reset_command(args: argparse.Namespace, settings: CliSettings) -> int:
    uid = os.geteuid()
    if uid != 0:
        print("simagent: bind reset needs root (run it with sudo; it is recorded with the reason)", file=sys.stderr)
        return exitcodes.CHECK_FAILED
    if not args.reason.strip():
        print("simagent: bind reset: --reason must not be empty", file=sys.stderr)
        return exitcodes.USAGE
    answer = daemon_call(settings, "bind_reset", reason=args.reason)
    if answer is not None:
        count = len(answer["removed"])
    else:
        store = Store.open(settings.state_dir)
        try:
            count = len(reset_bindings(store, args.reason, uid))
        finally:
            store.close()
    print(f"removed {count} binding(s); recorded as 'unbound' with your reason")
    if settings.binding is not None and settings.binding.mode == "first-use":
        print("first-use mode: the card in the tray is bound to this terminal again at the next check "
              "(at once while the daemon runs)")
    return exitcodes.OK
