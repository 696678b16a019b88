"""Every row of the SPEC §4 table in every mode, carried out on the fake modem at start:
the radio level the fake ends at, the stored bindings and the evidence chain."""

import pytest

from agent.core.binding import BindingPolicy
from .conftest import (FOREIGN_ICCID, HOME_ICCID, HOME_IMEI, OTHER_IMEI, assert_radio_on_only_after_allowed_card,
                      run, sent)

# row -> (terminal set-up, stored bindings, enforcing status, reason)
ROWS = {
    "no_sim": (dict(no_sim=True), {}, (), "no_sim", None),
    "imei_not_allowed": ({}, dict(imei_allowlist=(OTHER_IMEI,)), (), "violation", "imei_not_allowed"),
    "iccid_not_allowed": ({}, dict(iccid_prefixes=("898611",)), (), "violation", "iccid_not_allowed"),
    "no_binding_yet": ({}, {}, (), None, None),  # depends on the mode, see below
    "bound_same": ({}, {}, ((HOME_ICCID, HOME_IMEI),), "ok", None),
    "bound_to_another_iccid": ({}, {}, ((FOREIGN_ICCID, HOME_IMEI),), "violation", "iccid_mismatch"),
    "card_bound_under_another_imei": ({}, {}, ((HOME_ICCID, OTHER_IMEI),), "violation", "imei_mismatch"),
}
NO_BINDING = {"first-use": ("bound", None), "provisioned": ("violation", "not_provisioned"), "observe": ("bound", None)}
DECISION_RECORD = {"ok": "binding_checked", "no_sim": "binding_checked", "bound": "bound", "violation": "binding_violation"}


@pytest.mark.parametrize("profile", ["quectel", "generic"])
@pytest.mark.parametrize("mode", ["first-use", "provisioned", "observe"])
@pytest.mark.parametrize("row", list(ROWS))
def test_table_row_at_start(open_terminal, row, mode, profile):
    fake_args, policy_args, stored, status, reason = ROWS[row]
    if row == "no_binding_yet":
        status, reason = NO_BINDING[mode]
    enforcing = mode != "observe"  # observe: decided and reported, never enforced
    radio_on = status in ("ok", "bound") or not enforcing
    policy = BindingPolicy(mode=mode, **policy_args)

    async def scenario():
        async with open_terminal(policy, bindings=stored, profile=profile, **fake_args) as t:
            decision = t.started
            assert (decision.status, decision.reason) == (status, reason)
            assert t.fake.state()["cfun"] == (1 if radio_on else 4)
            state = t.enforcer.state()
            assert state["radio"] == {"cfun": 1 if radio_on else 4, "gated": not radio_on}
            assert (state["binding"]["mode"], state["binding"]["status"], state["binding"]["reason"]) == (mode, status, reason)

            expected_bindings = set(stored)
            if status == "bound":
                expected_bindings.add((HOME_ICCID, HOME_IMEI))
            assert set(t.bindings()) == expected_bindings
            if status == "bound":
                (row_,) = t.store.read().bindings()
                assert row_.source == mode

            # The fake boots with its radio on: the gate switches it off before anything
            # is read, and only an allowed decision switches it on again.
            expected = ["radio_blocked", DECISION_RECORD[status]] + (["radio_restored"] if radio_on else [])
            assert t.types() == expected
            entries = t.evidence()
            assert entries[0]["data"]["reason"] == "start"
            if status == "violation":
                data = entries[1]["data"]
                assert (data["reason"], data["enforced"], data["mode"]) == (reason, enforcing, mode)
                assert data["observed"] == {"imei": HOME_IMEI, "iccid": HOME_ICCID}
            event_types = [e["type"] for e in t.events()]
            assert event_types == [x for x in expected if x != "binding_checked"]

            transcript = t.fake.transcript
            assert len(sent(transcript, "AT+CFUN=4")) == 1
            allowed = {HOME_ICCID} if radio_on and status != "no_sim" else set()
            if status == "no_sim" and radio_on:  # observe: no card, nothing to verify
                assert len(sent(transcript, "AT+CFUN=1")) == 1
            else:
                assert assert_radio_on_only_after_allowed_card(transcript, allowed) == (1 if radio_on else 0)
            assert not any("CFUN=0" in e["line"] for e in transcript if e["dir"] == "in")

    run(scenario())


@pytest.mark.parametrize("on_violation", ["detach", "report"])
def test_without_radio_gate_only_violations_act(open_terminal, on_violation):
    policy = BindingPolicy(on_violation=on_violation, radio_gate=False)

    async def scenario():
        async with open_terminal(policy, bindings=((FOREIGN_ICCID, HOME_IMEI),), profile="quectel") as t:
            assert (t.started.status, t.started.reason) == ("violation", "iccid_mismatch")
            transcript = t.fake.transcript
            assert sent(transcript, "AT+CFUN=4") == [] and sent(transcript, "AT+CFUN=1") == []
            assert t.fake.state()["cfun"] == 1
            detaches = sent(transcript, "AT+CGATT=0")
            if on_violation == "detach":
                assert len(detaches) == 1
                assert t.types() == ["binding_violation", "radio_blocked"]
                assert t.evidence()[1]["data"]["command"] == "+CGATT=0"
                await t.settle()
                assert t.fake.state()["attached"] is False
                assert t.enforcer.state()["radio"]["gated"] is False  # radio on, packet service off
            else:
                assert detaches == []
                assert t.types() == ["binding_violation"]
                assert t.evidence()[0]["data"]["enforced"] is False

    run(scenario())


def test_without_radio_gate_no_sim_leaves_the_radio_alone(open_terminal):
    async def scenario():
        async with open_terminal(BindingPolicy(radio_gate=False), profile="quectel", no_sim=True) as t:
            assert t.started.status == "no_sim"
            assert t.fake.state()["cfun"] == 1
            assert t.enforcer.state()["radio"] == {"cfun": 1, "gated": False}
            assert t.types() == ["binding_checked"]

    run(scenario())
