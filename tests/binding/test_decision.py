import pytest

from agent.core.binding import (
    BindingPolicy,
    NewBinding,
    Observation,
    decide,
    evaluate,
    reset_bindings,
    LAST_IMEI_KEY,
)
from agent.core.config import BindingConfig
from agent.core.store import Binding

IMEI = "490154203237518"
OTHER_IMEI = "356938035643809"
ICCID = "89860012345678901234"
OTHER_ICCID = "89860098765432109876"
MODES = ("first-use", "provisioned", "observe")


def bound(iccid=ICCID, imei=IMEI):
    return Binding(iccid, imei, "2026-01-01T00:00:00.000Z", "first-use")


HERE = Observation(IMEI, "ready", ICCID)

# SPEC §4, one row per situation: (observation, stored bindings, policy overrides,
# {mode: (status, reason, binds, record types)}). Radio: see test_radio_follows_the_rule.
TABLE = {
    "no SIM": (
        Observation(IMEI, "absent", None), [bound()], {},
        {m: ("no_sim", None, False, ["binding_checked"]) for m in MODES},
    ),
    "IMEI not in allowlist": (
        HERE, [], {"imei_allowlist": (OTHER_IMEI,)},
        {m: ("violation", "imei_not_allowed", False, ["binding_violation"]) for m in MODES},
    ),
    "ICCID outside prefixes": (
        HERE, [], {"iccid_prefixes": ("8944", "8901")},
        {m: ("violation", "iccid_not_allowed", False, ["binding_violation"]) for m in MODES},
    ),
    "no binding yet": (
        HERE, [], {},
        {
            "first-use": ("bound", None, True, ["bound"]),
            "provisioned": ("violation", "not_provisioned", False, ["binding_violation"]),
            "observe": ("bound", None, True, ["bound"]),
        },
    ),
    "bound, same ICCID and IMEI": (
        HERE, [bound()], {"imei_allowlist": (IMEI,), "iccid_prefixes": ("8986",)},
        {m: ("ok", None, False, ["binding_checked"]) for m in MODES},
    ),
    "bound to another ICCID": (
        HERE, [bound(iccid=OTHER_ICCID)], {},
        {m: ("violation", "iccid_mismatch", False, ["binding_violation"]) for m in MODES},
    ),
    "this card bound under another IMEI": (
        HERE, [bound(imei=OTHER_IMEI)], {},
        {m: ("violation", "imei_mismatch", False, ["binding_violation"]) for m in MODES},
    ),
    "terminal bound, modem and card both swapped": (
        HERE, [bound(iccid=OTHER_ICCID, imei=OTHER_IMEI)], {},
        {m: ("violation", "iccid_mismatch", False, ["binding_violation"]) for m in MODES},
    ),
    **{
        f"SIM {state}": (
            Observation(IMEI, state, None), [], {},
            {m: ("sim_unreadable", None, False, ["binding_checked"]) for m in MODES},
        )
        for state in ("error", "unknown")
    },
    "SIM locked, ICCID read": (
        Observation(IMEI, "locked", ICCID), [], {},
        {m: ("sim_locked", None, False, ["binding_checked"]) for m in MODES},
    ),
    "SIM ready but ICCID unreadable": (
        Observation(IMEI, "ready", None), [], {},
        {m: ("sim_unreadable", None, False, ["binding_checked"]) for m in MODES},
    ),
    "IMEI unreadable": (
        Observation(None, "ready", ICCID), [], {},
        {m: ("imei_unreadable", None, False, ["binding_checked"]) for m in MODES},
    ),
}

CASES = [pytest.param(name, mode, id=f"{name} / {mode}") for name in TABLE for mode in MODES]


