"""`simagent-platform`: the platform side's command line (SPEC §1, §8).

    keygen --out FILE                         an operator key pair; prints its kid and trusted_keys line
    token rebind|unbind|modem-reset|at ...    a signed token the terminal accepts
    send --broker URL --device IMEI NAME ...  one command; waits for its reply (exit 0 ok, 1 refused or none)
    fleet --broker URL                        every terminal's retained status and binding
    watch --broker URL                        the fleet's events as lines (or JSON)
    evidence verify FILE                      the agent's own evidence verifier

Errors are one line on stderr; exit codes as SPEC §8: 0 ok, 1 refused / no reply /
violation found, 2 usage, 69 broker unreachable or the link lost.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from agent import __version__, exitcodes
from agent.cli.parsing import UsageParser, dispatch
from agent.cli.evidence_cli import add_verify_parser
from agent.platform import keys
from agent.platform.errors import PlatformError, UsageError
from agent.platform.fleet import EVENT_SCHEMA, Fleet, Layout, document, event_line, format_table, problem_rank
from agent.platform.link import Link, LinkOptions
from agent.core.operations import PLATFORM, OperationRefused, offered
from agent.service.platform_commands import COMMAND_SCHEMA, MAX_COMMAND_BYTES, RESULT_SCHEMA
from agent.service.reporter import Topics

PROG = "simagent-platform"
BROKER_ENV = "SIMAGENT_BROKER"
DEFAULT_PREFIX = "simagent/{device_id}"


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog=PROG, description="The platform side of simagent: operator keys and tokens, commands to terminals, the fleet view.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=UsageParser)

    keygen = commands.add_parser("keygen", help="create an operator Ed25519 key pair",
                                 description="Write an Ed25519 private key (PEM, mode 0600) to FILE and its public key to FILE.pub; "
                                             "print the key id and the value to add to a terminal's [binding] trusted_keys.")
    keygen.add_argument("--out", required=True, metavar="FILE", help="the private key file to create")
    keygen.add_argument("--force", action="store_true", help="replace FILE and FILE.pub if they exist")
    keygen.add_argument("--json", action="store_true", help="machine-readable output")
    keygen.set_defaults(func=keygen_command)

    token = commands.add_parser("token", help="mint a signed token for one terminal",
                                description="Print a token (JWT, EdDSA) the terminal accepts once: jti random, iat now, exp now + --ttl. "
                                            "rebind makes --iccid the terminal's card, unbind releases it; modem-reset and at authorise "
                                            "those commands.")
    token.add_argument("action", choices=tuple(keys.TOKEN_COMMANDS), metavar="ACTION", help="rebind, unbind, modem-reset or at")
    token.add_argument("--key", required=True, metavar="K", help="the operator private key (from keygen)")
    token.add_argument("--device", required=True, metavar="IMEI", help="the terminal's IMEI (the token's sub)")
    token.add_argument("--iccid", metavar="ICCID", help="the card (rebind and unbind)")
    token.add_argument("--ttl", default="10m", help=f"validity: seconds or with a unit s/m/h/d, at most {keys.MAX_TTL_S // 86400}d (default 10m)")
    token.add_argument("--reason", metavar="TEXT", help="why (kept in the terminal's evidence log)")
    token.set_defaults(func=token_command)

    send = commands.add_parser("send", help="send one command to a terminal and wait for its reply",
                               description="Publish a command on P/cmd and wait for the P/cmd/result with its id; print the reply. "
                                           "Exit 0 when the terminal says ok, 1 when it refuses or no reply comes within --wait. "
                                           "An offline terminal gets the command when it is back (its session keeps it), "
                                           "possibly after send gave up.")
    _broker_arguments(send)
    send.add_argument("--device", required=True, metavar="ID", help="the terminal's device id (its IMEI by default)")
    send.add_argument("name", metavar="NAME", help=", ".join(offered(PLATFORM)))
    send.add_argument("args", nargs="*", metavar="KEY=VALUE", help="arguments, e.g. interval=60 or command=AT+CSQ (a JSON value or text)")
    send.add_argument("--token", metavar="T", help="the signed token (rebind, unbind, modem_reset, a writing at), or a file holding it")
    send.add_argument("--wait", type=_positive, default=30.0, metavar="S", help="seconds to wait for the reply (default 30)")
    send.add_argument("--json", action="store_true", help="print the reply as one JSON line")
    send.set_defaults(func=send_command)

    fleet = commands.add_parser("fleet", help="every terminal's online status and binding, problems first",
                                description="Read the retained P/status and P/state of every terminal under --prefix and print a table "
                                            "(violations first, then offline, then bindings that are not ok). Exit 1 when a terminal "
                                            "reports a binding violation or publishes documents that are not valid.")
    _broker_arguments(fleet)
    fleet.add_argument("--settle", type=_positive, default=0.5, metavar="S", help="end when nothing new came for S seconds (default 0.5)")
    fleet.add_argument("--json", action="store_true", help="a JSON list of rows")
    fleet.set_defaults(func=fleet_command)

    watch = commands.add_parser("watch", help="follow the fleet's events",
                                description="Print every event terminals publish on P/events, one line each, until interrupted.")
    _broker_arguments(watch)
    watch.add_argument("--device", metavar="ID", help="only this terminal")
    watch.add_argument("--type", action="append", metavar="TYPE", help="only events of this type (repeatable)")
    watch.add_argument("--count", type=int, metavar="N", help="exit after N events")
    watch.add_argument("--json", action="store_true", help="one JSON object per line ({device, ...the event})")
    watch.set_defaults(func=watch_command)

    evidence = commands.add_parser("evidence", help="verify a terminal's evidence bundle")
    actions = evidence.add_subparsers(dest="evidence_command", metavar="ACTION", required=True, parser_class=UsageParser)
    add_verify_parser(actions)
    return parser


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected 0 < S <= 3600, got {text!r}")
    return value


def _broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", default=os.environ.get(BROKER_ENV), metavar="URL",
                        help=f"mqtts://HOST[:PORT] (TLS, 8883) or mqtt://HOST[:PORT] (plain, 1883); default ${BROKER_ENV}")
    parser.add_argument("--ca-file", metavar="FILE", help="CA bundle for the broker certificate (default: the system store)")
    parser.add_argument("--cert-file", metavar="FILE", help="client certificate (mutual TLS)")
    parser.add_argument("--key-file", metavar="FILE", help="client certificate key")
    parser.add_argument("--username", help="MQTT user name")
    parser.add_argument("--password-file", metavar="FILE", help="file holding the MQTT password")
    parser.add_argument("--protocol", choices=("5", "3.1.1"), default="5", help="MQTT version (default 5, falling back to 3.1.1 when refused)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"the terminals' [mqtt] topic_prefix (default {DEFAULT_PREFIX})")
    parser.add_argument("--timeout", type=_positive, default=10.0, metavar="S", help="seconds to wait for the broker (default 10)")


def _link(args: argparse.Namespace) -> Link:
    if not args.broker:
        raise UsageError(f"--broker URL is required (or set ${BROKER_ENV})")
    return Link(LinkOptions.parse(args.broker, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
                                  username=args.username, password_file=args.password_file, protocol=args.protocol,
                                  timeout=args.timeout)).connect()


def _layout(args: argparse.Namespace) -> Layout:
    try:
        return Layout(args.prefix)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# -- keygen, token ------------------------------------------------------------------------
def keygen_command(args: argparse.Namespace) -> int:
    pair = keys.generate(Path(args.out), force=args.force)
    if args.json:
        print(json.dumps({"private_key": str(pair.private_path), "public_key": str(pair.public_path), "kid": pair.kid,
                          "trusted_key": pair.trusted_keys_value}))
        return exitcodes.OK
    print(f"wrote {pair.private_path} (private, 0600: keep it secret) and {pair.public_path}")
    print(f"kid: {pair.kid}")
    print("add to each terminal's /etc/simagent/agent.toml, [binding] section:")
    print(f'trusted_keys = ["{pair.trusted_keys_value}"]')
    return exitcodes.OK


def token_command(args: argparse.Namespace) -> int:
    key = keys.load_private_key(Path(args.key))
    token = keys.mint(key, keys.TOKEN_COMMANDS[args.action], args.device, iccid=args.iccid,
                      ttl_s=keys.parse_ttl(args.ttl), reason=args.reason)
    print(token)
    return exitcodes.OK


# -- send -------------------------------------------------------------------------------------
def build_command(name: str, pairs: list[str], token: str | None) -> dict[str, Any]:
    """The command document, checked as the agent will check it (its own tables)."""
    vocabulary = offered(PLATFORM)
    operation = vocabulary.get(name)
    if operation is None:
        raise UsageError(f"unknown command {name[:64]!r} (known: {', '.join(vocabulary)})")
    arguments: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"expected KEY=VALUE, got {pair[:80]!r}")
        try:
            arguments[key] = json.loads(text)
        except ValueError:
            arguments[key] = text
    try:
        operation.check_args(arguments)
    except OperationRefused as exc:
        raise UsageError(exc.message) from None
    if operation.needs_token(arguments) and not token:
        raise UsageError(f"{name} needs --token (simagent-platform token ...)")
    command = {"schema": COMMAND_SCHEMA, "id": f"p-{secrets.token_hex(8)}", "name": name, "args": arguments}
    if token:
        command["token"] = token
    return command


def _token_text(value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isfile(value):
        try:
            return Path(value).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--token: cannot read {value}: {getattr(exc, 'strerror', None) or type(exc).__name__}") from None
    return value.strip()


def send_command(args: argparse.Namespace) -> int:
    command = build_command(args.name, args.args, _token_text(args.token))
    payload = json.dumps(command)
    if len(payload) > MAX_COMMAND_BYTES:
        raise UsageError(f"the command is {len(payload)} bytes, terminals take at most {MAX_COMMAND_BYTES}")
    topics = Topics.for_device(args.prefix, args.device)
    link = _link(args)
    try:
        link.subscribe([topics.cmd_result])
        link.publish(topics.cmd, payload)
        reply = _wait_reply(link, topics.cmd_result, command["id"], args.wait)
    finally:
        link.close()
    if reply is None:
        raise PlatformError(f"no reply from {args.device} within {args.wait:g} s (offline? see `{PROG} fleet`)")
    print(json.dumps(reply) if args.json else json.dumps(reply, indent=2))
    if reply.get("ok") is True:
        return exitcodes.OK
    error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
    print(f"{PROG}: {args.device} refused {args.name}: {error.get('code')}: {error.get('message')}"[:300], file=sys.stderr)
    return exitcodes.CHECK_FAILED


def _wait_reply(link: Link, topic: str, request_id: str, wait: float) -> dict | None:
    deadline = time.monotonic() + wait
    while (remaining := deadline - time.monotonic()) > 0:
        message = link.next_message(remaining)
        if message is None or message.topic != topic:
            continue
        reply = document(message.payload, RESULT_SCHEMA)
        if reply is not None and reply.get("id") == request_id and isinstance(reply.get("ok"), bool):
            return reply
    return None


# -- fleet, watch -----------------------------------------------------------------------------
def fleet_command(args: argparse.Namespace) -> int:
    layout = _layout(args)
    fleet = Fleet(layout)
    link = _link(args)
    try:
        link.subscribe(layout.filters("status", "state"))
        # Retained messages follow the SUBACK; MQTT marks no end, so: until a quiet spell.
        while (message := link.next_message(args.settle)) is not None:
            fleet.take(message.topic, message.payload)
    finally:
        link.close()
    rows = fleet.rows()
    if args.json:
        print(json.dumps(rows, indent=1))
    elif rows:
        print(format_table(rows))
    else:
        print(f"no terminal has published under {layout.wildcard.prefix}")
    return exitcodes.CHECK_FAILED if any(problem_rank(r) == 0 for r in rows) else exitcodes.OK


def watch_command(args: argparse.Namespace) -> int:
    layout = _layout(args)
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    link = _link(args)
    shown = 0
    try:
        link.subscribe(layout.filters("events"))
        print(f"{PROG}: watching {layout.wildcard.events}", file=sys.stderr, flush=True)
        while args.count is None or shown < args.count:
            message = link.next_message(1.0)
            where = layout.split(message.topic) if message is not None else None
            if where is None or (args.device and where[0] != args.device):
                continue
            event = document(message.payload, EVENT_SCHEMA)
            if event is None:
                print(f"{PROG}: {where[0][:64]!r}: an event that is not a {EVENT_SCHEMA} JSON object", file=sys.stderr)
                continue
            if args.type and event.get("type") not in args.type:
                continue
            print(json.dumps({"device": where[0], **event}) if args.json else event_line(where[0], event), flush=True)
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        link.close()
    return exitcodes.OK


def main(argv: list[str] | None = None) -> int:
    try:
        return dispatch(build_parser(), argv)
    except PlatformError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `| head`
        sys.stderr.close()
        return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
