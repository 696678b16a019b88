"""The diagnosis: ordered checks with a one-line actionable hint each (SPEC §8), and the
facts they judge that need no modem. Used by the daemon's `diag` op and by `simagent
diag` (agent.cli.diag, the CLI, which adds the modem facts it reads itself).

Functional core, imperative shell: ``gather_facts`` looks at the world (state directory,
broker, clock); each check is a pure function of the ``facts`` dict. A fact that was
not gathered makes its check SKIP with a hint, never a guess. Fact keys:

  modem_found bool · modem_port str · at_ok bool · at_problem busy|hung|silent|lost · at_detail str
  cfun int|None · sim_state ready|absent|locked|error|unknown
  imei str|None · imei_luhn_ok bool · iccid str|None · binding_status ok|no_sim|<violation>
  registration ModemManager word · signal_dbm int|None · signal_measure (default rssi)
  broker (``probe_broker`` result)
  clock_trusted bool · disk (``disk_usage`` result) · outbox {"event", "telemetry"}
  outbox_caps {"max_events", "max_telemetry"} · not_checked {check name: why}
"""

from __future__ import annotations

import enum
import os
import socket
import sqlite3
import ssl
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from agent import exitcodes
from agent.core import facts as facts_module
from agent.core.clock import kernel_clock_synchronised
from agent.core.config import MqttConfig
from agent.core.store import Caps, StoreError

MiB = 1 << 20
DISK_FAIL_BELOW = 8 * MiB  # SQLite needs room to commit; below this events get lost
DISK_WARN_BELOW = 32 * MiB
OUTBOX_WARN_EVENTS = 1000  # queued events: the link has been down for a while
OUTBOX_FAIL_FRACTION = 0.9  # of the event cap: oldest events are about to be dropped
# dBm below which a signal is weak (data may drop) and too weak (registration and data
# mostly fail), per measure (at_commands.parsers.SIGNAL_MEASURES): RSSI and UMTS RSCP
# as before; LTE/NR reference signal power (RSRP) counts "poor" below -100 and cell
# edge below -110 in the usual operator and vendor tables.
SIGNAL_LIMITS = {"rssi": (-95, -105), "rscp": (-95, -105), "rsrp": (-100, -110), "ss_rsrp": (-100, -110)}


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
    port = f.get("modem_port") or "auto"
    if f["modem_found"]:
        return Result.PASS, f"AT port {port}"
    if port == "auto":
        return Result.FAIL, "no modem found by udev: check USB cable and power (lsusb), or name the port with --port"
    return Result.FAIL, f"no device at {port}: check the port name (ls /dev/ttyUSB*), the USB cable and power (lsusb)"


_AT_PROBLEMS = {
    "busy": "{port} is held by another program (is simagent running? see `fuser {port}`)",
    "hung": "the modem on {port} does not answer ({detail}): it hangs; power-cycle the module (the agent is fine)",
    "silent": "no answer to AT on {port}: not the modem's AT interface (try another ttyUSB), or the module hangs",
    "lost": "the modem on {port} went away while being read: check the USB cable and power",
}


def _at_answers(f: dict) -> Verdict:
    if f["at_ok"]:
        return Result.PASS, "modem answers AT"
    problem = _AT_PROBLEMS.get(f.get("at_problem"), _AT_PROBLEMS["silent"])
    return Result.FAIL, problem.format(port=f.get("modem_port") or "the AT port", detail=f.get("at_detail") or "no answer")


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
    if not iccid and f.get("sim_state") == "absent":
        return Result.PASS, f"IMEI {imei}; no card to read an ICCID from (see sim_ready)"
    if not iccid:
        return Result.FAIL, "ICCID not readable: reseat the SIM; a card that stays unreadable is faulty"
    if f.get("imei_luhn_ok") is False:
        return Result.WARN, f"IMEI {imei} fails its check digit: it may have been rewritten (report this terminal)"
    return Result.PASS, f"IMEI {imei}, ICCID {iccid}"


_BINDING_HINTS = {
    "bound": (Result.PASS, "card bound to this terminal by this check (first use)"),
    "unbound": (Result.PASS, "card not bound yet: the agent binds it on first use"),
    "no_sim": (Result.WARN, "no SIM, nothing to bind: insert the card"),
    "sim_locked": (Result.FAIL, "SIM locked by its PIN/PUK: the radio stays off; unlock the card or use one without a PIN"),
    "sim_unreadable": (Result.FAIL, "SIM unreadable: the radio stays off; reseat the card"),
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
    if state == "idle":
        cfun = f.get("cfun")
        if cfun is not None and cfun != 1:
            return Result.FAIL, f"not registered: the radio is off (CFUN={cfun}; see the binding check)"
        if f.get("sim_state") not in (None, "ready"):
            return Result.FAIL, f"not registered: the SIM is {f['sim_state']} (see sim_ready)"
    return _REGISTRATION_HINTS.get(state, (Result.WARN, f"registration {state}: wait a minute and run diag again"))


def _signal(f: dict) -> Verdict:
    dbm = f["signal_dbm"]
    if dbm is None:
        cfun = f.get("cfun")
        if cfun is not None and cfun != 1:
            return Result.WARN, f"no signal reading: the radio is off (CFUN={cfun})"
        if f.get("sim_state") not in (None, "ready"):
            return Result.WARN, f"no signal reading: the SIM is {f['sim_state']} (see sim_ready)"
        return Result.WARN, "signal strength unknown: check the antenna connection"
    measure = f.get("signal_measure") or "rssi"
    warn_below, fail_below = SIGNAL_LIMITS[measure]
    level = f"{dbm} dBm {measure.upper().replace('_', '-')}"
    if dbm < fail_below:
        return Result.FAIL, f"{level} is too weak: connect/reposition the antenna or move the terminal"
    if dbm < warn_below:
        return Result.WARN, f"{level} is weak: data may drop; check the antenna"
    return Result.PASS, level


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
    return Result.WARN, ("wall clock not synchronised by NTP: the agent trusts the network's time when the modem "
                         "reports it, otherwise it marks evidence times untrusted; enable NTP")


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


def broker_target(mqtt: MqttConfig) -> BrokerTarget:
    """The broker `[mqtt]` names first (config.mqtt or the reporter's settings)."""
    tls, first = mqtt.tls, mqtt.brokers()[0]
    return BrokerTarget(first.host, first.port, tls=tls.enabled, ca_file=tls.ca_file or None,
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


def gather_facts(*, state_dir: str | os.PathLike | None = None, broker: BrokerTarget | None = None) -> dict[str, Any]:
    """Everything but the modem: clock, state directory (disk, outbox, read-only) and
    broker. Blocking: the daemon runs it off its loop."""
    facts: dict[str, Any] = {"clock_trusted": kernel_clock_synchronised(), "not_checked": {}}
    if state_dir is not None:
        facts["disk"] = disk_usage(state_dir)
        try:
            facts["outbox"] = facts_module.outbox_depth(state_dir)
        except (OSError, sqlite3.Error, StoreError) as exc:
            facts["not_checked"]["outbox"] = f"not checked: {exc}"
    if broker is not None:
        facts["broker"] = probe_broker(broker)
    return facts
