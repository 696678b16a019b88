"""The facts the box reports, built in one place: the `status` document (SPEC §8), the
retained `state` document (SPEC §6) and the facts `diag` judges. The daemon, `simagent
status`, `simagent diag` and the MQTT reporter all take them from here.

Sources: the modem (``read_modem_status``: an initialised ``Modem``), the radio gate's
view (``Enforcer.state``), and the state store opened read-only (``read_binding``,
``outbox_depth``, ``evidence_tail``: looking never binds, records, moves or creates
anything).

Document keys (all present; a value that could not be read is null)::

  schema  "simagent/state/1"                                               (daemon)
  device_id, agent_version, device_pubkey, modem_present                   (daemon)
  modem   {vendor, model, revision, imei, imei_luhn_ok, profile, port}
  sim     {state: ready|absent|locked|error|unknown, iccid, imsi}
  network {registration: ModemManager word, operator, access_tech: gsm|umts|lte|nr5g|unknown,
           signal_dbm: int|null, signal_measure: rsrp|ss_rsrp|rscp|rssi|null}
  radio   {cfun, gated}                                                   (gated: daemon)
  binding {mode, status, reason, bound_iccid, bound_imei, since} | null   (CLI / daemon)
  freshness  {modem, sim, network, radio, binding: {from, read_at, age_s}}
  modem_link {state: answering|missing|not_answering, port, detail}       (status only)
  mqtt    {connected, ...}, outbox {events, telemetry}                    (daemon's status only)

Through the daemon, `status --json` is the retained state document plus what only the box
itself can say: the live probe (``modem_link``), its broker link (``mqtt``) and its queue
(``outbox``); the state document adds the time it was published (``ts``).

Freshness (SPEC §8): every section says where it came from: ``modem`` (read from the
modem for this document), ``daemon`` (the daemon's last read, ``read_at`` and ``age_s``
old) or ``unknown`` (never read). A modem that is missing or does not answer is
``modem_link``; the sections then hold the last facts read, marked ``daemon``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any, Sequence

from agent.core.clock import format_utc
from agent.core.binding import (BOUND, LAST_DECISION_KEY, LAST_IMEI_KEY, OK, BindingPolicy, Decision, Observation,
                                binding_rows, decide)
from agent.core.config import BindingConfig
from agent.core.store import DB_NAME, LIVED_FILES, Binding, Store, StoreUnavailable
from agent.core.tokens import load_trusted_keys

# A read-only verdict that would create a binding is shown as this: nothing is bound yet
# (the daemon binds on its next check), and looking itself never writes.
UNBOUND = "unbound"

STATE_SCHEMA = "simagent/state/1"
UNKNOWN_MODEM = dict.fromkeys(("vendor", "model", "revision", "imei", "imei_luhn_ok", "profile"))
UNKNOWN_SIM = {"state": "unknown", "iccid": None, "imsi": None}
UNKNOWN_NETWORK = {"registration": "unknown", "operator": None, "access_tech": "unknown", "signal_dbm": None,
                   "signal_measure": None}

# Where a fact came from.
LIVE = "modem"  # read from the modem for this document
LAST_READ = "daemon"  # the daemon's last read (read_at, age_s)
NOT_READ = "unknown"
SECTIONS = ("modem", "sim", "network", "radio", "binding")
# The modem link: whether the facts could be read now.
ANSWERING, MISSING, NOT_ANSWERING = "answering", "missing", "not_answering"


def source(origin: str, read_at: float | None, now: float) -> dict[str, Any]:
    """One section's origin: ``{"from", "read_at", "age_s"}`` (``read_at`` a wall time)."""
    if origin == NOT_READ or read_at is None:
        return {"from": NOT_READ, "read_at": None, "age_s": None}
    return {"from": origin, "read_at": format_utc(read_at), "age_s": round(max(0.0, now - read_at), 1)}


def modem_link(state: str, port: str | None, detail: str | None = None) -> dict[str, Any]:
    return {"state": state, "port": port, "detail": detail}


def binding_fact(mode: str, decision: Decision | None, bindings: Sequence[Binding], iccid: str | None,
                 imei: str | None) -> dict[str, Any]:
    """The `binding` part: the decision's status and the binding that concerns this card
    (else this terminal's, else the first)."""
    shown = (next((b for b in bindings if b.iccid == iccid), None)
             or next((b for b in bindings if b.imei == imei), None)
             or (bindings[0] if bindings else None))
    return {
        "mode": mode,
        "status": "unknown" if decision is None else decision.status,
        "reason": decision.reason if decision else None,
        "bound_iccid": shown.iccid if shown else None,
        "bound_imei": shown.imei if shown else None,
        "since": shown.since if shown else None,
    }


def shown_binding(binding: dict[str, Any], *, carried_out: bool) -> dict[str, Any]:
    """``binding`` as the documents show it. ``bound`` is what a decision *does*: once the
    daemon has carried it out the card is bound here (``ok``, the word SPEC §4 uses); a
    read-only verdict carries nothing out, so nothing is bound yet (``unbound``)."""
    if binding["status"] != BOUND:
        return binding
    return {**binding, "status": OK if carried_out else UNBOUND}


