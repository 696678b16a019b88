"""Machine-card binding: may this SIM be used in this terminal (SPEC §4)?

Functional core: `decide(observation, bindings, policy)` is pure. It returns a `Decision`
that says what the modem must do (`actions`, in order) and what must be recorded
(`records`, evidence entries and events). The imperative shell `evaluate` reads the
bindings, decides, writes the new binding and the records in one store transaction and
hands the decision back; it never talks to the modem itself.

Radio semantics (one rule for every row of the table):
- an allowed decision (`ok`, `bound`, or anything in `observe` mode) lets the radio on:
  action `radio-on` (a no-op when it is on already; the enforcement shell reports
  `radio_restored` when it really turns the radio back on). In `observe` mode with
  `radio_gate = false` the agent never touches the radio, so there is no action at all.
- with `radio_gate = true` every other decision keeps the radio off (`radio-off`), whatever
  `on_violation` says: the gate holds the radio "until the decision is ok".
- with `radio_gate = false` only violations act, as `on_violation` says; no SIM or an
  unreadable SIM cannot attach anyway and leaves the radio alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.core.store import LAST_DECISION_KEY, LAST_IMEI_KEY, RESET_PENDING_KEY, Binding, Store, Transaction
from at_commands.parsers import SIM_STATES  # the states the modem layer reports

MODES = ("first-use", "provisioned", "observe")
ON_VIOLATION = ("radio-off", "detach", "report")

# Decision statuses.
OK = "ok"
BOUND = "bound"  # a binding was created by this decision
NO_SIM = "no_sim"
SIM_LOCKED = "sim_locked"  # PIN/PUK: the ICCID may be readable, the card is not usable
SIM_UNREADABLE = "sim_unreadable"  # error, unknown, or ICCID unreadable
IMEI_UNREADABLE = "imei_unreadable"
VIOLATION = "violation"

# Violation reasons.
IMEI_NOT_ALLOWED = "imei_not_allowed"
ICCID_NOT_ALLOWED = "iccid_not_allowed"
NOT_PROVISIONED = "not_provisioned"
ICCID_MISMATCH = "iccid_mismatch"
IMEI_MISMATCH = "imei_mismatch"
STATE_RESET = "state_reset"  # the state was lost: nothing is bound until a token or `bind reset`

# Modem actions, executed in order by the enforcement shell.
RADIO_OFF = "radio-off"  # AT+CFUN=4
DETACH = "detach"  # AT+CGATT=0
RADIO_ON = "radio-on"  # AT+CFUN=1 when the radio is off
MODEM_COMMANDS = {RADIO_OFF: "+CFUN=4", DETACH: "+CGATT=0", RADIO_ON: "+CFUN=1"}


@dataclass(frozen=True)
class BindingPolicy:
    """The `[binding]` configuration section, as far as the decision needs it."""

    mode: str = "first-use"
    imei_allowlist: tuple[str, ...] = ()
    iccid_prefixes: tuple[str, ...] = ()
    on_violation: str = "radio-off"
    radio_gate: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"binding mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.on_violation not in ON_VIOLATION:
            raise ValueError(f"on_violation: expected one of {', '.join(ON_VIOLATION)}, got {self.on_violation!r}")
        object.__setattr__(self, "imei_allowlist", tuple(self.imei_allowlist))
        object.__setattr__(self, "iccid_prefixes", tuple(self.iccid_prefixes))

    @property
    def enforcing(self) -> bool:
        return self.mode != "observe"


@dataclass(frozen=True)
class Observation:
    """What the modem shows now. IMEI and ICCID are normalised strings, or None when
    they could not be read."""

    imei: str | None
    sim_state: str
    iccid: str | None = None

    def __post_init__(self) -> None:
        if self.sim_state not in SIM_STATES:
            raise ValueError(f"sim_state: expected one of {', '.join(SIM_STATES)}, got {self.sim_state!r}")

    def ids(self) -> dict[str, str | None]:
        return {"imei": self.imei, "iccid": self.iccid}


@dataclass(frozen=True)
class NewBinding:
    iccid: str
    imei: str
    source: str  # the mode that bound it: "first-use" or "observe"


@dataclass(frozen=True)
class Record:
    """One evidence entry (and, when `event`, the MQTT event) to write."""

    type: str
    data: dict
    event: bool = True


@dataclass(frozen=True)
class Decision:
    status: str
    reason: str | None = None  # the violation reason when status is "violation"
    radio_allowed: bool = True  # False: this card must not attach from this terminal now
    new_binding: NewBinding | None = None
    actions: tuple[str, ...] = ()
    records: tuple[Record, ...] = field(default=())

    def summary(self, observation: Observation) -> dict:
        """What is kept as the last decision (and compared to spot a change)."""
        return {"status": self.status, "reason": self.reason, "radio_allowed": self.radio_allowed, **observation.ids()}


def decide(observation: Observation, bindings: Sequence[Binding], policy: BindingPolicy, *,
           reset_pending: bool = False) -> Decision:
    """The binding decision (SPEC §4 table). `bindings` are this terminal's stored
    bindings; the terminal counts as bound as soon as it holds any. `reset_pending`: the
    state was lost (`state_reset`) and no rebind token or `bind reset` has said since
    which card belongs here, so no card is allowed or bound (fail closed)."""
    obs = observation
    if obs.sim_state == "absent":
        return _not_checkable(NO_SIM, obs, policy)
    if obs.imei is None:
        return _not_checkable(IMEI_UNREADABLE, obs, policy)
    if policy.imei_allowlist and obs.imei not in policy.imei_allowlist:
        return _violation(IMEI_NOT_ALLOWED, obs, None, policy)
    if obs.sim_state == "locked":
        return _not_checkable(SIM_LOCKED, obs, policy)
    if obs.sim_state != "ready" or obs.iccid is None:
        return _not_checkable(SIM_UNREADABLE, obs, policy)
    if policy.iccid_prefixes and not obs.iccid.startswith(policy.iccid_prefixes):
        return _violation(ICCID_NOT_ALLOWED, obs, None, policy)
    if reset_pending:
        return _violation(STATE_RESET, obs, None, policy)
    card = next((b for b in bindings if b.iccid == obs.iccid), None)
    if card is not None:
        if card.imei == obs.imei:
            return _allowed(OK, policy, records=(_checked(OK, obs),))
        return _violation(IMEI_MISMATCH, obs, card, policy)
    if bindings:
        terminal = next((b for b in bindings if b.imei == obs.imei), bindings[0])
        return _violation(ICCID_MISMATCH, obs, terminal, policy)
    if policy.mode == "provisioned":
        return _violation(NOT_PROVISIONED, obs, None, policy)
    new = NewBinding(obs.iccid, obs.imei, policy.mode)
    record = Record("bound", {"iccid": new.iccid, "imei": new.imei, "source": new.source})
    return _allowed(BOUND, policy, new_binding=new, records=(record,))


def _allowed(status: str, policy: BindingPolicy, **fields: Any) -> Decision:
    actions = (RADIO_ON,) if policy.enforcing or policy.radio_gate else ()
    return Decision(status, radio_allowed=True, actions=actions, **fields)


def _checked(status: str, obs: Observation) -> Record:
    """Evidence of what was seen when there is nothing to report as an event."""
    return Record("binding_checked", {"status": status, "sim_state": obs.sim_state, **obs.ids()}, event=False)


def _not_checkable(status: str, obs: Observation, policy: BindingPolicy) -> Decision:
    """No SIM, or something unreadable: nothing is bound, the gate (if on) stays shut."""
    record = _checked(status, obs)
    if not policy.enforcing:
        return _allowed(status, policy, records=(record,))
    if policy.radio_gate:
        return Decision(status, radio_allowed=False, actions=(RADIO_OFF,), records=(record,))
    return Decision(status, radio_allowed=True, records=(record,))


def _violation(reason: str, obs: Observation, stored: Binding | None, policy: BindingPolicy) -> Decision:
    if not policy.enforcing:
        actions: tuple[str, ...] = (RADIO_ON,) if policy.radio_gate else ()
    elif policy.radio_gate or policy.on_violation == "radio-off":
        actions = (RADIO_OFF,)
    elif policy.on_violation == "detach":
        actions = (DETACH,)
    else:
        actions = ()
    radio_allowed = RADIO_OFF not in actions and DETACH not in actions
    data = {
        "reason": reason,
        "mode": policy.mode,
        "enforced": not radio_allowed,
        "actions": list(actions),
        "observed": obs.ids(),
        "stored": None if stored is None else {"iccid": stored.iccid, "imei": stored.imei, "since": stored.since},
    }
    return Decision(VIOLATION, reason, radio_allowed, actions=actions, records=(Record("binding_violation", data),))


# -- imperative shell ------------------------------------------------------------------


def evaluate(store: Store, observation: Observation, policy: BindingPolicy) -> Decision:
    """Reads the bindings, decides and applies the decision in one transaction, so no
    token can change the bindings in between. Returns the decision; its `actions` are
    what the modem must do."""
    with store.transaction() as tx:
        decision = decide(observation, tx.bindings(), policy, reset_pending=tx.get_meta(RESET_PENDING_KEY) is not None)
        _apply(tx, observation, decision)
    return decision


def _apply(tx: Transaction, observation: Observation, decision: Decision) -> None:
    if observation.imei is not None:
        tx.set_meta(LAST_IMEI_KEY, observation.imei)
    stamp = tx.now()
    summary = decision.summary(observation)
    previous = tx.get_meta(LAST_DECISION_KEY)
    # Polling re-decides often; the same decision in the same boot is recorded once.
    repeated = previous is not None and previous.get("boot_id") == stamp.boot_id and {
        k: v for k, v in previous.items() if k not in ("boot_id", "since")
    } == summary
    if decision.new_binding is not None:
        new = decision.new_binding
        tx.put_binding(Binding(new.iccid, new.imei, stamp.iso(), new.source))
    if repeated:
        return
    tx.set_meta(LAST_DECISION_KEY, {**summary, "boot_id": stamp.boot_id, "since": stamp.iso()})
    for record in decision.records:
        tx.record(record.type, record.data, event=record.event)


def reset_bindings(store: Store, reason: str, uid: int) -> list[Binding]:
    """`simagent bind reset`: forgets every binding, audited with the reason and the uid
    of who asked. The caller checks that the user may do this."""
    if not reason.strip():
        raise ValueError("a reason is required")
    with store.transaction() as tx:
        removed = tx.bindings()
        tx.delete_all_bindings()
        tx.set_meta(LAST_DECISION_KEY, None)
        tx.set_meta(RESET_PENDING_KEY, None)  # root says: the card in the tray is the one
        tx.record(
            "unbound",
            {
                "source": "reset",
                "reason": reason,
                "uid": uid,
                "bindings": [{"iccid": b.iccid, "imei": b.imei, "since": b.since} for b in removed],
            },
        )
    return removed


def binding_rows(bindings: Iterable[Binding]) -> list[dict]:
    return [{"iccid": b.iccid, "imei": b.imei, "since": b.since, "source": b.source} for b in bindings]
