"""The radio gate as a sans-IO state machine: what the enforcer must do next, and nothing else.

The product's one promise is that a card the binding does not allow never attaches from
this terminal: check first, then switch the radio on. This module holds every rule about
*when* the radio may go on, in the style of h11's ``_state.py``: one table of transitions
and no I/O. The enforcement shell (`agent.service.enforcer`) feeds it typed inputs (a session
opened, the tray changed, a fact read finished, the binding decided, a radio command
failed...) and carries out the actions it gets back, in order. It never decides itself.

The model. The gate knows, for the card in the tray, one of three things:

- nothing valid: ``UNDECIDED`` (a fact read is under way), ``STALE`` (a read is under way
  but the tray changed after it began, so its facts belong to the previous card and are
  dropped) or ``RETRYING`` (the last attempt failed: modem error, unreadable SIM, a decision
  that could not be recorded, a radio command that did not go through; a retry is due);
- the card is allowed: ``ALLOWED``, or ``RECHECKING`` while that is being confirmed (a poll,
  an accepted token, a binding reset, a reloaded policy) with the radio left on;
- the card is not allowed through the gate: ``DENIED`` (a violation, or no SIM): the radio
  is off, detached or left alone (report only, or a policy that never touches the radio),
  as the decision says.

``LOST`` is the state before a modem session opens and after it ends.

Rules the table keeps (the tests check each against every row):

1. The tray changing or the module rebooting always emits ``GATE`` (radio off, when the
   policy gates) and leaves every "allowed" state, before anything else happens.
2. ``RADIO_ON`` is emitted only by an ``ALLOW`` verdict, and a verdict is only taken in a
   state whose fact read started after the last change (``UNDECIDED``, ``RECHECKING``); a
   read overtaken by a change (``STALE``) is read again, never decided.
3. At most one fact read is outstanding: ``READ_FACTS`` is emitted only from states that
   have none under way; facts and verdicts arriving in any other state are impossible
   (``None`` in the table: the shell has a bug, ``GateError`` is raised).
4. Failures never switch the radio on: they lead to ``RETRYING`` (or keep an allowed card
   as it is and retry the confirmation).

Which radio level ``GATE`` and ``RADIO_OFF`` mean, whether a level is already in place,
and what is recorded as evidence is the shell's business; so is turning a decision into a
verdict input (`verdict_for`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["GateState", "Input", "Action", "Transition", "TRANSITIONS", "Gate", "GateError",
           "READ_UNDER_WAY", "table_markdown"]


class GateState(enum.Enum):
    LOST = "lost"
    UNDECIDED = "undecided"
    STALE = "stale"
    RETRYING = "retrying"
    RECHECKING = "rechecking"
    ALLOWED = "allowed"
    DENIED = "denied"


class Input(enum.Enum):
    OPENED = "opened"  # a modem session opened (port open, nothing known)
    SIM_CHANGED = "sim_changed"  # insertion/removal URC, or a poll saw another tray
    REBOOTED = "rebooted"  # boot URC, or the radio level changed behind the agent's back
    FACTS_SAME = "facts_same"  # the fact read finished: the card of the last decision
    FACTS_NEW = "facts_new"  # the fact read finished: another card (or none) than last decided
    FACTS_FAILED = "facts_failed"  # the fact read failed (modem error or timeout)
    ALLOW = "allow"  # verdict: the card may use the network
    DENY = "deny"  # verdict: radio off (a violation, or no SIM with the gate on)
    DETACH = "detach"  # verdict: a violation answered with +CGATT=0
    LEAVE = "leave"  # verdict: leave the radio as it is (a violation only reported, or a policy that never gates)
    UNREADABLE = "unreadable"  # verdict: nothing decidable (SIM/IMEI unreadable, store unwritable)
    RADIO_FAILED = "radio_failed"  # a radio command did not go through after its retries
    RECHECK = "recheck"  # token accepted, binding reset, policy reloaded, poll due
    RETRY_DUE = "retry_due"  # the retry timer fired
    RADIO_FOUND_ON = "radio_found_on"  # a read shows the radio on although the gate holds it off
    LOST = "lost"  # the session ended (port lost)


class Action(enum.Enum):
    GATE = "gate"  # radio off (+CFUN=4) when the policy gates, else nothing
    RADIO_OFF = "radio_off"  # +CFUN=4 whatever the policy (a radio-off violation)
    DETACH = "detach"  # +CGATT=0
    RADIO_ON = "radio_on"  # +CFUN=1 (and +CGATT=1 after a detach)
    REINIT = "reinit"  # initialise the module and read its identity (after power-on)
    READ_FACTS = "read_facts"  # read SIM state and ICCID; feed FACTS_SAME/NEW/FAILED
    DECIDE = "decide"  # decide and record on the facts just read; feed the verdict at once
    RETRY_LATER = "retry_later"  # arm the retry timer (feeds RETRY_DUE)


class GateError(RuntimeError):
    """An input the current state cannot receive: the shell broke the protocol."""


@dataclass(frozen=True)
class Transition:
    next: GateState
    actions: tuple[Action, ...] = ()


S, I, A = GateState, Input, Action
T = Transition

# States with a fact read under way (its FACTS_* input is still to come).
READ_UNDER_WAY = frozenset({S.UNDECIDED, S.STALE, S.RECHECKING})
_VERDICTS = (I.ALLOW, I.DENY, I.DETACH, I.LEAVE, I.UNREADABLE)
_FACTS = (I.FACTS_SAME, I.FACTS_NEW, I.FACTS_FAILED)


def _row(state: GateState, rules: dict[Input, Transition | None]) -> dict[tuple[GateState, Input], Transition | None]:
    return {(state, inp): rule for inp, rule in rules.items()}


# The one table. ``None`` marks an input the state cannot receive. Every pair is listed;
# the tests check the table is complete and that every row keeps the rules above.
TRANSITIONS: dict[tuple[GateState, Input], Transition | None] = {
    **_row(S.LOST, {
        I.OPENED: T(S.UNDECIDED, (A.GATE, A.REINIT, A.READ_FACTS)),
        I.SIM_CHANGED: T(S.LOST), I.REBOOTED: T(S.LOST),  # no session: nothing to act on
        **dict.fromkeys(_FACTS + _VERDICTS, None),
        I.RADIO_FAILED: T(S.LOST), I.RECHECK: T(S.LOST), I.RETRY_DUE: T(S.LOST),
        I.RADIO_FOUND_ON: T(S.LOST), I.LOST: T(S.LOST),
    }),
    **_row(S.UNDECIDED, {
        I.OPENED: None,
        I.SIM_CHANGED: T(S.STALE, (A.GATE,)),
        I.REBOOTED: T(S.STALE, (A.GATE, A.REINIT)),
        I.FACTS_SAME: T(S.UNDECIDED, (A.DECIDE,)),
        I.FACTS_NEW: T(S.UNDECIDED, (A.DECIDE,)),
        I.FACTS_FAILED: T(S.RETRYING, (A.GATE, A.RETRY_LATER)),
        I.ALLOW: T(S.ALLOWED, (A.RADIO_ON,)),
        I.DENY: T(S.DENIED, (A.RADIO_OFF,)),
        I.DETACH: T(S.DENIED, (A.DETACH,)),
        I.LEAVE: T(S.DENIED),
        I.UNREADABLE: T(S.RETRYING, (A.GATE, A.RETRY_LATER)),
        I.RADIO_FAILED: T(S.UNDECIDED, (A.RETRY_LATER,)),
        I.RECHECK: T(S.UNDECIDED),  # the read under way decides on the current bindings
        I.RETRY_DUE: T(S.UNDECIDED, (A.GATE,)),
        I.RADIO_FOUND_ON: T(S.UNDECIDED, (A.GATE,)),
        I.LOST: T(S.LOST),
    }),
    **_row(S.STALE, {
        I.OPENED: None,
        I.SIM_CHANGED: T(S.STALE, (A.GATE,)),
        I.REBOOTED: T(S.STALE, (A.GATE, A.REINIT)),
        I.FACTS_SAME: T(S.UNDECIDED, (A.READ_FACTS,)),  # facts of the previous card: read again
        I.FACTS_NEW: T(S.UNDECIDED, (A.READ_FACTS,)),
        I.FACTS_FAILED: T(S.UNDECIDED, (A.READ_FACTS,)),
        **dict.fromkeys(_VERDICTS, None),  # nothing is decided on stale facts
        I.RADIO_FAILED: T(S.STALE, (A.RETRY_LATER,)),
        I.RECHECK: T(S.STALE),
        I.RETRY_DUE: T(S.STALE, (A.GATE,)),
        I.RADIO_FOUND_ON: T(S.STALE, (A.GATE,)),
        I.LOST: T(S.LOST),
    }),
    **_row(S.RETRYING, {
        I.OPENED: None,
        I.SIM_CHANGED: T(S.UNDECIDED, (A.GATE, A.READ_FACTS)),
        I.REBOOTED: T(S.UNDECIDED, (A.GATE, A.REINIT, A.READ_FACTS)),
        **dict.fromkeys(_FACTS + _VERDICTS, None),
        I.RADIO_FAILED: T(S.RETRYING, (A.RETRY_LATER,)),
        I.RECHECK: T(S.UNDECIDED, (A.GATE, A.READ_FACTS)),
        I.RETRY_DUE: T(S.UNDECIDED, (A.GATE, A.READ_FACTS)),
        I.RADIO_FOUND_ON: T(S.RETRYING, (A.GATE,)),
        I.LOST: T(S.LOST),
    }),
    **_row(S.RECHECKING, {
        I.OPENED: None,
        I.SIM_CHANGED: T(S.STALE, (A.GATE,)),
        I.REBOOTED: T(S.STALE, (A.GATE, A.REINIT)),
        I.FACTS_SAME: T(S.RECHECKING, (A.DECIDE,)),
        I.FACTS_NEW: T(S.UNDECIDED, (A.GATE, A.DECIDE)),  # a change the agent had not seen
        I.FACTS_FAILED: T(S.ALLOWED, (A.RETRY_LATER,)),  # the allowed card stays as it is
        I.ALLOW: T(S.ALLOWED, (A.RADIO_ON,)),
        I.DENY: T(S.DENIED, (A.RADIO_OFF,)),
        I.DETACH: T(S.DENIED, (A.DETACH,)),
        I.LEAVE: T(S.DENIED),
        I.UNREADABLE: T(S.RETRYING, (A.GATE, A.RETRY_LATER)),
        I.RADIO_FAILED: T(S.RECHECKING, (A.RETRY_LATER,)),
        I.RECHECK: T(S.RECHECKING),
        I.RETRY_DUE: T(S.RECHECKING),
        I.RADIO_FOUND_ON: T(S.RECHECKING),
        I.LOST: T(S.LOST),
    }),
    **_row(S.ALLOWED, {
        I.OPENED: None,
        I.SIM_CHANGED: T(S.UNDECIDED, (A.GATE, A.READ_FACTS)),
        I.REBOOTED: T(S.UNDECIDED, (A.GATE, A.REINIT, A.READ_FACTS)),
        **dict.fromkeys(_FACTS + _VERDICTS, None),
        I.RADIO_FAILED: T(S.ALLOWED, (A.RETRY_LATER,)),  # +CFUN=1 did not go through
        I.RECHECK: T(S.RECHECKING, (A.READ_FACTS,)),
        I.RETRY_DUE: T(S.RECHECKING, (A.READ_FACTS,)),
        I.RADIO_FOUND_ON: T(S.ALLOWED),
        I.LOST: T(S.LOST),
    }),
    **_row(S.DENIED, {
        I.OPENED: None,
        I.SIM_CHANGED: T(S.UNDECIDED, (A.GATE, A.READ_FACTS)),
        I.REBOOTED: T(S.UNDECIDED, (A.GATE, A.REINIT, A.READ_FACTS)),
        **dict.fromkeys(_FACTS + _VERDICTS, None),
        I.RADIO_FAILED: T(S.RETRYING, (A.RETRY_LATER,)),  # the violation's radio-off failed
        I.RECHECK: T(S.UNDECIDED, (A.GATE, A.READ_FACTS)),
        I.RETRY_DUE: T(S.UNDECIDED, (A.GATE, A.READ_FACTS)),
        I.RADIO_FOUND_ON: T(S.UNDECIDED, (A.GATE, A.READ_FACTS)),  # decide again, act again
        I.LOST: T(S.LOST),
    }),
}


class Gate:
    """The gate of one modem session. ``feed`` returns the actions to carry out, in order."""

    def __init__(self) -> None:
        self.state = GateState.LOST

    def feed(self, inp: Input) -> tuple[Action, ...]:
        transition = TRANSITIONS[(self.state, inp)]
        if transition is None:
            raise GateError(f"input {inp.value} cannot arrive in state {self.state.value}")
        self.state = transition.next
        return transition.actions

    @property
    def read_under_way(self) -> bool:
        return self.state in READ_UNDER_WAY

    @property
    def allowed(self) -> bool:
        """The card in the tray is known to be allowed (the radio may be on)."""
        return self.state in (GateState.ALLOWED, GateState.RECHECKING)


def table_markdown() -> str:
    """The transition table as Markdown (rows: inputs, columns: states), for the README."""
    states = list(GateState)
    lines = ["| input \\ state | " + " | ".join(s.value for s in states) + " |",
             "|---|" + "---|" * len(states)]
    for inp in Input:
        cells = []
        for state in states:
            transition = TRANSITIONS[(state, inp)]
            if transition is None:
                cells.append("—")
            else:
                acts = ", ".join(a.value for a in transition.actions)
                cells.append(transition.next.value + (f": {acts}" if acts else ""))
        lines.append(f"| **{inp.value}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)