@pytest.mark.parametrize("name,mode", CASES)
def test_decision_table(name, mode):
    observation, bindings, overrides, expected = TABLE[name]
    status, reason, binds, record_types = expected[mode]
    policy = BindingPolicy(mode=mode, **overrides)
    decision = decide(observation, bindings, policy)
    assert (decision.status, decision.reason) == (status, reason)
    assert decision.new_binding == (NewBinding(ICCID, IMEI, mode) if binds else None)
    assert [r.type for r in decision.records] == record_types
    if mode == "observe" or status in ("ok", "bound"):
        assert decision.radio_allowed and decision.actions == ("radio-on",)
    else:  # gate on (the default): nothing but ok opens the radio
        assert not decision.radio_allowed and decision.actions == ("radio-off",)


@pytest.mark.parametrize("name", [n for n, row in TABLE.items() if row[3]["first-use"][0] == "violation"])
def test_violation_names_observed_and_stored_ids(name):
    observation, bindings, overrides, _ = TABLE[name]
    decision = decide(observation, bindings, BindingPolicy(**overrides))
    (record,) = decision.records
    assert record.event and record.data["reason"] == decision.reason
    assert record.data["observed"] == {"imei": IMEI, "iccid": ICCID}
    expected_stored = {"iccid": bindings[0].iccid, "imei": bindings[0].imei, "since": bindings[0].since} if bindings else None
    assert record.data["stored"] == expected_stored


@pytest.mark.parametrize(
    "on_violation,actions,allowed",
    [("radio-off", ("radio-off",), False), ("detach", ("detach",), False), ("report", (), True)],
)
def test_without_gate_on_violation_decides(on_violation, actions, allowed):
    policy = BindingPolicy(on_violation=on_violation, radio_gate=False)
    decision = decide(HERE, [bound(iccid=OTHER_ICCID)], policy)
    assert (decision.actions, decision.radio_allowed) == (actions, allowed)
    assert decision.records[0].data["enforced"] is not allowed


@pytest.mark.parametrize("on_violation", ["radio-off", "detach", "report"])
def test_gate_keeps_radio_off_on_violation_whatever_on_violation_says(on_violation):
    decision = decide(HERE, [bound(iccid=OTHER_ICCID)], BindingPolicy(on_violation=on_violation, radio_gate=True))
    assert decision.actions == ("radio-off",) and not decision.radio_allowed


def test_without_gate_no_sim_leaves_radio_alone():
    decision = decide(Observation(IMEI, "absent"), [], BindingPolicy(radio_gate=False))
    assert decision.actions == () and decision.radio_allowed


def test_observe_without_gate_never_touches_the_radio():
    policy = BindingPolicy(mode="observe", radio_gate=False)
    for observation, bindings in [(HERE, []), (HERE, [bound(iccid=OTHER_ICCID)]), (Observation(IMEI, "locked"), [])]:
        assert decide(observation, bindings, policy).actions == ()


def test_policy_from_config_section_and_validation():
    section = BindingConfig(mode="provisioned", imei_allowlist=(IMEI,), iccid_prefixes=("8986",),
                            on_violation="detach", radio_gate=False)
    policy = section.policy()
    assert policy == BindingPolicy("provisioned", (IMEI,), ("8986",), "detach", False)
    with pytest.raises(ValueError, match="radiooff"):
        BindingPolicy(on_violation="radiooff")
    with pytest.raises(ValueError, match="mode"):
        BindingPolicy(mode="first_use")
    with pytest.raises(ValueError, match="sim_state"):
        Observation(IMEI, "inserted")


# -- the shell -------------------------------------------------------------------------


def test_first_use_binds_once_with_evidence_and_event(store, events, evidence_types):
    policy = BindingPolicy()
    first = evaluate(store, HERE, policy)
    assert first.status == "bound" and first.actions == ("radio-on",)
    (row,) = store.read().bindings()
    assert (row.iccid, row.imei, row.source) == (ICCID, IMEI, "first-use")
    assert [e["type"] for e in events(store)] == ["bound"]
    assert events(store)[0]["data"] == {"iccid": ICCID, "imei": IMEI, "source": "first-use"}
    assert store.read().get_meta(LAST_IMEI_KEY) == IMEI
    assert evaluate(store, HERE, policy).status == "ok"
    assert evidence_types(store) == ["bound", "binding_checked"]


