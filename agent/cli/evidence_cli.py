"""`simagent evidence export [--since T] [--out FILE]` and
`simagent evidence verify FILE [--pubkey K]` (SPEC §5, §8)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sqlite3
import stat
import sys
from pathlib import Path

from agent import exitcodes
from agent.cli.bind_cli import CliSettings, daemon_call, with_settings
from agent.core.binding import LAST_IMEI_KEY
from agent.core.clock import Clock
from agent.core.evidence import (BUNDLE_MAX_BYTES, KEY_FILE_MAX_BYTES, EvidenceError, load_device_key, parse_public_key,
                                 parse_since, verify_bundle, write_bundle)
from agent.core.files import read_bounded
from agent.core.store import DB_NAME, StoreError, checked_meta, connect_read_only, write_atomically


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    evidence = subparsers.add_parser("evidence", help="export or verify the signed evidence log")
    actions = evidence.add_subparsers(dest="evidence_command", metavar="ACTION", required=True, parser_class=type(evidence))

    export = actions.add_parser("export", help="write a signed JSON bundle of the evidence log")
    export.add_argument("--since", metavar="T", help="an entry number (that entry on) or an ISO-8601 time (the first entry stamped at or after it, and everything later)")
    export.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    export.set_defaults(func=with_settings(export_command))

    add_verify_parser(actions)


def add_verify_parser(actions: argparse._SubParsersAction) -> None:
    """`evidence verify`: also a command of `simagent-platform`, the same verifier."""
    verify = actions.add_parser("verify", help="check a bundle's chain and signature (exit 1 names the broken entry)")
    verify.add_argument("file", metavar="FILE")
    verify.add_argument("--pubkey", metavar="K", help="the device public key: base64 raw, PEM, or a file holding either (default: the key inside the bundle)")
    verify.set_defaults(func=verify_command)


def _write_out(path: Path, data: bytes) -> None:
    """A file is replaced atomically (a crash leaves the old or the new one); anything else
    that is there - a device such as /dev/null, a pipe - is written to, never replaced (as
    root, a rename over /dev/null would put a regular file in its place)."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        regular = True
    if regular:
        write_atomically(path, data)
        return
    with open(path, "wb") as target:
        target.write(data)


def export_command(args: argparse.Namespace, settings: CliSettings) -> int:
    try:
        since = parse_since(args.since) if args.since is not None else None
    except ValueError as exc:
        print(f"simagent: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    bundle = daemon_call(settings, "export_evidence", **({"since": args.since} if args.since else {}))
    if bundle is None:  # no daemon: read the state directly, read-only
        try:
            key = load_device_key(settings.state_dir)  # an export is a read: it creates no key
            bundle = _export_directly(settings, key, since)
        except (EvidenceError, OSError, sqlite3.Error, StoreError) as exc:
            print(f"simagent: {exc}", file=sys.stderr)
            return exitcodes.CHECK_FAILED
    text = json.dumps(bundle, indent=1, ensure_ascii=False) + "\n"
    if args.out:
        _write_out(Path(args.out), text.encode())
        print(f"wrote {len(bundle['entries'])} entries to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return exitcodes.OK


def _export_directly(settings: CliSettings, key, since) -> dict:
    """The bundle from the state database opened read-only: an export never creates,
    migrates or repairs the store (Store.open would)."""
    with contextlib.closing(connect_read_only(settings.state_dir / DB_NAME)) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (LAST_IMEI_KEY,)).fetchone()
        device_id = settings.device_id or (checked_meta(LAST_IMEI_KEY, row[0]) if row else None)
        buffer = io.BytesIO()
        write_bundle(conn, key, buffer, since=since, device_id=device_id,
                     exported_at=(stamp := Clock().now()).iso(), exported_at_trusted=stamp.trusted)
    return json.loads(buffer.getvalue())


def verify_command(args: argparse.Namespace) -> int:
    try:
        bundle = json.loads(read_bounded(args.file, BUNDLE_MAX_BYTES))
    except OSError as exc:
        print(f"simagent: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return exitcodes.USAGE
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, absurd nesting
        print(f"BROKEN: {args.file} is not JSON ({str(exc)[:200]})")
        return exitcodes.CHECK_FAILED
    pubkey = None
    if args.pubkey is not None:
        try:
            text = read_bounded(args.pubkey, KEY_FILE_MAX_BYTES).decode() if os.path.isfile(args.pubkey) else args.pubkey
            pubkey = parse_public_key(text)
        except (OSError, ValueError) as exc:
            print(f"simagent: --pubkey: {exc}", file=sys.stderr)
            return exitcodes.USAGE
    try:
        result = verify_bundle(bundle, pubkey)
    except RecursionError:
        print(f"BROKEN: {args.file} nests its values too deeply to be a bundle")
        return exitcodes.CHECK_FAILED
    print(result.describe())
    return exitcodes.OK if result.ok else exitcodes.CHECK_FAILED
