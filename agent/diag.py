"""`simagent diag`: ordered checks with a one-line actionable hint each, and the support
bundle (SPEC §8).

Functional core, imperative shell: ``gather_facts`` is the one place that looks at the
world (the daemon answers the `diag` op with the same facts from its live state); each
check is a pure function of the ``facts`` dict. A fact that was not gathered makes its
check SKIP with a hint, never a guess. Fact keys:

  modem_found bool · modem_port str · at_ok bool · sim_state ready|absent|locked|error|unknown
  imei str|None · imei_luhn_ok bool · iccid str|None · binding_status ok|no_sim|<violation>
  registration ModemManager word · signal_dbm int|None · broker (``probe_broker`` result)
  clock_trusted bool · disk (``disk_usage`` result) · outbox {"event", "telemetry"}
  outbox_caps {"max_events", "max_telemetry"} · not_checked {check name: why}
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import importlib.metadata
import io
import json
import os
import platform
import re
import socket
import sqlite3
import ssl
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent import __version__, exitcodes
from agent.clock import kernel_clock_synchronised
from agent.store import DB_NAME, Caps, connect_read_only

MiB = 1 << 20
DISK_FAIL_BELOW = 8 * MiB  # SQLite needs room to commit; below this events get lost
DISK_WARN_BELOW = 32 * MiB
OUTBOX_WARN_EVENTS = 1000  # queued events: the link has been down for a while
OUTBOX_FAIL_FRACTION = 0.9  # of the event cap: oldest events are about to be dropped
SIGNAL_WARN_BELOW = -95  # dBm (RSSI): unreliable data
SIGNAL_FAIL_BELOW = -105  # dBm: registration and data mostly fail
EVIDENCE_TAIL = 200  # evidence entries in a support bundle


class Result(enum.StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class Check:
    name: str
    result: Result
    hint: str  # one line: what was seen (PASS) or what to do about it


Verdict = tuple[Result, str]


# -- the checks: pure functions of facts ------------------------------------------------


def _modem_found(f: dict) -> Verdict:
    if f["modem_found"]:
        return Result.PASS, f"AT port {f.get('modem_port', '?')}"
    return Result.FAIL, "no modem AT port: check USB cable and power (lsusb), or name the port with --port"


def _at_answers(f: dict) -> Verdict:
    if f["at_ok"]:
        return Result.PASS, "modem answers AT"
    return Result.FAIL, "no answer to AT: wrong interface (try another ttyUSB), or another program owns the port"


_SIM_HINTS = {
    "absent": (Result.FAIL, "no SIM: insert the card (check tray and orientation), then wait 10 s"),
    "locked": (Result.FAIL, "SIM is PIN-locked: IoT cards must have the PIN disabled; ask the provider"),
    "error": (Result.FAIL, "SIM failure: reseat the card; if it persists the card is damaged"),
}


def _sim_ready(f: dict) -> Verdict:
    state = f["sim_state"]
    if state == "ready":
        return Result.PASS, "SIM ready"
    return _SIM_HINTS.get(state, (Result.WARN, f"SIM state {state}: wait a few seconds and run diag again"))


def _identity(f: dict) -> Verdict:
    imei, iccid = f["imei"], f["iccid"]
    if not imei:
        return Result.FAIL, "IMEI not readable: the modem firmware may be damaged; reflash or replace the module"
    if not iccid:
        return Result.FAIL, "ICCID not readable: reseat the SIM; a card that stays unreadable is faulty"
    if f.get("imei_luhn_ok") is False:
        return Result.WARN, f"IMEI {imei} fails its check digit: it may have been rewritten (report this terminal)"
    return Result.PASS, f"IMEI {imei}, ICCID {iccid}"


_BINDING_HINTS = {
    "bound": (Result.PASS, "card bound to this terminal by this check (first use)"),
    "unbound": (Result.PASS, "card not bound yet: the agent binds it on first use"),
    "no_sim": (Result.WARN, "no SIM, nothing to bind: insert the card"),
    "sim_unreadable": (Result.FAIL, "SIM locked or unreadable: the radio stays off; check the PIN or reseat the card"),
    "imei_unreadable": (Result.FAIL, "IMEI not readable: the radio stays off; check the module"),
    "imei_not_allowed": (Result.FAIL, "this terminal's IMEI is not in [binding] imei_allowlist: fix the list or the device"),
    "iccid_not_allowed": (Result.FAIL, "card outside [binding] iccid_prefixes: use a card of the contracted issuer"),
    "not_provisioned": (Result.FAIL, "no binding for this card: run `simagent bind accept TOKEN` with the platform's token"),
    "iccid_mismatch": (Result.FAIL, "not the card bound to this terminal: put the bound card back, or get a rebind token"),
    "imei_mismatch": (Result.FAIL, "card is bound to another terminal: move it back, or get a rebind token"),
    "state_reset": (Result.WARN, "binding state was lost and re-created: export evidence and tell the platform"),
}


def _binding(f: dict) -> Verdict:
    status = f["binding_status"]
    if status == "ok":
        return Result.PASS, "card and terminal bound as recorded"
    return _BINDING_HINTS.get(status, (Result.WARN, f"binding status {status}: see `simagent bind show`"))


_REGISTRATION_HINTS = {
    "home": (Result.PASS, "registered (home)"),
    "roaming": (Result.PASS, "registered (roaming)"),
    "searching": (Result.WARN, "searching for a network: check the antenna and wait a minute"),
    "denied": (Result.FAIL, "network denied the card: it may be suspended or unbound; contact the provider"),
    "idle": (Result.FAIL, "not registered and not searching: the radio is off (see the binding check)"),
    "home-sms-only": (Result.WARN, "registered for SMS only: no data service; check the card's plan"),
    "roaming-sms-only": (Result.WARN, "registered for SMS only: no data service; check the card's plan"),
    "emergency-only": (Result.FAIL, "emergency calls only: the card is rejected; contact the provider"),
}


def _registered(f: dict) -> Verdict:
    state = f["registration"]
    return _REGISTRATION_HINTS.get(state, (Result.WARN, f"registration {state}: wait a minute and run diag again"))


def _signal(f: dict) -> Verdict:
    dbm = f["signal_dbm"]
    if dbm is None:
        return Result.WARN, "signal strength unknown: check the antenna connection"
    if dbm < SIGNAL_FAIL_BELOW:
        return Result.FAIL, f"{dbm} dBm is too weak: connect/reposition the antenna or move the terminal"
    if dbm < SIGNAL_WARN_BELOW:
        return Result.WARN, f"{dbm} dBm is weak: data may drop; check the antenna"
    return Result.PASS, f"{dbm} dBm"


def _broker(f: dict) -> Verdict:
    probe = f["broker"]
    where = f"{probe['host']}:{probe['port']}"
    if not probe["reachable"]:
        return Result.FAIL, f"cannot reach {where} ({probe['error']}): check data connection, DNS and firewall"
    if probe["tls"] == "failed":
        return Result.FAIL, f"TLS to {where} failed ({probe['error']}): check [mqtt.tls] ca_file and the clock"
    if probe["tls"] == "off":
        return Result.WARN, f"{where} reachable but TLS is off: enable [mqtt.tls]"
    return Result.PASS, f"{where} reachable, TLS verified"


def _clock(f: dict) -> Verdict:
    if f["clock_trusted"]:
        return Result.PASS, "wall clock synchronised"
    return Result.WARN, "wall clock not synchronised: evidence times are marked untrusted; enable NTP"


def _disk(f: dict) -> Verdict:
    disk = f["disk"]
    if "error" in disk:
        return Result.FAIL, f"state directory {disk['path']} unusable: {disk['error']}"
    free = disk["free_bytes"]
    if free < DISK_FAIL_BELOW:
        return Result.FAIL, f"{free // MiB} MiB free in {disk['path']}: events cannot be stored; free space now"
    if free < DISK_WARN_BELOW:
        return Result.WARN, f"{free // MiB} MiB free in {disk['path']}: free some space"
    return Result.PASS, f"{free // MiB} MiB free in {disk['path']}"


def _outbox(f: dict) -> Verdict:
    depth = f["outbox"]
    caps = f.get("outbox_caps") or asdict(Caps())
    events, samples = depth["event"], depth["telemetry"]
    if events >= OUTBOX_FAIL_FRACTION * caps["max_events"]:
        return Result.FAIL, f"{events} events queued, cap {caps['max_events']}: oldest are dropped soon; restore the broker link"
    if events >= OUTBOX_WARN_EVENTS:
        return Result.WARN, f"{events} events waiting: the broker link is down or slow"
    if samples >= caps["max_telemetry"]:
        return Result.WARN, f"telemetry queue full ({samples}): oldest samples are being dropped"
    return Result.PASS, f"{events} events, {samples} telemetry samples queued"


_NOT_READ = "not checked: the modem was not read"


@dataclass(frozen=True)
class CheckSpec:
    name: str
    needs: tuple[str, ...]  # fact keys; any missing makes the check SKIP
    judge: Callable[[dict], Verdict]
    skip_hint: str


CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("modem_found", ("modem_found",), _modem_found, _NOT_READ),
    CheckSpec("at_answers", ("at_ok",), _at_answers, _NOT_READ),
    CheckSpec("sim_ready", ("sim_state",), _sim_ready, _NOT_READ),
    CheckSpec("identity", ("imei", "iccid"), _identity, _NOT_READ),
    CheckSpec("binding", ("binding_status",), _binding, "not checked: needs the modem and the state store"),
    CheckSpec("registered", ("registration",), _registered, _NOT_READ),
    CheckSpec("signal", ("signal_dbm",), _signal, _NOT_READ),
    CheckSpec("broker", ("broker",), _broker, "not checked: no broker configured"),
    CheckSpec("clock", ("clock_trusted",), _clock, "not checked: clock state unknown"),
    CheckSpec("disk", ("disk",), _disk, "not checked: state directory unknown (--state-dir)"),
    CheckSpec("outbox", ("outbox",), _outbox, "not checked: state directory unknown (--state-dir)"),
)


def run_checks(facts: dict[str, Any]) -> list[Check]:
    checks = []
    not_checked = facts.get("not_checked", {})
    for spec in CHECKS:
        if all(key in facts for key in spec.needs):
            result, hint = spec.judge(facts)
        else:
            result, hint = Result.SKIP, not_checked.get(spec.name, spec.skip_hint)
        checks.append(Check(spec.name, result, hint))
    return checks


def exit_code(checks: list[Check]) -> int:
    return exitcodes.CHECK_FAILED if any(c.result is Result.FAIL for c in checks) else exitcodes.OK


def report_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": exit_code(checks) == exitcodes.OK, "checks": [asdict(c) for c in checks]}


def format_table(checks: list[Check]) -> str:
    width = max(len("CHECK"), *(len(c.name) for c in checks))
    lines = [f"{'CHECK':<{width}}  RESULT  HINT"]
    lines += [f"{c.name:<{width}}  {c.result.value:<6}  {c.hint}" for c in checks]
    return "\n".join(lines)


# -- checks that need I/O: parameters in, facts out ---------------------------------------


def disk_usage(path: str | os.PathLike) -> dict[str, Any]:
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return {"path": str(path), "error": exc.strerror or str(exc)}
    # f_bavail: what an unprivileged writer (the service user) can still use.
    return {"path": str(path), "free_bytes": st.f_bavail * st.f_frsize, "total_bytes": st.f_blocks * st.f_frsize}


@dataclass(frozen=True)
class BrokerTarget:
    host: str
    port: int
    tls: bool = True
    ca_file: str | None = None  # None: the system's trusted CAs
    cert_file: str | None = None
    key_file: str | None = None


def broker_target(mqtt: Any) -> BrokerTarget:
    """The broker `[mqtt]` names (config.mqtt or the reporter's settings)."""
    tls = mqtt.tls
    return BrokerTarget(mqtt.host, mqtt.port, tls=tls.enabled, ca_file=tls.ca_file or None,
                        cert_file=tls.cert_file or None, key_file=tls.key_file or None)


def probe_broker(target: BrokerTarget, *, timeout: float = 5.0) -> dict[str, Any]:
    """TCP connect and, with TLS, a verified handshake. Blocking (name resolution is not
    bounded by `timeout`): the daemon runs it in a thread."""
    probe: dict[str, Any] = {"host": target.host, "port": target.port, "reachable": False, "tls": "off", "error": None}
    try:
        raw = socket.create_connection((target.host, target.port), timeout=timeout)
    except OSError as exc:
        probe["error"] = _os_error_text(exc)
        return probe
    probe["reachable"] = True
    with raw:
        if not target.tls:
            return probe
        try:
            context = ssl.create_default_context(cafile=target.ca_file)
            if target.cert_file:
                context.load_cert_chain(target.cert_file, target.key_file)
            with context.wrap_socket(raw, server_hostname=target.host):
                probe["tls"] = "ok"
        except (ssl.SSLError, OSError) as exc:
            probe["tls"], probe["error"] = "failed", _os_error_text(exc)
    return probe


def _os_error_text(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or "certificate verification failed"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc)


def _read_only_db(state_dir: str | os.PathLike) -> sqlite3.Connection:
    """The state database opened read-only: diagnosing must never create, migrate or
    'repair' it (Store.open would record a state_reset for a damaged one)."""
    path = Path(state_dir) / DB_NAME
    if not path.exists():
        raise FileNotFoundError(f"no state database in {state_dir}")
    return connect_read_only(path)


def outbox_depth(state_dir: str | os.PathLike) -> dict[str, int]:
    with contextlib.closing(_read_only_db(state_dir)) as conn:
        rows = conn.execute("SELECT kind, count(*) FROM outbox GROUP BY kind").fetchall()
    return {"event": 0, "telemetry": 0, **dict(rows)}


def evidence_tail(state_dir: str | os.PathLike, count: int = EVIDENCE_TAIL) -> list[dict]:
    with contextlib.closing(_read_only_db(state_dir)) as conn:
        rows = conn.execute("SELECT entry FROM evidence ORDER BY seq DESC LIMIT ?", (count,)).fetchall()
    return [json.loads(entry) for (entry,) in reversed(rows)]


def gather_facts(
    *,
    state_dir: str | os.PathLike | None = None,
    broker: BrokerTarget | None = None,
    read_modem: bool = False,
    config_path: str | None = None,
    port: str | None = None,
) -> dict[str, Any]:
    """Everything diag can learn. With ``read_modem`` the modem facts come from the
    daemon's `status` op when it runs (and no ``port`` is named), else from opening the
    modem like `simagent status` does (``port``, else the configuration's ``[modem] port``
    from ``config_path``); the binding verdict is read-only, from ``state_dir`` or the
    configured state directory."""
    facts: dict[str, Any] = {"clock_trusted": kernel_clock_synchronised(), "not_checked": {}}
    if read_modem:
        facts.update(_modem_facts(config_path, port, state_dir, facts["not_checked"]))
    if state_dir is not None:
        facts["disk"] = disk_usage(state_dir)
        try:
            facts["outbox"] = outbox_depth(state_dir)
        except (OSError, sqlite3.Error) as exc:
            facts["not_checked"]["outbox"] = f"not checked: {exc}"
    if broker is not None:
        facts["broker"] = probe_broker(broker)
    return facts


def _modem_facts(config_path: str | None, port: str | None, state_dir: str | os.PathLike | None,
                 not_checked: dict[str, str]) -> dict[str, Any]:
    # Imported here: agent.status imports this module.
    from agent import config
    from agent.fieldcli import DAEMON, Unavailable, obtain_status
    from agent.status import diag_facts

    try:
        cfg = config.load(config_path)
    except config.ConfigError as exc:
        not_checked.update(dict.fromkeys(("modem_found", "at_answers", "sim_ready", "identity", "binding", "registered", "signal"),
                                         f"not checked: {exc}"))
        return {}
    try:
        doc, source = obtain_status(cfg, port, state_dir=None if state_dir is None else os.fspath(state_dir))
    except Unavailable as exc:
        where = port or cfg.modem.port
        if exc.kind == "missing":
            return {"modem_found": False, "modem_port": where}
        if exc.kind == "daemon":
            not_checked["modem_found"] = f"not checked: {exc}"
            return {}
        return {"modem_found": True, "modem_port": where, "at_ok": False}  # busy, silent or lost
    if doc.get("binding") is None:
        not_checked["binding"] = "not checked: no readable state store"
    return {**diag_facts(doc), "modem_port": "held by the daemon" if source == DAEMON else source}


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
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--state-dir", help="state directory to check (default: the configuration's [device] state_dir)")
    parser.add_argument("--bundle", metavar="FILE", help="also write a support tarball (secrets redacted)")
    parser.add_argument("--port", help="open this AT port directly (path or pyserial URL), even if the daemon runs")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from agent import config  # imported here: agent.config is heavier than diag needs at import

    state_dir, broker = args.state_dir, None
    try:
        cfg = config.load(args.config)
        state_dir = state_dir or cfg.device.state_dir
        broker = broker_target(cfg.mqtt)
    except config.ConfigError:
        pass  # the modem facts name the configuration error
    facts = gather_facts(state_dir=state_dir, broker=broker, read_modem=True, config_path=args.config, port=args.port)
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
        return evidence_tail(state_dir)
    except (OSError, sqlite3.Error):
        return []