async def read_modem_status(modem: Any) -> dict[str, Any]:
    """The modem part of the status document, from an initialised ``Modem``. Raises
    the client's ``PortLost`` when the modem goes away while being read."""
    doc = await modem.snapshot()
    doc["modem"]["profile"] = modem.profile.name
    return doc


def read_binding(state_dir: str | os.PathLike, policy: BindingPolicy, doc: dict[str, Any]) -> dict[str, Any] | None:
    """The binding verdict for what ``doc`` shows, against the stored bindings (a pure
    decision over the store opened read-only); None before the daemon's first start (no
    state yet). Raises StoreDamaged when the store is damaged, lost or not the one the
    anchor saw, StoreUnavailable when it cannot be read now: looking never repairs (the
    daemon records the reset)."""
    state_dir = Path(state_dir)
    if not (state_dir / DB_NAME).exists() and not any((state_dir / name).exists() for name in LIVED_FILES):
        return None
    try:
        with contextlib.closing(Store.open_read_only(state_dir)) as store:
            stored = store.read().bindings()
    except (OSError, sqlite3.Error) as exc:  # permissions, a read that failed: not known to be damage
        raise StoreUnavailable(f"{state_dir / DB_NAME}: {exc}") from exc
    sim = doc["sim"]
    observation = Observation(imei=doc["modem"]["imei"], sim_state=sim["state"], iccid=sim["iccid"])
    verdict = binding_fact(policy.mode, decide(observation, stored, policy), stored, observation.iccid, observation.imei)
    return shown_binding(verdict, carried_out=False)


def outbox_depth(state_dir: str | os.PathLike) -> dict[str, int]:
    with contextlib.closing(Store.open_read_only(state_dir)) as store:
        return store.outbox_depth()


def evidence_tail(state_dir: str | os.PathLike, count: int) -> list[dict]:
    with contextlib.closing(Store.open_read_only(state_dir)) as store:
        return store.evidence_tail(count)


def state_document(known: dict[str, Any], *, mode: str, device_id: str | None, agent_version: str,
                   device_pubkey: str | None, modem_present: bool, port: str | None,
                   network: dict[str, Any] | None = None, network_read_at: float | None = None,
                   read_at: float | None = None, now: float | None = None) -> dict[str, Any]:
    """The retained `P/state` document (SPEC §6) from the gate's last view (``known``:
    ``Enforcer.state()``, empty before the first, read at wall time ``read_at``) and the
    daemon's last network read (``network``, at ``network_read_at``)."""
    binding = shown_binding(known.get("binding") or binding_fact(mode, None, (), None, None), carried_out=True)
    now = read_at if now is None else now
    last = source(LAST_READ if known else NOT_READ, read_at, now)
    return {
        "schema": STATE_SCHEMA,
        "device_id": device_id,
        "agent_version": agent_version,
        # Copies: `status` adds its own keys to the document it is handed.
        "modem": {**(known.get("modem") or UNKNOWN_MODEM), "port": port},
        "sim": dict(known.get("sim") or UNKNOWN_SIM),
        "network": dict(network or UNKNOWN_NETWORK),
        "binding": dict(binding),
        "radio": dict(known.get("radio") or {"cfun": None, "gated": False}),  # nothing is held off without a modem
        "device_pubkey": device_pubkey,
        "modem_present": modem_present,
        "freshness": {"modem": dict(last), "sim": dict(last), "radio": dict(last), "binding": dict(last),
                      "network": source(LAST_READ if network else NOT_READ, network_read_at, now)},
    }


def binding_view(store: Store, binding_config: BindingConfig | None) -> dict:
    """What `bind show` reports (also the daemon's `bind_show` op)."""
    tx = store.read()
    return {
        "mode": binding_config.mode if binding_config else None,
        "imei": tx.get_meta(LAST_IMEI_KEY),
        "bindings": binding_rows(tx.bindings()),
        "last_decision": tx.get_meta(LAST_DECISION_KEY),
        "trusted_time_floor": tx.time_floor(),
        "trusted_key_ids": [k.id for k in load_trusted_keys(binding_config.trusted_keys)] if binding_config else None,
    }


def diag_facts(doc: dict[str, Any]) -> dict[str, Any]:
    """The modem facts `diag` judges (agent.core.checks fact keys), from a status document;
    no binding fact when the document has no binding verdict."""
    link = doc.get("modem_link") or modem_link(ANSWERING, doc["modem"].get("port"))
    port = link.get("port")
    if link["state"] == MISSING:
        return {"modem_found": False, "modem_port": port, "modem_problem": link.get("detail")}
    if link["state"] == NOT_ANSWERING:
        return {"modem_found": True, "modem_port": port, "at_ok": False, "at_problem": "hung",
                "at_detail": link.get("detail")}
    modem, sim, network = doc["modem"], doc["sim"], doc["network"]
    facts = {
        "modem_found": True,
        "modem_port": port,
        "at_ok": True,
        "sim_state": sim["state"],
        "imei": modem["imei"],
        "imei_luhn_ok": modem["imei_luhn_ok"],
        "iccid": sim["iccid"],
        "registration": network["registration"],
        "signal_dbm": network["signal_dbm"],
        "signal_measure": network["signal_measure"],
        "cfun": (doc.get("radio") or {}).get("cfun"),
    }
    binding = doc.get("binding")
    if binding:
        facts["binding_status"] = binding.get("reason") or binding["status"]
    return facts