def test_foreign_card_is_reported_once_per_boot_and_binds_nothing(store, events, evidence_types, clock):
    policy = BindingPolicy()
    evaluate(store, HERE, policy)
    foreign = Observation(IMEI, "ready", OTHER_ICCID)
    for _ in range(3):  # SIM polling re-decides; the same violation is one record
        decision = evaluate(store, foreign, policy)
        assert decision.actions == ("radio-off",)
    assert [b.iccid for b in store.read().bindings()] == [ICCID]
    violations = [e for e in events(store) if e["type"] == "binding_violation"]
    assert len(violations) == 1
    assert violations[0]["data"]["observed"] == {"imei": IMEI, "iccid": OTHER_ICCID}
    assert violations[0]["data"]["stored"]["iccid"] == ICCID
    clock.boot_id = "boot-2"  # after a reboot the standing violation is reported again
    evaluate(store, foreign, policy)
    assert len([t for t in evidence_types(store) if t == "binding_violation"]) == 2


def test_locked_sim_binds_nothing_then_binds_when_readable(store, events):
    policy = BindingPolicy()
    decision = evaluate(store, Observation(IMEI, "locked"), policy)
    assert decision.status == "sim_locked" and decision.actions == ("radio-off",)
    assert store.read().bindings() == [] and events(store) == []
    assert evaluate(store, HERE, policy).status == "bound"


def test_evaluate_records_a_violation_and_returns_the_modem_actions(store, evidence_types):
    with store.transaction() as tx:
        tx.put_binding(bound(iccid=OTHER_ICCID))
    decision = evaluate(store, HERE, BindingPolicy(on_violation="detach", radio_gate=False))
    assert decision.actions == ("detach",)
    assert evidence_types(store) == ["binding_violation"]
    assert [b.iccid for b in store.read().bindings()] == [OTHER_ICCID]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bindings", [[], [bound()], [bound(iccid=OTHER_ICCID)]], ids=["none", "same", "other"])
def test_after_a_state_reset_no_card_is_allowed_or_bound(mode, bindings):
    decision = decide(HERE, bindings, BindingPolicy(mode=mode), reset_pending=True)
    assert (decision.status, decision.reason, decision.new_binding) == ("violation", "state_reset", None)
    enforced = mode != "observe"
    assert decision.radio_allowed is not enforced and decision.records[0].data["enforced"] is enforced
    # what is not about the card still reads as before
    assert decide(Observation(IMEI, "absent"), bindings, BindingPolicy(mode=mode), reset_pending=True).status == "no_sim"


def test_lost_state_fails_closed_until_bind_reset(tmp_path, make_clock, events):
    from agent.core.store import Store

    state = tmp_path / "state"
    s = Store.open(state, clock=make_clock())
    evaluate(s, HERE, BindingPolicy())
    s.close()
    for f in state.glob("state.db*"):
        f.unlink()
    s = Store.open(state, clock=make_clock())
    foreign = Observation(IMEI, "ready", OTHER_ICCID)
    for mode in ("first-use", "provisioned"):
        decision = evaluate(s, foreign, BindingPolicy(mode=mode))
        assert (decision.reason, decision.actions) == ("state_reset", ("radio-off",))
    assert s.read().bindings() == []
    assert [e["type"] for e in events(s)][:2] == ["state_reset", "binding_violation"]
    reset_bindings(s, "card swapped on site, ticket 17", uid=0)
    assert evaluate(s, foreign, BindingPolicy()).status == "bound"
    s.close()


def test_reset_removes_bindings_and_audits(store, events):
    evaluate(store, HERE, BindingPolicy())
    removed = reset_bindings(store, "modem replaced under RMA 42", uid=0)
    assert [b.iccid for b in removed] == [ICCID]
    assert store.read().bindings() == []
    unbound = events(store)[-1]
    assert unbound["type"] == "unbound"
    assert unbound["data"]["reason"] == "modem replaced under RMA 42" and unbound["data"]["uid"] == 0
    assert unbound["data"]["bindings"][0]["iccid"] == ICCID
    with pytest.raises(ValueError):
        reset_bindings(store, "  ", uid=0)
