"""Binding enforcement on the modem (SPEC §4): the imperative shell around `agent.core.gate`
(when the radio may be on) and `agent.core.binding` (whether this card is allowed here).

The shell turns what happens into gate inputs and carries out the actions the gate
returns; every rule about ordering lives in the gate's table. It has three workers:

- the **radio worker** drives the module towards the level the gate last asked for
  ("off" = ``+CFUN=4``, "on" = ``+CFUN=1``, "detached" = ``+CGATT=0``). Its commands go to
  the AT client with ``priority``: they never wait behind a caller's commands, and an
  abortable command in flight (a network scan) is aborted for them. A command that does
  not go through is retried a few times (modules refuse CFUN while the SIM initialises;
  ``+CFUN`` is idempotent, so a slow one is simply sent again), then reported to the
  gate as ``RADIO_FAILED``. Each change the module made is an evidence entry
  (``radio_blocked`` / ``radio_restored``). Only the latest wish counts: a radio-on that
  was overtaken by a SIM change is never sent.
- the **fact worker** runs the gate's reads in order (re-initialise after power-on, read
  SIM state and ICCID), each only once the radio worker is idle, so the gate always goes
  first. A finished read is fed back at once, and a ``DECIDE`` the gate returns is done
  synchronously in the same step (`binding.evaluate`, one store transaction): nothing can
  come between the facts and the decision taken on them.
- the **poll timer** feeds ``RECHECK`` every ``sim_poll_interval`` for profiles that do
  not announce SIM changes and reboots by URC; a poll also reads ``+CFUN?``: a level the
  agent did not set means the module reset behind its back (``REBOOTED``).

URCs are classified on arrival (in the AT reader): a SIM change or a reboot is fed to
the gate at once, so its ``GATE`` reaches the radio worker within the same loop turn.
``+CPIN: NOT READY`` printed within `NOT_READY_WINDOW` of the agent's own CFUN change is
the module reacting to that change, not a removal; a ``+CPIN?`` read confirms it.

Callers' AT commands (`user_command`) go through here too: while the radio is held off,
a write that could bring the card onto the network is refused to everyone, root
included, and every accepted write is an evidence entry, after which the radio level is
read again so the state document is never stale.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.core import tokens
from agent.core.binding import (DETACH, IMEI_UNREADABLE, LAST_IMEI_KEY, RADIO_OFF, RADIO_ON, SIM_LOCKED,
                                SIM_UNREADABLE, BindingPolicy, Decision, Observation, evaluate, reset_bindings)
from agent.core.facts import binding_fact
from agent.core.gate import Action, Gate, GateState, Input
from agent.core.store import Binding, Store
from at_commands.client import GATE_PRIORITY, GATE_RADIO, GATE_READ, CommandError, CommandTimeout, PortLost, Response
from at_commands.commands import is_abortable, is_harmless_write
from at_commands.modem import (Identity, Modem, ModemEvent, ModemRebooted, NetworkTime, RegistrationChanged,
                               SimInserted, SimRemoved)
from at_commands.parsers import ParseError

log = logging.getLogger(__name__)

RADIO_ON_CFUN, RADIO_OFF_CFUN = 1, 4
# "+CPIN: NOT READY" this soon (seconds) after the agent's own CFUN change is not a removal.
NOT_READY_WINDOW = 3.0
# Boot URCs this close (seconds) to the previous boot belong to it, unless they repeat one.
BOOT_BURST = 10.0
# Radio commands: the wait for one answer, attempts, and the delay step between them.
RADIO_TIMEOUT = 3.0
RADIO_ATTEMPTS = 6
RETRY_STEP = 0.2
# A check that failed (unreadable SIM/IMEI, modem error, store unwritable, radio command
# refused) is tried again this much later.
RETRY_DELAY = 1.0
# Callers' AT commands: an answer is awaited this long; a network scan (abortable, so it
# never delays the gate) up to SCAN_TIMEOUT.
USER_TIMEOUT = 10.0
SCAN_TIMEOUT = 180.0
# Errors a read or a radio command survives (reported to the gate); PortLost and bugs
# end the session.
_MODEM_ERRORS = (CommandError, CommandTimeout, ParseError)
# A check whose decision could not be recorded (disk full, I/O error): without evidence
# there is no decision, so with radio_gate the radio is held off until one can be.
STORE_UNWRITABLE = "store_unwritable"
_RETRY_STATUSES = (SIM_LOCKED, SIM_UNREADABLE, IMEI_UNREADABLE, STORE_UNWRITABLE)


class Radio(str, enum.Enum):
    """The level the gate wants the module at."""

    OFF = "off"
    ON = "on"
    DETACHED = "detached"


class Trigger(enum.StrEnum):
    """What made the agent look at the tray again: the `trigger` word of the records and
    events a check leads to. A fixed vocabulary, so a consumer can switch on it; the AT
    line behind it (a URC, a SIM line in a caller's answer, the +CFUN answer that revealed
    a reset) travels beside it as `trigger_line`."""

    SESSION_START = "session_start"  # a modem session opened (agent start, modem found again)
    POLL = "poll"  # the periodic check of profiles without hot-swap URCs
    RETRY = "retry"  # the previous check failed or was overtaken
    POLICY_RELOADED = "policy_reloaded"  # SIGHUP changed [binding]
    TOKEN_ACCEPTED = "token_accepted"
    BINDINGS_RESET = "bindings_reset"  # simagent bind reset
    URC_SIM_REMOVED = "urc_sim_removed"  # the module announced a removal
    URC_SIM_INSERTED = "urc_sim_inserted"  # the module announced an insertion
    URC_BOOT = "urc_boot"  # the module announced a (re)boot
    ANSWER_SIM_LINE = "answer_sim_line"  # a caller's answer carried a SIM-state line
    CFUN_RESET = "cfun_reset"  # a poll read a radio level the agent did not set
    AT_WRITE = "at_write"  # a caller's AT write (the radio level is read again)


class _Job(enum.Enum):
    REINIT = "reinit"
    READ_FACTS = "read_facts"
    CONFIRM_REMOVAL = "confirm_removal"


class GateRefused(Exception):
    """A caller's AT write refused because the gate holds the radio off."""

    code = "gate_holds_radio"


