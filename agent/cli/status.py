"""`simagent status`'s human form: sections like `mmcli -m 0` (hardware, SIM, network,
radio, binding, platform), one fact per line, each section saying where its facts came
from and how old they are; a modem that is missing or does not answer is the first line.
Built from the status document that ``agent.core.facts`` makes (SPEC §8 keys).
"""

from __future__ import annotations

from typing import Any

from agent.core.facts import LIVE, MISSING, NOT_ANSWERING

Row = tuple[str, str]


def _value(value: Any, missing: str = "?") -> str:
    return missing if value is None else str(value)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "age unknown"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def source_words(source: dict[str, Any] | None) -> str:
    """Where a section came from, in words."""
    if not source or source.get("from") == "unknown":
        return "unknown (never read)"
    if source["from"] == LIVE:
        return "live (read from the modem now)"
    return f"the daemon's last read, {_age(source.get('age_s'))}"


def link_line(doc: dict[str, Any]) -> str | None:
    """The first line when the modem is missing or does not answer, else None."""
    link = doc.get("modem_link") or {}
    state, port = link.get("state"), link.get("port") or "?"
    detail = f": {link['detail']}" if link.get("detail") else ""
    if state == MISSING:
        return (f"MODEM MISSING ({port}{detail}): check the USB cable and power (lsusb); "
                "the facts below are from before it went away")
    if state == NOT_ANSWERING:
        return (f"MODEM NOT ANSWERING on {port}{detail}: the module hangs; power-cycle it "
                "(the daemon is fine); the facts below are its last answers")
    return None


def _hardware(doc: dict[str, Any], via: str | None) -> list[Row]:
    modem = doc["modem"]
    rows: list[Row] = []
    if modem.get("port") or via:
        rows.append(("port", f"{_value(modem.get('port'))}" + (f" ({via})" if via else "")))
    name = " ".join(v for v in (modem.get("vendor"), modem.get("model")) if v) or "?"
    rows.append(("modem", f"{name} ({modem['profile']})" if modem.get("profile") else name))
    if modem.get("revision"):
        rows.append(("firmware", modem["revision"]))
    luhn = "  CHECK DIGIT WRONG" if modem.get("imei_luhn_ok") is False else ""
    rows.append(("IMEI", f"{_value(modem.get('imei'), 'not readable')}{luhn}"))
    return rows


def _sim(sim: dict[str, Any]) -> list[Row]:
    rows = [("state", sim["state"])]
    if sim["state"] != "absent":
        rows += [("ICCID", _value(sim.get("iccid"), "not readable")), ("IMSI", _value(sim.get("imsi"), "not readable"))]
    return rows


def _network(network: dict[str, Any]) -> list[Row]:
    where = [network["registration"]]
    if network.get("operator"):
        where.append(network["operator"])
    if network.get("access_tech") not in (None, "unknown"):
        where.append(network["access_tech"].upper())
    dbm = network.get("signal_dbm")
    measure = (network.get("signal_measure") or "").upper().replace("_", "-")
    shown = "unknown" if dbm is None else f"{dbm} dBm {measure}".rstrip()
    return [("registration", ", ".join(where)), ("signal", shown)]


def _radio(radio: dict[str, Any]) -> list[Row]:
    cfun = radio.get("cfun")
    word = "unknown" if cfun is None else f"{'on' if cfun == 1 else 'off'} (CFUN={cfun})"
    return [("radio", word + (", held off by the binding gate" if radio.get("gated") else ""))]


def _binding(binding: dict[str, Any] | None) -> list[Row]:
    if binding is None:
        return [("status", "unknown (no state store, or not readable)")]
    status = binding["status"] + (f" ({binding['reason']})" if binding.get("reason") else "")
    rows = [("status", f"{status}, mode {binding['mode']}")]
    if binding.get("bound_iccid"):
        rows += [("bound to", f"ICCID {binding['bound_iccid']}"), ("", f"IMEI  {binding['bound_imei']}"),
                 ("", f"since {binding['since']}")]
    return rows


def _platform(doc: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    if "mqtt" in doc:
        rows.append(("MQTT", _mqtt_link(doc["mqtt"])))
    if "outbox" in doc:
        outbox = doc["outbox"]
        events = outbox.get("event", outbox.get("events", 0))
        rows.append(("outbox", f"{events} events, {outbox.get('telemetry', 0)} telemetry"))
    return rows


def _mqtt_link(link: dict[str, Any]) -> str:
    """"connected to B (MQTT 5)", or "not connected (next: B; last error)"; B is the endpoint."""
    broker = link.get("broker")
    if link.get("connected"):
        return f"connected to {broker} (MQTT {link['protocol']})" if broker else "connected"
    details = [f"next: {broker}"] if broker else []
    details += [link["last_error"]] if link.get("last_error") else []
    return f"not connected ({'; '.join(details)})" if details else "not connected"


def format_status(doc: dict[str, Any], *, via: str | None = None) -> str:
    """``doc`` as titled sections of aligned ``label  value`` lines; ``via`` says how the
    port was reached ("held by the daemon", "opened directly")."""
    fresh = doc.get("freshness") or {}
    sections: list[tuple[str, list[Row], str | None]] = [
        ("Hardware", _hardware(doc, via), "modem"),
        ("SIM", _sim(doc["sim"]), "sim"),
        ("Network", _network(doc["network"]), "network"),
    ]
    if doc.get("radio") is not None:
        sections.append(("Radio", _radio(doc["radio"]), "radio"))
    if "binding" in doc:
        sections.append(("Binding", _binding(doc["binding"]), "binding"))
    if platform := _platform(doc):
        sections.append(("Platform", platform, None))
    for _title, rows, key in sections:
        if key is not None and fresh:
            rows.append(("source", source_words(fresh.get(key))))
    width = max(len(label) for _t, rows, _k in sections for label, _v in rows)
    lines = [first] if (first := link_line(doc)) else []
    for title, rows, _key in sections:
        lines.append(title)
        lines += [f"  {label:<{width}}  {value}".rstrip() for label, value in rows]
    return "\n".join(lines)
