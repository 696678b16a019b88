"""`simagent status`'s human form: short aligned lines for a small terminal, one fact per
line, from the status document that ``agent.core.facts`` builds (SPEC §8 keys).
"""

from __future__ import annotations

from typing import Any


def _value(value: Any, missing: str = "?") -> str:
    return missing if value is None else str(value)


def _modem_lines(modem: dict[str, Any]) -> list[tuple[str, str]]:
    name = " ".join(v for v in (modem.get("vendor"), modem.get("model")) if v) or "?"
    lines = [("modem", f"{name} ({modem['profile']})" if modem.get("profile") else name)]
    if modem.get("revision"):
        lines.append(("firmware", modem["revision"]))
    imei = modem.get("imei")
    luhn = {True: "", False: "  CHECK DIGIT WRONG", None: ""}[modem.get("imei_luhn_ok")]
    lines.append(("IMEI", f"{_value(imei, 'not readable')}{luhn}"))
    return lines


def _sim_lines(sim: dict[str, Any]) -> list[tuple[str, str]]:
    lines = [("SIM", sim["state"])]
    if sim["state"] != "absent":
        lines += [("ICCID", _value(sim.get("iccid"), "not readable")), ("IMSI", _value(sim.get("imsi"), "not readable"))]
    return lines


def _network_lines(network: dict[str, Any], radio: dict[str, Any] | None) -> list[tuple[str, str]]:
    where = [network["registration"]]
    if network.get("operator"):
        where.append(network["operator"])
    if network.get("access_tech") not in (None, "unknown"):
        where.append(network["access_tech"].upper())
    dbm = network.get("signal_dbm")
    lines = [("network", ", ".join(where)), ("signal", "unknown" if dbm is None else f"{dbm} dBm")]
    if radio is not None:
        cfun = radio.get("cfun")
        word = "unknown" if cfun is None else f"{'on' if cfun == 1 else 'off'} (CFUN={cfun})"
        gated = ", held off by the binding gate" if radio.get("gated") else ""
        lines.append(("radio", word + gated))
    return lines


def _binding_lines(binding: dict[str, Any] | None) -> list[tuple[str, str]]:
    if binding is None:
        return [("binding", "unknown (no state store, or not readable)")]
    status = binding["status"] + (f" ({binding['reason']})" if binding.get("reason") else "")
    lines = [("binding", f"{status}, mode {binding['mode']}")]
    if binding.get("bound_iccid"):
        lines.append(("bound to", f"ICCID {binding['bound_iccid']}"))
        lines.append(("", f"IMEI  {binding['bound_imei']}"))
        lines.append(("", f"since {binding['since']}"))
    return lines


def format_status(doc: dict[str, Any]) -> str:
    """``doc`` as aligned ``label  value`` lines, one fact per line."""
    rows = _modem_lines(doc["modem"]) + _sim_lines(doc["sim"]) + _network_lines(doc["network"], doc.get("radio"))
    if "binding" in doc:
        rows += _binding_lines(doc["binding"])
    if "mqtt" in doc:
        rows.append(("MQTT", "connected" if doc["mqtt"].get("connected") else "not connected"))
    if "outbox" in doc:
        outbox = doc["outbox"]
        rows.append(("outbox", f"{outbox.get('events', 0)} events, {outbox.get('telemetry', 0)} telemetry"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