@dataclass(frozen=True)
class Facts:
    sim_state: str
    iccid: str | None
    imsi: str | None


def verdict_for(decision: Decision) -> Input:
    """The gate input a binding decision amounts to."""
    if decision.status in _RETRY_STATUSES:
        return Input.UNREADABLE
    if RADIO_ON in decision.actions:
        return Input.ALLOW
    if RADIO_OFF in decision.actions:
        return Input.DENY
    if DETACH in decision.actions:
        return Input.DETACH
    return Input.LEAVE

# A cell that sends a new forged time again and again: each rejection is an fsync and an
# entry in the append-only log, so only the first of each window are recorded one by one;
# the next recorded one says how many were left out before it.
TIME_REJECTIONS_RECORDED = (5, 3600.0)  # (entries, window in seconds)


class _RecordBudget:
    """At most `count` records per `window` seconds."""

    def __init__(self, count: int, window: float) -> None:
        self.count, self.window = count, window
        self._spent, self._window_ends, self._unrecorded = 0, float("-inf"), 0

    def spend(self, now: float) -> int | None:
        """None: over budget, not to be recorded (counted). Else how many were left out
        before this one."""
        if now >= self._window_ends:
            self._spent, self._window_ends = 0, now + self.window
        if self._spent >= self.count:
            self._unrecorded += 1
            return None
        self._spent += 1
        unrecorded, self._unrecorded = self._unrecorded, 0
        return unrecorded


