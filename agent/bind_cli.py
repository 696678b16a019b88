"""`simagent bind show | accept TOKEN | reset --reason TEXT` (SPEC §8).

These work directly on the state store (SQLite WAL allows it while the daemon runs); the
logic lives in agent.binding / agent.tokens so the control socket can call it too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import exitcodes
from agent.binding import LAST_DECISION_KEY, LAST_IMEI_KEY, VIOLATION, binding_rows, reset_bindings
from agent.store import Store
from agent.tokens import accept_token, key_id, load_trusted_keys

DEFAULT_STATE_DIR = "/var/lib/simagent"
DEFAULT_CONFIG = "/etc/simagent/agent.toml"


class ConfigProblem(Exception):
    pass


@dataclass(frozen=True)
class CliSettings:
    state_dir: Path
    binding: Any | None  # Config.binding when a configuration was loaded
    device_id: str | None  # [device] id when it is a literal (not "imei")


def cli_settings(args: argparse.Namespace) -> CliSettings:
    """The one place the bind/evidence commands look up configuration. Uses
    agent.config.load when that module exists; --state-dir wins over the config."""
    config = None
    try:
        config_module = importlib.import_module("agent.config")
    except ModuleNotFoundError as exc:
        if exc.name != "agent.config":
            raise
        config_module = None
    path = args.config or os.environ.get("SIMAGENT_CONFIG")
    if config_module is not None and (path or Path(DEFAULT_CONFIG).exists()):
        try:
            config = config_module.load(path or DEFAULT_CONFIG)
        except Exception as exc:  # the config module's own error names file and key
            raise ConfigProblem(str(exc)) from exc
    state_dir = args.state_dir or (config.device.state_dir if config else DEFAULT_STATE_DIR)
    device_id = config.device.id if config and config.device.id != "imei" else None
    return CliSettings(Path(state_dir), config.binding if config else None, device_id)


def add_state_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", metavar="DIR", help=f"state directory (default: from the configuration, else {DEFAULT_STATE_DIR})")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bind = subparsers.add_parser("bind", help="show or change the machine-card binding")
    actions = bind.add_subparsers(dest="bind_command", metavar="ACTION", required=True, parser_class=type(bind))

    show = actions.add_parser("show", help="stored bindings and the last decision (exit 1 on a violation)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    add_state_dir_argument(show)
    show.set_defaults(func=with_settings(show_command))

    accept = actions.add_parser("accept", help="apply a signed rebind/unbind token ('-' reads it from stdin)")
    accept.add_argument("token", metavar="TOKEN")
    add_state_dir_argument(accept)
    accept.set_defaults(func=with_settings(accept_command))

    reset = actions.add_parser("reset", help="forget all bindings (root only, audited)")
    reset.add_argument("--reason", required=True, help="why (recorded in the evidence log)")
    add_state_dir_argument(reset)
    reset.set_defaults(func=with_settings(reset_command))


def with_settings(command):
    def run(args: argparse.Namespace) -> int:
        try:
            settings = cli_settings(args)
        except ConfigProblem as exc:
            print(f"simagent: configuration error: {exc}", file=sys.stderr)
            return exitcodes.CONFIG
        return command(args, settings)

    return run


def show_command(args: argparse.Namespace, settings: CliSettings) -> int:
    store = Store.open(settings.state_dir)
    try:
        view = binding_view(store, settings.binding)
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


def binding_view(store: Store, binding_config: Any | None) -> dict:
    """What `bind show` reports (also for the control socket)."""
    tx = store.read()
    return {
        "mode": binding_config.mode if binding_config else None,
        "imei": tx.get_meta(LAST_IMEI_KEY),
        "bindings": binding_rows(tx.bindings()),
        "last_decision": tx.get_meta(LAST_DECISION_KEY),
        "trusted_time_floor": tx.time_floor(),
        "trusted_key_ids": [key_id(k.key) for k in load_trusted_keys(binding_config.trusted_keys)] if binding_config else None,
    }


def accept_command(args: argparse.Namespace, settings: CliSettings) -> int:
    token = sys.stdin.read() if args.token == "-" else args.token
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
    store = Store.open(settings.state_dir)
    try:
        removed = reset_bindings(store, args.reason, uid)
    finally:
        store.close()
    print(f"removed {len(removed)} binding(s); recorded as 'unbound' with your reason")
    return exitcodes.OK
