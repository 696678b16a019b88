"""The radio gate's transition table (agent/core/gate.py): complete, every row keeps the rules
of the module docstring, and random input sequences never switch the radio on for a
card whose facts were not read after the last change."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import gate
from agent.core.gate import READ_UNDER_WAY, TRANSITIONS, Action, Gate, GateError, GateState, Input

S, I, A = GateState, Input, Action
PAIRS = [(s, i) for s in GateState for i in Input]
FACTS = (I.FACTS_SAME, I.FACTS_NEW, I.FACTS_FAILED)
VERDICTS = (I.ALLOW, I.DENY, I.DETACH, I.LEAVE, I.UNREADABLE)
CHANGES = (I.SIM_CHANGED, I.REBOOTED)
# States a verdict may arrive in: those that can have emitted DECIDE.
DECIDING = {s for (s, i), t in TRANSITIONS.items() if t is not None and A.DECIDE in t.actions}


def test_table_is_complete():
    assert set(TRANSITIONS) == set(PAIRS)


def test_table_in_readme_is_the_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert gate.table_markdown() in readme, "README's gate table is out of date: paste gate.table_markdown()"


@pytest.mark.parametrize("state,inp", PAIRS, ids=[f"{s.value}-{i.value}" for s, i in PAIRS])
def test_every_row_keeps_the_rules(state, inp):
    t = TRANSITIONS[(state, inp)]
    # Rule 3: facts only where a read is under way; verdicts only where DECIDE was emitted.
    if inp in FACTS:
        assert (t is None) == (state not in READ_UNDER_WAY)
    elif inp in VERDICTS:
        assert (t is None) == (state not in DECIDING)
    elif inp is I.OPENED:
        assert (t is None) == (state is not S.LOST)
    else:
        assert t is not None
    if t is None:
        return
    # Reads: a READ_FACTS only from a state with none under way (STALE counts as
    # finished once its facts arrive), and the target state has one under way.
    if A.READ_FACTS in t.actions:
        assert state not in READ_UNDER_WAY or inp in FACTS
        assert t.next in READ_UNDER_WAY
    elif state in READ_UNDER_WAY and inp not in FACTS + VERDICTS and t.next is not S.LOST:
        assert t.next in READ_UNDER_WAY, "a read under way is not forgotten"
    # Rule 1: a change gates and leaves every allowed state (LOST has nothing to gate).
    if inp in CHANGES and state is not S.LOST:
        assert A.GATE in t.actions
        assert t.next not in (S.ALLOWED, S.RECHECKING)
        assert t.next is (S.STALE if state in READ_UNDER_WAY else S.UNDECIDED)
    if inp is I.REBOOTED and state is not S.LOST:
        assert A.REINIT in t.actions
        assert t.actions.index(A.GATE) < t.actions.index(A.REINIT)
    # Rule 2: the radio goes on only on an ALLOW verdict, into ALLOWED.
    if A.RADIO_ON in t.actions:
        assert inp is I.ALLOW and t.next is S.ALLOWED
    if inp is I.ALLOW:
        assert t.actions == (A.RADIO_ON,)
    # Only an ALLOW (or keeping an already allowed card) leads into an allowed state.
    if t.next in (S.ALLOWED, S.RECHECKING) and state not in (S.ALLOWED, S.RECHECKING):
        assert inp is I.ALLOW
    # Rule 4: failures never allow.
    if inp in (I.FACTS_FAILED, I.UNREADABLE, I.RADIO_FAILED):
        assert A.RADIO_ON not in t.actions
        if state not in (S.ALLOWED, S.RECHECKING, S.LOST, S.STALE, S.UNDECIDED):
            assert t.next is S.RETRYING
        assert A.RETRY_LATER in t.actions or t.next is not S.RETRYING or inp is I.FACTS_FAILED and state is S.STALE
    # A violation acts as the verdict says; LOST is the end.
    if inp is I.DENY:
        assert t == gate.Transition(S.DENIED, (A.RADIO_OFF,))
    if inp is I.LOST:
        assert t == gate.Transition(S.LOST)
    if inp is I.RADIO_FOUND_ON and state not in (S.ALLOWED, S.RECHECKING, S.LOST):
        assert A.GATE in t.actions


def test_an_impossible_input_raises_and_changes_nothing():
    g = Gate()
    with pytest.raises(GateError):
        g.feed(I.ALLOW)
    assert g.state is S.LOST


def test_a_swap_during_a_check_drops_its_facts_and_reads_again():
    g = Gate()
    assert g.feed(I.OPENED) == (A.GATE, A.REINIT, A.READ_FACTS)
    assert g.feed(I.SIM_CHANGED) == (A.GATE,)
    assert g.feed(I.FACTS_SAME) == (A.READ_FACTS,)  # the previous card's facts: dropped
    assert g.feed(I.FACTS_NEW) == (A.DECIDE,)
    assert g.feed(I.ALLOW) == (A.RADIO_ON,)
    assert g.state is S.ALLOWED


# -- model-based: random inputs, fed the way the shell feeds them --------------------------


class Model:
    """What the shell would see: which reads are outstanding and whether the read that
    produced the facts started after the last change."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.reads: list[int] = []  # change epoch at which each outstanding read started
        self.epoch = 0
        self.pending_decide: int | None = None  # epoch of the facts being decided

    def possible(self) -> list[Input]:
        if self.pending_decide is not None:
            return list(VERDICTS)
        inputs = [I.SIM_CHANGED, I.REBOOTED, I.RADIO_FAILED, I.RECHECK, I.RETRY_DUE, I.RADIO_FOUND_ON]
        if self.gate.state is S.LOST:
            inputs.append(I.OPENED)
        if self.reads:
            inputs += list(FACTS)
        return inputs

    def feed(self, inp: Input) -> None:
        if inp in CHANGES and self.gate.state is not S.LOST:
            self.epoch += 1
        facts_epoch = None
        if inp in FACTS:
            facts_epoch = self.reads.pop(0)
        actions = self.gate.feed(inp)
        if inp in VERDICTS:
            decided, self.pending_decide = self.pending_decide, None
            if A.RADIO_ON in actions:
                assert decided == self.epoch, "radio on for facts read before the last change"
        for action in actions:
            if action is A.READ_FACTS:
                self.reads.append(self.epoch)
            elif action is A.DECIDE:
                assert inp in FACTS and inp is not I.FACTS_FAILED
                assert facts_epoch == self.epoch, "deciding on facts read before the last change"
                self.pending_decide = facts_epoch
        assert len(self.reads) <= 1, "two fact reads outstanding"
        assert (len(self.reads) == 1) == (self.gate.state in READ_UNDER_WAY) or self.pending_decide is not None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=80))
def test_random_sequences_keep_the_invariant(choices):
    model = Model()
    model.feed(I.OPENED)
    for choice in choices:
        options = model.possible()
        model.feed(options[choice % len(options)])
