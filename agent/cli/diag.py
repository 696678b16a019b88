"""`simagent diag`: the checks of ``agent.core.checks`` over the facts it gathers, the modem's
read like `simagent status` does, as a table or JSON; and the support bundle (SPEC §8).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import platform
import re
import sqlite3
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from agent import __version__
from agent.core import config, facts as facts_module
from agent.core.checks import Check, broker_target, exit_code, gather_facts, report_json, run_checks
from agent.cli.fieldcli import DAEMON, Unavailable, obtain_status
from agent.core.store import StoreError

EVIDENCE_TAIL = 200  # evidence entries in a support bundle


def format_table(checks: list[Check]) -> str:
    width = max(len("CHECK"), *(len(c.name) for c in checks))
    lines = [f"{'CHECK':<{width}}  RESULT  HINT"]
    lines += [f"{c.name:<{width}}  {c.result.value:<6}  {c.hint}" for c in checks]
    return "\n".join(lines)


def _modem_facts(config_path: str | None, port: str | None, state_dir: str | os.PathLike | None,
                 not_checked: dict[str, str]) -> dict[str, Any]:
    try:
        cfg = config.load(config_path)
    except config.ConfigError as exc:
        not_checked.update(dict.fromkeys(("modem_found", "at_answers", "sim_ready", "identity", "binding", "registered", "signal"),
                                         f"not checked: {exc}"))
        return {}
    try:
        doc, source, store_problem = obtain_status(cfg, port, state_dir=None if state_dir is None else os.fspath(state_dir))
    except Unavailable as exc:
        where = port or cfg.modem.port
        if exc.kind == "missing":
            return {"modem_found": False, "modem_port": where}
        if exc.kind == "daemon":
            not_checked["modem_found"] = f"not checked: {exc}"
            return {}
        return {"modem_found": True, "modem_port": where, "at_ok": False, "at_problem": exc.kind}  # busy, silent, lost
    if store_problem is not None:
        not_checked["binding"] = f"not checked: state store: {store_problem}"
    elif doc.get("binding") is None:
        not_checked["binding"] = "not checked: no state store yet"
    found = facts_module.diag_facts(doc)
    if source == DAEMON and found.get("modem_found"):
        found["modem_port"] = f"{found.get('modem_port') or '?'} (held by the daemon)"
    return found


# -- redaction and the support bundle ----------------------------------------------------

REDACTED = "[redacted]"
# A field holding a secret: the name is, or ends in, one of these words.
_SECRET_NAME = r"(?:[\w.-]*[_.-])?(?:password|passwd|pass|passphrase|secret|token|key|psk|pin|puk|credentials?)"
_SECRET_NAME_RE = re.compile(rf"^{_SECRET_NAME}$", re.IGNORECASE)
# Public PEM material is useful for support; every other PEM block is key material.
_PUBLIC_PEM = {"CERTIFICATE", "PUBLIC KEY", "X509 CRL", "CERTIFICATE REQUEST"}
_PEM_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?(?:-----END \1-----|\Z)", re.DOTALL)
_JWT_RE = re.compile(r"\beyJ[\w-]*\.[\w-]+\.[\w-]*")
_FIELD_VALUE = "|".join(
    (r'"""[\s\S]*?"""', r"'''[\s\S]*?'''", r'"(?:[^"\\\n]|\\.)*"', r"'[^'\n]*'", r"[^\s,;}\]]+")
)
_FIELD_RE = re.compile(rf"""(?P<name>["']?\b{_SECRET_NAME}\b["']?\s*[=:]\s*)(?:{_FIELD_VALUE})""", re.IGNORECASE)
# AT commands whose arguments are PINs, passwords or APN credentials.
_AT_SECRET_RE = re.compile(r"(\bAT\s*[+^$#]?(?:CPIN2?|CPWD|CLCK|CGAUTH|QICSGP|CSTT|MIPCALL|SICS|CNCFG)\s*=)[^\r\n]*", re.IGNORECASE)


def redact_text(text: str) -> str:
    """Removes secrets from free text: key PEM blocks, JWTs, `name = value` / `"name": value`
    fields named like secrets, and the arguments of AT commands that carry PINs or
    passwords. Errs towards removing too much."""
    text = _PEM_RE.sub(lambda m: m.group(0) if m.group(1) in _PUBLIC_PEM else f"-----BEGIN {m.group(1)}----- {REDACTED}", text)
    text = _JWT_RE.sub(REDACTED, text)
    text = _AT_SECRET_RE.sub(lambda m: m.group(1) + REDACTED, text)
    return _FIELD_RE.sub(_redact_field, text)


def _redact_field(match: re.Match) -> str:
    quoted = match.group(0)[len(match.group("name")) :].startswith(("'", '"'))
    return match.group("name") + (f'"{REDACTED}"' if quoted else REDACTED)  # keeps JSON/TOML parseable


def redact_value(value: Any) -> Any:
    """Redacts a JSON-like value: secret-named keys lose their value, strings are
    cleaned by ``redact_text``."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_NAME_RE.match(str(k)) else redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def collect_versions() -> dict[str, str]:
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
) -> Path:
    """Writes a support tarball (tar.gz, mode 0600). Every member is redacted here, so a
    caller cannot forget to; the evidence keeps IMEI/ICCID, which support needs."""
    members = {
        "config.toml": redact_text(config_text) if config_text is not None else "# no configuration file\n",
        "evidence-tail.jsonl": "".join(json.dumps(redact_value(e), ensure_ascii=False) + "\n" for e in evidence_tail),
        "at-transcript.txt": redact_text(transcript),
        "versions.json": json.dumps(redact_value(versions), indent=2) + "\n",
        "diag.json": json.dumps(redact_value(diag_result), indent=2, ensure_ascii=False) + "\n",
    }
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
    facts.update(_modem_facts(args.config, args.port, state_dir, facts["not_checked"]))
    checks = run_checks(facts)
    report = report_json(checks)
    print(json.dumps(report, indent=2) if args.json else format_table(checks))
    if args.bundle:
        written = write_bundle(
            args.bundle,
            config_text=_read_config_text(args.config),
            evidence_tail=_evidence_tail_or_empty(state_dir),
            transcript="",  # the AT transcript comes with the modem layer
            versions=collect_versions(),
            diag_result={**report, "facts": facts},
        )
        print(f"support bundle written to {written}", file=sys.stderr)
    return exit_code(checks)


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