class Enforcer:
    """One per modem session. `await start()` (gates, initialises, first decision), then
    `await run()` until the modem goes away (PortLost)."""

    def __init__(self, modem: Modem, store: Store, policy: BindingPolicy, *, sim_poll_interval: float = 5.0,
                 on_change: Callable[[], None] | None = None,
                 on_identity: Callable[[str | None], Awaitable[None]] | None = None) -> None:
        """`on_identity(imei)` runs each time the IMEI has been read, before the binding
        decision that follows (the daemon reads the manufacturing provision file there)."""
        if sim_poll_interval <= 0:
            raise ValueError(f"sim_poll_interval must be > 0, got {sim_poll_interval}")
        self.modem = modem
        self.store = store
        self.policy = policy
        self.sim_poll_interval = sim_poll_interval
        self._on_change = on_change
        self._on_identity = on_identity
        self.gate = Gate()
        # radio worker
        self._target: Radio | None = None
        self._target_why: dict = {}
        self._radio_wake = asyncio.Event()
        self._radio_idle = asyncio.Event()
        self._radio_idle.set()
        self._cfun: int | None = None  # the level last set or read; None = unknown
        self._detached = False  # +CGATT=0 sent and not undone
        self._radio_changed_at = float("-inf")
        # fact worker
        self._jobs: asyncio.Queue[tuple[_Job, str]] = asyncio.Queue()
        # Why the next decision is taken (its records' `trigger`), and the AT line behind it.
        self._trigger = Trigger.SESSION_START
        self._trigger_line: str | None = None
        self._identity: Identity | None = None
        self._sim: dict[str, Any] = {"state": "unknown", "iccid": None, "imsi": None}  # the last read, shown
        self._card: str | None = None  # the ICCID last seen in the tray (an unreadable read leaves it)
        self._sim_known = False
        self._removal_seen = False  # a removal was announced since the last observation
        self._recheck_after_decision: str | None = None  # a caller's answer looked like a SIM URC
        self._decision: Decision | None = None
        self._decision_waiters: list[asyncio.Future] = []
        self._booted_at = float("-inf")
        self._rejected_time_line: str | None = None
        self._time_rejections = _RecordBudget(*TIME_REJECTIONS_RECORDED)
        self._boot_lines: set[str] = set()  # boot URC lines (upper case) seen since the current boot began
        self._boots = 0  # boots seen: a radio level learnt across one is not the module's
        self._evidence_gap: dict | None = None  # what the evidence misses while the store failed
        self._retry: asyncio.TimerHandle | None = None
        self._poll_wake = asyncio.Event()
        self._failure: asyncio.Future | None = None
        self._workers: list[asyncio.Task] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._published: dict | None = None
        # Wall time of the last read the modem answered (SPEC §8: facts say how fresh they are).
        self.read_at: float | None = None

    # -- public API -------------------------------------------------------------------

    @property
    def polling(self) -> bool:
        """True unless the profile announces both SIM changes and reboots by URC. A module
        without boot URCs loses its hot-swap reporting in a silent reset, so it is polled."""
        return not self.modem.profile.reports_sim_changes

    @property
    def held_off(self) -> bool:
        """The gate (or a violation) holds the radio off or detached."""
        gating = self.policy.radio_gate and not self.gate.allowed
        return self._target in (Radio.OFF, Radio.DETACHED) or gating

    async def start(self) -> Decision:
        """Gates the radio first, initialises the module, reads the identity, then decides
        and acts. Returns the first decision once the radio is where it says."""
        loop = asyncio.get_running_loop()
        self._failure = loop.create_future()
        unsubscribe_urcs = self.modem.subscribe(self._on_modem_event)
        unsubscribe_lookalikes = self.modem.client.subscribe_lookalikes(self._on_lookalike)

        def unsubscribe() -> None:
            unsubscribe_urcs()
            unsubscribe_lookalikes()

        self._unsubscribe = unsubscribe
        self._workers = [loop.create_task(self._radio_worker(), name="gate-radio"),
                         loop.create_task(self._fact_worker(), name="gate-facts"),
                         loop.create_task(self._poll_timer(), name="gate-poll")]
        for worker in self._workers:
            worker.add_done_callback(self._worker_done)
        first = self._next_decision()
        self._feed(Input.OPENED, {"reason": "start"})
        try:
            decision = await self._until(first)
            await self._until(self._radio_settled())
        except BaseException:
            await self.close()  # a session that fails here leaves no worker behind (run() never will)
            raise
        return decision

    async def run(self) -> None:
        """Until the modem goes away (raises PortLost) or a worker fails (re-raised)."""
        if self._failure is None:
            raise RuntimeError("Enforcer.run() before start()")
        try:
            await self._until(self._failure)
        finally:
            await self.close()

    async def close(self) -> None:
        if self.gate.state is not GateState.LOST:
            self.gate.feed(Input.LOST)
        if self._retry is not None:
            self._retry.cancel()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for waiter in self._decision_waiters:
            waiter.cancel()

    async def check(self, trigger: Trigger, timeout: float = 15.0) -> Decision:
        """Decides again (the bindings or the policy changed) and returns the decision,
        or the standing one if the modem cannot be read within `timeout`."""
        waiter = self._next_decision()
        self._set_trigger(trigger)
        self._feed(Input.RECHECK)
        try:
            async with asyncio.timeout(timeout):
                decision = await self._until(waiter)
                await self._until(self._radio_settled())
            return decision
        except TimeoutError:
            return self._decision or Decision(SIM_UNREADABLE, radio_allowed=False)

    def update_policy(self, policy: BindingPolicy) -> None:
        """A reloaded `[binding]` section (SIGHUP): applies it with a fresh check."""
        self.policy = policy
        self._poll_wake.set()
        self._set_trigger(Trigger.POLICY_RELOADED)
        self._feed(Input.RECHECK)

    async def accept_token(self, token: str, keys: Sequence[tokens.TrustedKey], *, source: str = "token",
                           actions: Sequence[str] = tokens.BINDING_ACTIONS,
                           opened: tokens.Opened | None = None) -> tokens.TokenResult:
        """A rebind/unbind token (`opened`: see tokens.verify_token); an accepted one is
        applied at once (the radio comes back when the card is now allowed). A refused one
        changes nothing but its record."""
        result = tokens.accept_token(self.store, token, list(keys), self._imei(), source=source, actions=actions,
                                     opened=opened)
        if result.accepted:
            await self.check(Trigger.TOKEN_ACCEPTED)
        return result

    async def reset(self, reason: str, uid: int) -> list[Binding]:
        """`bind reset` (root, audited): forgets every binding, then checks again."""
        removed = reset_bindings(self.store, reason, uid)
        await self.check(Trigger.BINDINGS_RESET)
        return removed

    async def user_command(self, line: str, *, write: bool, who: dict[str, Any]) -> Response:
        """A caller's AT command line; the caller has checked who may send it (`write`:
        a root `--unsafe` or a platform token) and `at_rules.check_command` what it is.
        Raises GateRefused, or the client's errors."""
        def check() -> None:
            if self.held_off and not is_harmless_write(line):
                raise GateRefused(
                    f"refused: the binding gate holds the radio off ({self._gate_words()}) and {line.strip()} could "
                    "bring the card onto the network; lift the gate with a rebind token (simagent bind accept TOKEN) "
                    "or simagent bind reset --reason TEXT")

        def admit() -> None:
            # Once the channel is the write's, right before it goes on the wire: the gate
            # may have closed while it waited (the tray changed), so it is judged again.
            check()
            # Recorded before it is sent: a crash in between leaves the intent, not a gap.
            self.store.record("at_write", {**who, "command": line.strip(), "gate": self.gate.state.value}, event=False)

        if write:
            check()  # refused at once when it would be
        timeout = SCAN_TIMEOUT if is_abortable(line) else USER_TIMEOUT
        try:
            return await self.modem.client.command(line.strip(), timeout, check=False, abortable=is_abortable(line),
                                                   guard=admit if write else None)
        finally:
            if write:  # whatever it did to the radio, the state document must say so
                self._cfun = None
                # ... and whatever it did to the module's settings, the ones the gate relies
                # on (hot-swap reports, error codes, echo) are set again; re-initialising
                # also reads +CFUN? again (the level is unknown now).
                self._jobs.put_nowait((_Job.REINIT, Trigger.AT_WRITE))
                self._publish()

    def state(self) -> dict:
        """The SPEC §6 state-document parts this layer knows."""
        identity = self._identity
        imei = self._imei()
        return {
            "modem": {
                "vendor": identity.vendor if identity else None,
                "model": identity.model if identity else None,
                "revision": identity.revision if identity else None,
                "imei": imei,
                "imei_luhn_ok": identity.imei_luhn_ok if identity else None,
                "profile": self.modem.profile.name,
            },
            "sim": dict(self._sim),
            "binding": binding_fact(self.policy.mode, self._decision, self.store.read().bindings(),
                                    self._sim["iccid"], imei),
            "radio": {"cfun": self._cfun, "gated": self._target is Radio.OFF and self._cfun == RADIO_OFF_CFUN},
            "gate": self.gate.state.value,
        }

    # -- the gate and its actions -------------------------------------------------------

    def _set_trigger(self, trigger: Trigger, line: str | None = None) -> None:
        self._trigger, self._trigger_line = trigger, line

    def _trigger_fields(self) -> dict[str, str]:
        """`trigger` (a word), and `trigger_line` when an AT line was behind it."""
        if self._trigger_line is None:
            return {"trigger": self._trigger}
        return {"trigger": self._trigger, "trigger_line": self._trigger_line}

    def _feed(self, inp: Input, why: dict | None = None, facts: Facts | None = None) -> None:
        """Feeds one input and carries out what the gate answers, in order. `why` goes
        into the evidence of radio actions, with the current trigger unless it names its
        own; `facts` are a finished read's."""
        why = why or {"reason": inp.value}
        if "trigger" not in why:
            why = {**why, **self._trigger_fields()}
        for action in self.gate.feed(inp):
            self._carry_out(action, why, facts)
        self._publish()

    def _carry_out(self, action: Action, why: dict, facts: Facts | None) -> None:
        if action is Action.GATE:
            if self.policy.radio_gate:
                self._want(Radio.OFF, why)
        elif action is Action.RADIO_OFF:
            self._want(Radio.OFF, why)
        elif action is Action.DETACH:
            self._want(Radio.DETACHED, why)
        elif action is Action.RADIO_ON:
            self._want(Radio.ON, why)
        elif action is Action.REINIT:
            self._jobs.put_nowait((_Job.REINIT, why.get("reason", "")))
        elif action is Action.READ_FACTS:
            self._jobs.put_nowait((_Job.READ_FACTS, why.get("reason", "")))
        elif action is Action.DECIDE:
            assert facts is not None, "the gate decides only on facts just read"
            self._decide(facts)
        elif action is Action.RETRY_LATER:
            if self._retry is None:
                self._retry = asyncio.get_running_loop().call_later(RETRY_DELAY, self._retry_due)

    def _retry_due(self) -> None:
        self._retry = None
        self._set_trigger(Trigger.RETRY)
        self._feed(Input.RETRY_DUE, {"reason": "retry"})

    def _decide(self, facts: Facts) -> None:
        """Decides on facts just read and records it, in the same step as the read's input."""
        trigger = self._trigger_fields()
        try:
            if self._evidence_gap is not None:
                # Nothing is decided on top of a hole in the evidence: first say what is missing.
                gap = {**self._evidence_gap, "until": self.store.clock.now().iso()}
                self.store.record("evidence_gap", gap, event=False)
                self._evidence_gap = None
            self._note_sim(facts, trigger)
            decision = evaluate(self.store, Observation(self._imei(), facts.sim_state, facts.iccid), self.policy)
        except sqlite3.Error as exc:
            log.error("binding check (%s) could not be recorded (%s): radio held off, retrying", trigger["trigger"], exc)
            self._note_evidence_gap(exc)
            decision = Decision(STORE_UNWRITABLE, reason=str(exc), radio_allowed=False)
        self._decision = decision
        self._set_trigger(Trigger.RETRY)
        for waiter in self._decision_waiters:
            if not waiter.done():
                waiter.set_result(decision)
        self._decision_waiters.clear()
        why = {"reason": decision.reason or decision.status, **trigger,
               "iccid": self._sim["iccid"], "imei": self._imei()}
        self._feed(verdict_for(decision), why)
        line, self._recheck_after_decision = self._recheck_after_decision, None
        if line is not None:
            self._sim_report(line)

    def _note_sim(self, facts: Facts, trigger: dict[str, str]) -> None:
        """Records SIM removal/insertion seen by comparing with the last observation (or
        announced by a removal URC in between, e.g. the same card out and back in)."""
        present = False if facts.sim_state == "absent" else True if facts.iccid is not None else None
        self._sim = {"state": facts.sim_state, "iccid": facts.iccid, "imsi": facts.imsi}
        if present is None:
            return  # unreadable: nothing known about a change
        previous = self._card if self._sim_known else None
        changed = self._removal_seen or facts.iccid != previous
        with self.store.transaction() as tx:
            if previous is not None and changed:
                tx.record("sim_removed", {"iccid": previous, **trigger})
            if self._sim_known and present and changed:
                tx.record("sim_inserted", {"iccid": facts.iccid, "imsi": facts.imsi, **trigger})
        self._card = facts.iccid
        self._sim_known = True
        self._removal_seen = False

    def _next_decision(self) -> asyncio.Future:
        waiter = asyncio.get_running_loop().create_future()
        self._decision_waiters.append(waiter)
        return waiter

    # -- radio worker -----------------------------------------------------------------

    def _want(self, target: Radio, why: dict) -> None:
        if target is not self._target:
            self._target, self._target_why = target, why
        self._radio_wake.set()

    async def _radio_settled(self) -> None:
        while self._radio_wake.is_set() or not self._radio_idle.is_set():
            await self._radio_idle.wait()
            await asyncio.sleep(0)

    async def _radio_worker(self) -> None:
        GATE_PRIORITY.set(GATE_RADIO)  # this task's context only
        while True:
            await self._radio_wake.wait()
            self._radio_wake.clear()
            self._radio_idle.clear()
            target = self._target
            try:
                await self._drive(target)
            except _MODEM_ERRORS as exc:
                self._cfun = None
                if target is self._target and not self._radio_wake.is_set():
                    log.warning("radio %s failed: %s; checking again", target.value, exc)
                    self._feed(Input.RADIO_FAILED, {"reason": "radio_failed"})
            finally:
                self._radio_idle.set()

    async def _drive(self, target: Radio) -> None:
        if target is Radio.OFF:
            await self._set_cfun(RADIO_OFF_CFUN)
        elif target is Radio.ON:
            await self._set_cfun(RADIO_ON_CFUN)
            if self._detached and self._target is Radio.ON:
                await self._reattach()
        elif target is Radio.DETACHED and not self._detached:
            why = self._target_why
            if not await self._radio_command("AT+CGATT=0", target):
                return
            self._detached = True
            self._record_radio("radio_blocked", "+CGATT=0", None, why)

    async def _set_cfun(self, fun: int) -> None:
        if self._cfun == fun:
            return
        loop = asyncio.get_running_loop()
        self._radio_changed_at = loop.time()
        target, why, boots = self._target, self._target_why, self._boots  # the wish this command carries out
        previous = self._cfun
        if not await self._radio_command(f"AT+CFUN={fun}", target):
            return
        self._radio_changed_at = loop.time()
        # A boot in between put the module back to its power-on level: this command's
        # effect is gone (it is still evidence), and the level is unknown again.
        self._cfun = fun if boots == self._boots else None
        self._record_radio("radio_blocked" if fun == RADIO_OFF_CFUN else "radio_restored", f"+CFUN={fun}", previous,
                           why)

    async def _reattach(self) -> None:
        """Undoes a detach once the card is allowed. Before the module has registered
        this fails; a registration URC tries again."""
        why = self._target_why
        try:
            await self.modem.client.command("AT+CGATT=1", RADIO_TIMEOUT * 5, priority=GATE_RADIO)
        except _MODEM_ERRORS as exc:
            log.info("re-attach deferred: %s", exc)
            return
        self._detached = False
        self._record_radio("radio_restored", "+CGATT=1", None, why)

    async def _radio_command(self, command: str, target: Radio | None) -> bool:
        """Sends a radio command with priority, retrying; False when the wish changed meanwhile."""
        for attempt in range(1, RADIO_ATTEMPTS + 1):
            if target is not self._target:
                return False
            try:
                await self.modem.client.command(command, RADIO_TIMEOUT, priority=GATE_RADIO)
                return True
            except CommandTimeout as exc:
                # Sent but unanswered: the module may have carried it out. Every radio
                # command the gate sends is evidence, confirmed or not.
                self._record_unconfirmed(command, exc)
                if attempt == RADIO_ATTEMPTS:
                    raise
                log.info("%s failed (%s), attempt %d of %d", command, exc, attempt, RADIO_ATTEMPTS)
            except _MODEM_ERRORS as exc:
                if attempt == RADIO_ATTEMPTS:
                    raise
                log.info("%s failed (%s), attempt %d of %d", command, exc, attempt, RADIO_ATTEMPTS)
            await asyncio.sleep(RETRY_STEP * attempt)
        raise AssertionError("unreachable")

    def _record_unconfirmed(self, command: str, exc: Exception) -> None:
        self._cfun = None  # whether it took effect is unknown
        try:
            self.store.record("radio_unconfirmed", {**self._target_why, "command": command.removeprefix("AT"),
                                                    "error": str(exc)}, event=False)
        except sqlite3.Error as error:
            self._note_evidence_gap(error)

    def _record_radio(self, kind: str, command: str, cfun_before: int | None, why: dict) -> None:
        """`why` is the wish the command carried out, taken when it was sent (the wish may
        have changed while it was on the wire)."""
        try:
            self.store.record(kind, {**why, "command": command, "cfun_before": cfun_before})
        except sqlite3.Error as exc:  # the radio did change: the next decision records the gap
            log.error("%s (%s) could not be recorded: %s", kind, why.get("reason"), exc)
            self._note_evidence_gap(exc)
        self._publish()

    # -- fact worker ------------------------------------------------------------------

    async def _fact_worker(self) -> None:
        # The gate's reads go first too: a caller's scan never stands between a changed
        # tray and its decision (and the radio coming back for an allowed card).
        GATE_PRIORITY.set(GATE_READ)
        while True:
            job, reason = await self._jobs.get()
            await self._radio_settled()  # the gate goes first
            if job is _Job.REINIT:
                await self._reinit()
            elif job is _Job.READ_FACTS:
                await self._read_facts()
            elif job is _Job.CONFIRM_REMOVAL:
                await self._confirm_removal(reason)

    async def _reinit(self) -> None:
        """After power-on, a new session or a caller's write: echo off, error codes, profile,
        URCs on; identity and radio level read again."""
        try:
            await self.modem.initialise()
            await self._read_identity()
            if self._cfun is None and self._radio_idle.is_set() and not self._radio_wake.is_set():
                await self._read_cfun()  # unknown after a caller's write, or when the policy never gates
        except _MODEM_ERRORS as exc:  # the read that follows fails too, and is retried
            log.warning("modem initialisation failed: %s", exc)

    async def _read_facts(self) -> None:
        try:
            if self._identity is None or self._identity.imei is None:
                await self._read_identity()
            sim_state = await self.modem.read_sim_state()
            iccid = await self.modem.read_iccid() if sim_state in ("ready", "locked") else None
            imsi = await self.modem.read_imsi() if sim_state == "ready" else None
            reset = False
            if self.polling and self._cfun is not None:
                # A level the agent did not set means the module reset; a radio change
                # of the agent's own during the read proves nothing either way.
                known, changed_at = self._cfun, self._radio_changed_at
                cfun = await self.modem.get_cfun()
                reset = cfun != known and self._cfun == known and changed_at == self._radio_changed_at
        except _MODEM_ERRORS as exc:
            log.warning("binding check (%s) failed: %s; retrying", self._trigger, exc)
            self._feed(Input.FACTS_FAILED, {"reason": "read_failed"})
            return
        if reset:  # the module reset behind the agent's back: these facts are void
            self._rebooted(Trigger.CFUN_RESET, f"+CFUN: {cfun}")
            self._feed(Input.FACTS_FAILED, {"reason": "modem_rebooted"})
            return
        self.read_at = time.time()
        facts = Facts(sim_state, iccid, imsi)
        same = self._sim_known and not self._removal_seen and (sim_state, iccid) == (self._sim["state"], self._sim["iccid"])
        why = {"reason": "sim_changed"}
        self._feed(Input.FACTS_SAME if same else Input.FACTS_NEW, why, facts)

    async def _confirm_removal(self, line: str) -> None:
        try:
            state = await self.modem.read_sim_state()
        except _MODEM_ERRORS:
            state = "unknown"
        if state == "ready":
            log.debug("%r after the agent's radio change: SIM still ready", line)
            return
        self._sim_changed("sim_removed", line)

    async def _read_cfun(self) -> None:
        """The radio level as the module reports it (after a caller's write, or at start
        when the gate did not set it); the radio found on while held off is re-gated."""
        boots = self._boots
        try:
            level = await self.modem.get_cfun()
        except _MODEM_ERRORS as exc:
            log.info("+CFUN? failed: %s", exc)
            return
        if boots != self._boots:
            return  # the module rebooted meanwhile: the gate handles that
        self._cfun = level
        self.read_at = time.time()
        self._publish()
        if self._cfun == RADIO_ON_CFUN and self.held_off:
            self._feed(Input.RADIO_FOUND_ON, {"reason": "radio_found_on", "trigger": Trigger.AT_WRITE})

    async def _read_identity(self) -> None:
        identity = await self.modem.read_identity()
        with self.store.transaction() as tx:
            previous = tx.get_meta(LAST_IMEI_KEY)
            if identity.imei is not None:
                if previous is not None and previous != identity.imei:
                    # The module (or its IMEI) changed: evidence, the decision reports the rest.
                    tx.record("imei_changed", {"previous": previous, "imei": identity.imei}, event=False)
                tx.set_meta(LAST_IMEI_KEY, identity.imei)
        self._identity = identity
        self.read_at = time.time()
        if self._on_identity is not None:
            await self._on_identity(identity.imei)

    def _imei(self) -> str | None:
        return self._identity.imei if self._identity else None

    # -- URCs -------------------------------------------------------------------------

    def _on_modem_event(self, event: ModemEvent) -> None:
        """URC callback (in the AT reader): a change reaches the gate at once."""
        if isinstance(event, NetworkTime):
            self._network_time(event)
            return
        if isinstance(event, RegistrationChanged):
            if self._detached and self._target is Radio.ON:
                self._radio_wake.set()  # the pending re-attach may work now
            return
        own_radio_change = asyncio.get_running_loop().time() - self._radio_changed_at < NOT_READY_WINDOW
        if isinstance(event, SimRemoved):
            if own_radio_change and event.follows_radio:
                self._jobs.put_nowait((_Job.CONFIRM_REMOVAL, event.line))
            else:
                self._sim_changed("sim_removed", event.line)
        elif isinstance(event, SimInserted):
            if own_radio_change and event.follows_radio:
                # The same card coming back to life after the agent's CFUN change: check
                # again; gating it would make the radio flap.
                self._set_trigger(Trigger.URC_SIM_INSERTED, event.line)
                self._feed(Input.RECHECK)
            else:
                self._sim_changed("sim_inserted", event.line)
        elif isinstance(event, ModemRebooted):
            # Another boot line of the same boot (RDY, then PB DONE) is not a new boot;
            # the same line again is (a module that reboots twice in a row).
            line = event.line.upper()
            if asyncio.get_running_loop().time() - self._booted_at >= BOOT_BURST or line in self._boot_lines:
                self._rebooted(Trigger.URC_BOOT, event.line)
            self._boot_lines.add(line)

    def _on_lookalike(self, line: str) -> None:
        """A caller's answer line shaped like a SIM-change or boot URC: it may be one the
        caller's command took for its answer. A boot is handled as one; a SIM line makes
        the gate look again (a read under way may predate the change: it is redone)."""
        event = self.modem.event_for(line)
        if isinstance(event, ModemRebooted):
            self._on_modem_event(event)
        elif isinstance(event, (SimInserted, SimRemoved)):
            if self.gate.read_under_way:
                # Not gated (a caller's AT+CPIN? flood would then keep the allowed card
                # off): the read under way decides, and a new read follows at once.
                self._recheck_after_decision = line
            else:
                self._sim_report(line)

    def _sim_report(self, line: str) -> None:
        self._set_trigger(Trigger.ANSWER_SIM_LINE, line)
        self._feed(Input.RECHECK, {"reason": "sim_report"})

    def _network_time(self, event: NetworkTime) -> None:
        """Network time is outside input: the clock takes it only when plausible, and a
        rejection is evidence (once per distinct line: a rogue cell may repeat it)."""
        network_time = event.time.time
        if network_time is None or network_time.tzinfo is None:
            return
        rejected = self.store.clock.offer_network_time(network_time.timestamp(), self.store.read().time_floor())
        if rejected is None or event.line == self._rejected_time_line:
            return
        self._rejected_time_line = event.line
        log.warning("network time rejected: %s (%s)", rejected, event.line)
        unrecorded = self._time_rejections.spend(asyncio.get_running_loop().time())
        if unrecorded is None:
            return
        data = {"line": event.line, "why": rejected, **({"unrecorded_before": unrecorded} if unrecorded else {})}
        try:
            self.store.record("network_time_rejected", data, event=False)
        except sqlite3.Error as exc:
            self._note_evidence_gap(exc)

    def _sim_changed(self, reason: str, line: str) -> None:
        """A SIM change the module announced by URC (`reason` sim_removed or sim_inserted)."""
        if reason == "sim_removed":
            self._removal_seen = True
            self._set_trigger(Trigger.URC_SIM_REMOVED, line)
        else:
            self._set_trigger(Trigger.URC_SIM_INSERTED, line)
        self._feed(Input.SIM_CHANGED, {"reason": reason})

    def _rebooted(self, trigger: Trigger, line: str) -> None:
        self._boots += 1
        self._booted_at = asyncio.get_running_loop().time()
        self._boot_lines = set()
        # The module restarted: a command on the wire will never be answered; the gate's
        # +CFUN=4 must not wait for its timeout.
        self.modem.client.interrupt("modem rebooted")
        self._cfun = None  # a rebooted module is in its power-on state
        self._detached = False
        self._set_trigger(trigger, line)
        try:
            self.store.record("modem_rebooted", self._trigger_fields())
        except sqlite3.Error as exc:
            self._note_evidence_gap(exc)
        self._feed(Input.REBOOTED, {"reason": "modem_rebooted"})

    # -- polling ----------------------------------------------------------------------

    async def _poll_timer(self) -> None:
        while True:
            self._poll_wake.clear()
            try:
                await asyncio.wait_for(self._poll_wake.wait(), self.sim_poll_interval)
                continue  # the schedule changed: compute it again
            except TimeoutError:
                pass
            if self.polling and not self.gate.read_under_way:
                self._set_trigger(Trigger.POLL)
                self._feed(Input.RECHECK)

    # -- plumbing ---------------------------------------------------------------------

    def _note_evidence_gap(self, exc: sqlite3.Error) -> None:
        if self._evidence_gap is None:
            self._evidence_gap = {"since": self.store.clock.now().iso(), "error": str(exc)}

    def _gate_words(self) -> str:
        decision = self._decision
        if decision is None:
            return f"gate {self.gate.state.value}"
        return decision.status + (f": {decision.reason}" if decision.reason else "")

    async def _until(self, awaitable: Any) -> Any:
        """Awaits `awaitable` (a future or a coroutine), but leaves with the session's
        failure (PortLost, a bug)."""
        future = asyncio.ensure_future(awaitable)
        failure = self._failure
        lost = self.modem.client.lost
        waiting = [future, lost] + ([failure] if failure is not None and failure is not future else [])
        try:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not future.done() and future is not failure:
                future.cancel()
        if future in done:
            return future.result()
        if lost in done:
            raise PortLost(f"{self.modem.client.port}: {lost.result() or 'closed'}")
        failure.result()  # re-raises what ended the session
        raise AssertionError("unreachable")

    def _worker_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception() or RuntimeError(f"{task.get_name()} ended")
        if isinstance(exc, PortLost):
            return  # the client's `lost` ends the session (and says why)
        if self._failure is not None and not self._failure.done():
            self._failure.set_exception(exc)  # PortLost or a bug: out of run()

    def _publish(self) -> None:
        if self._on_change is None:
            return
        state = self.state()
        if state != self._published:
            self._published = state
            self._on_change()
