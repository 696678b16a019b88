"""`simagent diag`: the checks of ``agent.core.checks`` over the facts it gathers, the modem's
read like `simagent status` does, as a table or JSON; and the support bundle (SPEC §8).

`simagent run` builds the whole command parser, so this module is imported by the daemon
too: what only the bundle needs (tarfile, importlib.metadata, platform) is imported when a
bundle is written, not here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from agent import __version__
from agent.core import config, facts as facts_module
from agent.core.checks import Check, broker_target, exit_code, gather_facts, report_json, run_checks
from agent.cli.fieldcli import DAEMON, DIRECT_TRANSCRIPT, Unavailable, connect_daemon, obtain_status
from agent.service.control import ControlError
from agent.core.redact import redact_text, redact_value
from agent.core.store import StoreError
from at_commands.transcript import Recorder

EVIDENCE_TAIL = 200  # evidence entries in a support bundle


def format_table(checks: list[Check]) -> str:
    width = max(len("CHECK"), *(len(c.name) for c in checks))
    lines = [f"{'CHECK':<{width}}  RESULT  HINT"]
    lines += [f"{c.name:<{width}}  {c.result.value:<6}  {c.hint}" for c in checks]
    return "\n".join(lines)


def _modem_facts(config_path: str | None, port: str | None, state_dir: str | os.PathLike | None,
                 not_checked: dict[str, str], recorder: Recorder | None = None) -> tuple[dict[str, Any], str | None]:
    """(modem facts, where they came from: DAEMON, the port, or None when not read);
    ``recorder`` gets the AT transcript of a direct read."""
    try:
        cfg = config.load(config_path)
    except config.ConfigError as exc:
        not_checked.update(dict.fromkeys(("modem_found", "at_answers", "sim_ready", "identity", "binding", "registered", "signal"),
                                         f"not checked: {exc}"))
        return {}, None
    try:
        doc, source, store_problem = obtain_status(cfg, port, state_dir=None if state_dir is None else os.fspath(state_dir),
                                                   recorder=recorder)
    except Unavailable as exc:
        where = port or cfg.modem.port
        if exc.kind == "missing":
            return {"modem_found": False, "modem_port": where}, None
        if exc.kind == "daemon":
            not_checked["modem_found"] = f"not checked: {exc}"
            return {}, None
        return {"modem_found": True, "modem_port": where, "at_ok": False, "at_problem": exc.kind}, where  # busy, silent, lost
    if store_problem is not None:
        not_checked["binding"] = f"not checked: state store: {store_problem}"
    elif doc.get("binding") is None:
        not_checked["binding"] = "not checked: no state store yet"
    found = facts_module.diag_facts(doc)
    if source == DAEMON and found.get("modem_found"):
        found["modem_port"] = f"{found.get('modem_port') or '?'} (held by the daemon)"
    return found, source


# -- the support bundle ------------------------------------------------------------------

def collect_versions() -> dict[str, str]:
    import importlib.metadata
    import platform

    versions = {"simagent": __version__, "python": platform.python_version(), "kernel": platform.release(), "machine": platform.machine()}
    for package in ("pyserial", "pyudev", "paho-mqtt", "cryptography", "PyJWT"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


def write_bundle(
    path: str | os.PathLike,
    *,
    config_text: str | None,
    evidence_tail: list[dict],
    transcript: str,
    versions: dict[str, Any],
    diag_result: dict[str, Any],
    replayable: str | None = None,
) -> Path:
    """Writes a support tarball (tar.gz, mode 0600). Every member is redacted here, so a
    caller cannot forget to; the evidence keeps IMEI/ICCID, which support needs.
    ``replayable``: the same traffic as a simagent/at-transcript/1 (at-transcript.jsonl)."""
    import tarfile

    members = {
        "config.toml": redact_text(config_text) if config_text is not None else "# no configuration file\n",
        "evidence-tail.jsonl": "".join(json.dumps(redact_value(e), ensure_ascii=False) + "\n" for e in evidence_tail),
        "at-transcript.txt": redact_text(transcript),
        "versions.json": json.dumps(redact_value(versions), indent=2) + "\n",
        "diag.json": json.dumps(redact_value(diag_result), indent=2, ensure_ascii=False) + "\n",
    }
    if replayable is not None:
        members["at-transcript.jsonl"] = redact_text(replayable)
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    now = time.time()
    with os.fdopen(fd, "wb") as file, tarfile.open(fileobj=file, mode="w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"simagent-support/{name}")
            info.size, info.mtime, info.mode = len(data), now, 0o600
            tar.addfile(info, io.BytesIO(data))
    return path


# -- the sub-command ----------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diag", help="run diagnostic checks", description="Ordered checks, each PASS, WARN, FAIL or SKIP with a one-line hint; exit 1 on any FAIL."
    )
    parser.add_argument("--bundle", metavar="FILE", help="also write a support tarball (secrets redacted)")
    parser.add_argument("--port", help="open this AT port directly (path or pyserial URL), even if the daemon runs")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    state_dir, broker = args.state_dir, None
    try:
        cfg = config.load(args.config)
        state_dir = state_dir or cfg.device.state_dir
        broker = broker_target(cfg.mqtt)
    except config.ConfigError:
        pass  # the modem facts name the configuration error
    facts = gather_facts(state_dir=state_dir, broker=broker)
    # The replayable transcript (simagent-fakemodem --replay) of diag's own read of the modem.
    at_log = io.StringIO()
    recorder = Recorder(at_log, port=args.port or "configured", tool="simagent diag") if args.bundle else None
    modem_facts, source = _modem_facts(args.config, args.port, state_dir, facts["not_checked"], recorder)
    facts.update(modem_facts)
    checks = run_checks(facts)
    report = report_json(checks)
    print(json.dumps(report, indent=2) if args.json else format_table(checks))
    if args.bundle:
        transcript, daemon_replayable = _at_transcript(args.config, through_daemon=source == DAEMON)
        written = write_bundle(
            args.bundle,
            config_text=_read_config_text(args.config),
            evidence_tail=_evidence_tail_or_empty(state_dir),
            transcript=transcript,
            versions=collect_versions(),
            diag_result={**report, "facts": facts},
            replayable=daemon_replayable if source == DAEMON else at_log.getvalue(),
        )
        print(f"support bundle written to {written}", file=sys.stderr)
    return exit_code(checks)


def _at_transcript(config_path: str | None, *, through_daemon: bool) -> tuple[str, str | None]:
    """The recent AT traffic: the daemon's ring (redacted there) when it holds the modem,
    else this process's own exchange with it; and the daemon's replayable transcript
    (None when not through the daemon or not had)."""
    lines = DIRECT_TRANSCRIPT.lines()
    replayable = None
    if through_daemon:
        try:
            client = connect_daemon(config.load(config_path))
            if client is not None:
                with client:
                    answer = client.call("at_transcript")
                lines, replayable = answer["lines"], answer.get("transcript")
        except (config.ConfigError, Unavailable, ControlError, ConnectionError, OSError) as exc:
            return f"# the daemon's AT transcript could not be read: {exc}\n", None
    return "".join(line + "\n" for line in lines) or "# no AT traffic recorded\n", replayable


def _read_config_text(config: str | None) -> str | None:
    path = config or os.environ.get("SIMAGENT_CONFIG") or "/etc/simagent/agent.toml"
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _evidence_tail_or_empty(state_dir: str | None) -> list[dict]:
    if state_dir is None:
        return []
    try:
        return facts_module.evidence_tail(state_dir, EVIDENCE_TAIL)
    except (OSError, sqlite3.Error, StoreError):
        return []
