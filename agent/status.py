"""What the box sees: the `status` document (SPEC §8) and its short human form.

``read_modem_status(modem)`` gives the keys the modem layer knows; the daemon reuses it
and adds ``binding``, ``mqtt`` and ``outbox`` from its live state. Without a daemon the
CLI adds ``binding`` from ``read_binding``: a *pure* decision (agent.binding.decide)
over the state store opened read-only, so looking never binds, records or creates
anything.

Document keys (all present; a value that could not be read is null)::

  modem   {vendor, model, revision, imei, imei_luhn_ok, profile}
  sim     {state: ready|absent|locked|error|unknown, iccid, imsi}
  network {registration: ModemManager word, operator, access_tech: gsm|umts|lte|nr5g|unknown,
           signal_dbm: int|null}
  radio   {cfun}
  binding {mode, status, reason, bound_iccid, bound_imei, since} | null   (CLI / daemon)
  mqtt    {connected, ...}, outbox {events, telemetry}                    (daemon only)
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from agent.binding import BOUND, BindingPolicy, Observation, decide
from agent.diag import _read_only_db  # the state store opened read-only (diag imports us late)
from agent.store import Binding

# A decision that would create a binding is shown as this: nothing is bound yet (the
# daemon binds on its next check), and `status` itself never writes.
UNBOUND = "unbound"


async def read_modem_status(modem: Any) -> dict[str, Any]:
    """The modem part of the status document, from an initialised ``Modem``. Raises
    the client's ``PortLost`` when the modem goes away while being read."""
    doc = await modem.snapshot()
    doc["modem"]["profile"] = modem.profile.name
    return doc


def read_binding(state_dir: str | os.PathLike, policy: BindingPolicy, doc: dict[str, Any]) -> dict[str, Any] | None:
    """The binding verdict for what ``doc`` shows, against the stored bindings; None
    when the state store cannot be read (missing, unreadable or damaged)."""
    try:
        with _read_only_db(state_dir) as conn:
            stored = [Binding(*row) for row in conn.execute("SELECT iccid, imei, since, source FROM bindings ORDER BY since")]
    except (OSError, sqlite3.Error):
        return None
    sim = doc["sim"]
    observation = Observation(imei=doc["modem"]["imei"], sim_state=sim["state"], iccid=sim["iccid"])
    decision = decide(observation, stored, policy)
    # The binding that concerns this card, else the one of this terminal.
    shown = next((b for b in stored if b.iccid == observation.iccid), None) or next(
        (b for b in stored if b.imei == observation.imei), None
    )
    return {
        "mode": policy.mode,
        "status": UNBOUND if decision.status == BOUND else decision.status,
        "reason": decision.reason,
        "bound_iccid": shown.iccid if shown else None,
        "bound_imei": shown.imei if shown else None,
        "since": shown.since if shown else None,
    }


def diag_facts(doc: dict[str, Any]) -> dict[str, Any]:
    """The modem facts `simagent diag` judges (agent.diag fact keys), from a status
    document; no binding fact when the document has no binding verdict."""
    modem, sim, network = doc["modem"], doc["sim"], doc["network"]
    facts = {
        "modem_found": True,
        "at_ok": True,
        "sim_state": sim["state"],
        "imei": modem["imei"],
        "imei_luhn_ok": modem["imei_luhn_ok"],
        "iccid": sim["iccid"],
        "registration": network["registration"],
        "signal_dbm": network["signal_dbm"],
    }
    binding = doc.get("binding")
    if binding:
        facts["binding_status"] = binding.get("reason") or binding["status"]
    return facts


# -- the human form: short aligned lines for a small terminal ----------------------------


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
        return [("binding", "unknown (state store not readable)")]
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
