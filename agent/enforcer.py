"""Binding enforcement on the modem (SPEC §4, issue item 3): the imperative shell around
`agent.binding`.

The enforcer gathers the facts (IMEI, SIM state, ICCID) from the modem, lets
`binding.evaluate` decide and record, and carries the decision out: `+CFUN=4` (radio off,
SIM still readable), `+CGATT=0` (detach), `+CFUN=1` (radio on). CFUN=0 is never used.

With `radio_gate` the radio is held at CFUN=4 at start, after a modem reboot and on any SIM
change, until a decision allows it. The latency-critical path is a SIM-removal URC: its
callback bumps the SIM *generation* and sends `+CFUN=4` at once, without waiting for the
check in progress (the AT client queues the command behind the one on the wire). A check
remembers the generation it read its facts under and never switches the radio on when the
generation moved meanwhile: it reads the facts again instead.

SIM changes come from the profile's hot-swap URCs where it has them (the modem layer
enables them in `initialise()`), otherwise from polling `+CPIN?` and the ICCID every
`sim_poll_interval`. A profile without boot URCs is polled too (a silent reset switches its
hot-swap reporting off), and the poll reads `+CFUN?`: a module that reset and came back
with its radio on while the agent held it off is re-gated.

Radio commands are retried while the module answers `+CME ERROR: 14` (busy), any other
error or times out (modules refuse CFUN while the SIM initialises). `+CPIN: NOT READY`
printed within `NOT_READY_WINDOW` of the agent's own CFUN change is the module reacting to
that change, not a removal; a `+CPIN?` read confirms it either way.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sqlite3
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from agent import tokens
from agent.binding import (DETACH, IMEI_UNREADABLE, LAST_IMEI_KEY, RADIO_OFF, RADIO_ON, SIM_UNREADABLE,
                           BindingPolicy, Decision, Observation, evaluate, reset_bindings)
from agent.store import Binding, Store
from at_commands.client import CommandError, CommandTimeout, PortLost
from at_commands.modem import (Identity, Modem, ModemEvent, ModemRebooted, NetworkTime, RegistrationChanged,
                               SimInserted, SimRemoved)
from at_commands.parsers import ParseError

log = logging.getLogger(__name__)

RADIO_ON_CFUN, RADIO_OFF_CFUN = 1, 4
# "+CPIN: NOT READY" this soon (seconds) after the agent's own CFUN change is not a removal.
NOT_READY_WINDOW = 3.0
_NOT_READY = re.compile(r"^\+CPIN:\s*NOT READY$", re.IGNORECASE)
_READY = re.compile(r"^\+CPIN:\s*READY$", re.IGNORECASE)
# Boot URCs this close (seconds) to the previous one belong to the same boot.
BOOT_BURST = 10.0
# Radio commands: attempts and the delay step between them (busy SIM, module booting).
RADIO_ATTEMPTS = 6
RETRY_STEP = 0.2
# A check that could not read the SIM or IMEI (or failed to switch the radio) is repeated.
UNREADABLE_RETRY = 1.0
_RETRY_STATUSES = (SIM_UNREADABLE, IMEI_UNREADABLE)
# Errors a check survives (it is retried); PortLost and bugs leave run().
_MODEM_ERRORS = (CommandError, CommandTimeout, ParseError)
# A check whose decision could not be recorded (disk full, I/O error): without evidence
# there is no decision, so with radio_gate the radio is held off until one can be.
STORE_UNWRITABLE = "store_unwritable"


@dataclass(frozen=True)
class _ConfirmRemoval:
    """A "+CPIN: NOT READY" during the agent's own radio change: to be confirmed."""

    line: str


class _Stale(Exception):
    """The SIM changed while a check held facts about the previous one."""


class Enforcer:
    """One per modem connection. Call `start()` after `modem.initialise()`, then `run()`."""

    def __init__(self, modem: Modem, store: Store, policy: BindingPolicy, *, sim_poll_interval: float = 5.0,
                 on_change: Callable[[], None] | None = None,
                 on_identity: Callable[[str | None], None] | None = None) -> None:
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
        self._check_lock = asyncio.Lock()
        self._radio_lock = asyncio.Lock()
        self._events: asyncio.Queue[ModemEvent | _ConfirmRemoval] = asyncio.Queue()
        self._wake_poller = asyncio.Event()
        self._generation = 0  # bumped by every SIM change and modem reboot
        self._removal_seen = False  # a removal URC arrived since the last observation
        self._identity: Identity | None = None
        self._sim: dict[str, Any] = {"state": "unknown", "iccid": None, "imsi": None}
        self._sim_known = False
        self._decision: Decision | None = None
        self._cfun: int | None = None  # as last set or read; None = unknown (e.g. after a reboot)
        self._held_off = False  # the agent holds the radio off
        self._detached = False  # the agent sent +CGATT=0 and has not re-attached yet
        self._radio_changed_at = -math.inf
        self._booted_at = -math.inf
        self._retry_due = False
        # Set while checks could not be recorded (disk full): what the evidence is missing.
        self._evidence_gap: dict | None = None
        self._failure: asyncio.Future | None = None
        self._tasks: set[asyncio.Task] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self._published: dict | None = None

    # -- public API -------------------------------------------------------------------

    @property
    def polling(self) -> bool:
        """True unless the profile announces both SIM changes and reboots by URC. A module
        without boot URCs loses its hot-swap reporting in a silent reset, so it is polled."""
        profile = self.modem.profile
        return not ((profile.sim_removed_urcs or profile.sim_inserted_urcs) and profile.boot_urcs)

    async def start(self) -> Decision:
        """Gates the radio first, reads the identity, then decides and acts."""
        loop = asyncio.get_running_loop()
        self._failure = loop.create_future()
        if self._unsubscribe is None:
            self._unsubscribe = self.modem.subscribe(self._on_modem_event)
        async with self._radio_lock:
            self._cfun = await self._retrying("AT+CFUN?", self.modem.get_cfun)
        if self.policy.radio_gate:
            await self._set_radio(RADIO_OFF_CFUN, {"reason": "start"})
        await self._read_identity()
        return await self.check("start")

    async def run(self) -> None:
        """Handles modem events and polling until the modem goes away (PortLost)."""
        if self._failure is None:
            raise RuntimeError("Enforcer.run() before start()")
        workers = [asyncio.create_task(self._consume_events(), name="enforcer-events"),
                   asyncio.create_task(self._poll_loop(), name="enforcer-poll")]
        lost = self.modem.client.lost
        try:
            done, _ = await asyncio.wait([*workers, self._failure, lost], return_when=asyncio.FIRST_COMPLETED)
            if lost in done:
                raise PortLost(f"{self.modem.client.port}: {lost.result() or 'closed'}")
            for finished in done:
                finished.result()  # re-raises what ended it
        finally:
            for task in [*workers, *self._tasks]:
                task.cancel()
            await asyncio.gather(*workers, *self._tasks, return_exceptions=True)
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None

    async def check(self, reason: str) -> Decision:
        """One read-decide-act cycle. Facts gone stale during it (a SIM change) are read
        again, so nothing is ever done on the previous card's account."""
        async with self._check_lock:
            while True:
                generation = self._generation
                try:
                    decision = await self._check_once(reason, generation)
                except _Stale:
                    reason = "sim_changed_during_check"
                    continue
                except _MODEM_ERRORS as exc:
                    log.warning("binding check (%s) failed: %s; retrying", reason, exc)
                    self._schedule_retry()
                    decision = self._decision or Decision(SIM_UNREADABLE, radio_allowed=False)
                except sqlite3.Error as exc:
                    log.error("binding check (%s) could not be recorded (%s): radio held off, retrying", reason, exc)
                    self._note_evidence_gap(exc)
                    decision = self._decision = Decision(STORE_UNWRITABLE, reason=str(exc), radio_allowed=False)
                    if self.policy.radio_gate:
                        await self._set_radio(RADIO_OFF_CFUN, {"reason": STORE_UNWRITABLE, "trigger": reason})
                if generation == self._generation:
                    break
                reason = "sim_changed_during_check"
        self._publish()
        return decision

    def update_policy(self, policy: BindingPolicy) -> None:
        """A reloaded `[binding]` section (SIGHUP): applies it with a fresh check."""
        self.policy = policy
        self._wake_poller.set()
        self._spawn(self.check("policy_reloaded"))

    async def accept_token(self, token: str, keys: Sequence[tokens.TrustedKey], *, source: str = "token",
                           actions: Sequence[str] = tokens.BINDING_ACTIONS) -> tokens.TokenResult:
        """A rebind/unbind token; an accepted one is applied at once (the radio comes back
        when the card is now allowed). A refused one changes nothing but its record."""
        result = tokens.accept_token(self.store, token, list(keys), self._imei(), source=source, actions=actions)
        if result.accepted:
            await self.check("token_accepted")
        return result

    async def reset(self, reason: str, uid: int) -> list[Binding]:
        """`bind reset` (root, audited): forgets every binding, then checks again."""
        removed = reset_bindings(self.store, reason, uid)
        await self.check("bindings_reset")
        return removed

    def state(self) -> dict:
        """The SPEC §6 state-document parts this layer knows."""
        identity = self._identity
        decision = self._decision
        bindings = self.store.read().bindings()
        iccid, imei = self._sim["iccid"], self._imei()
        bound = (next((b for b in bindings if b.iccid == iccid), None)
                 or next((b for b in bindings if b.imei == imei), None)
                 or (bindings[0] if bindings else None))
        return {
            "modem": {
                "vendor": identity.vendor if identity else None,
                "model": identity.model if identity else None,
                "revision": identity.revision if identity else None,
                "imei": imei,
                "imei_luhn_ok": identity.imei_luhn_ok if identity else None,
            },
            "sim": dict(self._sim),
            "binding": {
                "mode": self.policy.mode,
                "status": decision.status if decision else "unknown",
                "reason": decision.reason if decision else None,
                "bound_iccid": bound.iccid if bound else None,
                "bound_imei": bound.imei if bound else None,
                "since": bound.since if bound else None,
            },
            "radio": {"cfun": self._cfun, "gated": self._held_off},
        }

    # -- one check --------------------------------------------------------------------

    async def _check_once(self, reason: str, generation: int) -> Decision:
        if self._identity is None or self._identity.imei is None:
            await self._read_identity()
        sim_state = await self.modem.read_sim_state()
        iccid = await self.modem.read_iccid() if sim_state in ("ready", "locked") else None
        imsi = await self.modem.read_imsi() if sim_state == "ready" else None
        if generation != self._generation:
            raise _Stale
        if self._evidence_gap is not None:
            # Nothing is decided on top of a hole in the evidence: first say what is missing.
            self.store.record("evidence_gap", {**self._evidence_gap, "until": self.store.clock.now().iso()}, event=False)
            self._evidence_gap = None
        self._note_sim(sim_state, iccid, imsi, reason)
        decision = evaluate(self.store, Observation(self._imei(), sim_state, iccid), self.policy)
        self._decision = decision
        self._retry_due = False
        await self._carry_out(decision, reason, generation)
        if decision.status in _RETRY_STATUSES:
            self._schedule_retry()
        return decision

    def _note_sim(self, sim_state: str, iccid: str | None, imsi: str | None, trigger: str) -> None:
        """Records SIM removal/insertion seen by comparing with the last observation (or
        announced by a removal URC in between, e.g. the same card out and back in)."""
        present = False if sim_state == "absent" else True if iccid is not None else None
        if present is None:
            self._sim["state"] = sim_state  # unreadable: nothing known about a change
            return
        previous = self._sim["iccid"] if self._sim_known else None
        changed = self._removal_seen or iccid != previous
        with self.store.transaction() as tx:
            if previous is not None and changed:
                tx.record("sim_removed", {"iccid": previous, "trigger": trigger})
            if self._sim_known and present and changed:
                tx.record("sim_inserted", {"iccid": iccid, "imsi": imsi, "trigger": trigger})
        self._sim = {"state": sim_state, "iccid": iccid, "imsi": imsi}
        self._sim_known = True
        self._removal_seen = False

    async def _carry_out(self, decision: Decision, trigger: str, generation: int) -> None:
        why = {"reason": decision.reason or decision.status, "trigger": trigger,
               "iccid": self._sim["iccid"], "imei": self._imei()}
        for action in decision.actions:
            if action == RADIO_OFF:
                await self._set_radio(RADIO_OFF_CFUN, why)
            elif action == DETACH:
                await self._detach(why)
            elif action == RADIO_ON:
                await self._set_radio(RADIO_ON_CFUN, why, generation=generation)
                if self._detached:
                    await self._reattach(why, generation)

    # -- modem actions ----------------------------------------------------------------

    async def _set_radio(self, fun: int, why: dict, *, generation: int | None = None) -> bool:
        """Switches the radio; records `radio_blocked`/`radio_restored` only when the
        module really changed. With `generation`, refuses (raises _Stale) to act for a
        check whose facts are out of date."""
        async with self._radio_lock:
            if generation is not None and generation != self._generation:
                raise _Stale
            if self._cfun is None:
                self._cfun = await self._retrying("AT+CFUN?", self.modem.get_cfun)
            if self._cfun == fun:
                self._held_off = fun == RADIO_OFF_CFUN
                return False
            loop = asyncio.get_running_loop()
            self._radio_changed_at = loop.time()
            await self._retrying(f"AT+CFUN={fun}", lambda: self.modem.set_cfun(fun))
            self._radio_changed_at = loop.time()
            previous, self._cfun = self._cfun, fun
            self._held_off = fun == RADIO_OFF_CFUN
            kind = "radio_blocked" if fun == RADIO_OFF_CFUN else "radio_restored"
            try:
                self.store.record(kind, {**why, "command": f"+CFUN={fun}", "cfun_before": previous})
            except sqlite3.Error as exc:  # the radio did change: the next check must record the gap
                log.error("%s (%s) could not be recorded: %s", kind, why.get("reason"), exc)
                self._note_evidence_gap(exc)
        self._publish()
        return True

    async def _detach(self, why: dict) -> None:
        async with self._radio_lock:
            if self._detached:
                return
            await self._retrying("AT+CGATT=0", self.modem.detach)
            self._detached = True
            self.store.record("radio_blocked", {**why, "command": "+CGATT=0"})
        self._publish()

    async def _reattach(self, why: dict, generation: int) -> None:
        """Undoes a detach once the card is allowed. Before the module has registered
        this fails; a registration URC or the next check tries again."""
        async with self._radio_lock:
            if generation != self._generation:
                raise _Stale
            try:
                await self.modem.client.command("AT+CGATT=1", max(self.modem.command_timeout, 15.0))
            except _MODEM_ERRORS as exc:
                log.info("re-attach deferred: %s", exc)
                return
            self._detached = False
            self.store.record("radio_restored", {**why, "command": "+CGATT=1"})
        self._publish()

    async def _retrying(self, what: str, command: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        for attempt in range(1, RADIO_ATTEMPTS + 1):
            try:
                return await command()
            except _MODEM_ERRORS as exc:
                if attempt == RADIO_ATTEMPTS:
                    raise
                log.info("%s failed (%s), attempt %d of %d", what, exc, attempt, RADIO_ATTEMPTS)
            await asyncio.sleep(RETRY_STEP * attempt)
        raise AssertionError("unreachable")

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
        if self._on_identity is not None:
            self._on_identity(identity.imei)

    def _imei(self) -> str | None:
        return self._identity.imei if self._identity else None

    # -- events -----------------------------------------------------------------------

    def _on_modem_event(self, event: ModemEvent) -> None:
        """URC callback (in the AT reader): bump the generation and gate at once; the rest
        is done by the event consumer."""
        if isinstance(event, NetworkTime):
            network_time = event.time.time
            if network_time is not None and network_time.tzinfo is not None:
                self.store.clock.set_network_time(network_time.timestamp())
            return
        if isinstance(event, RegistrationChanged) and not self._detached:
            return
        own_radio_change = asyncio.get_running_loop().time() - self._radio_changed_at < NOT_READY_WINDOW
        if isinstance(event, SimRemoved):
            if own_radio_change and _NOT_READY.match(event.line):
                self._events.put_nowait(_ConfirmRemoval(event.line))
                return
            self._sim_removed(event.line)
        elif isinstance(event, SimInserted):
            # A card appeared without its removal being seen: gate it too. "+CPIN: READY"
            # right after the agent's own CFUN change is the same card coming back to
            # life; re-checking is enough (gating it would make the radio flap).
            self._generation += 1
            if self.policy.radio_gate and not (own_radio_change and _READY.match(event.line)):
                self._spawn(self._set_radio(RADIO_OFF_CFUN, {"reason": "sim_inserted", "trigger": event.line}))
        elif isinstance(event, ModemRebooted):
            if asyncio.get_running_loop().time() - self._booted_at < BOOT_BURST:
                return  # the same boot announcing itself again (RDY ... PB DONE)
            self._rebooted(event.line)
        self._events.put_nowait(event)

    def _sim_removed(self, line: str) -> None:
        self._generation += 1
        self._removal_seen = True
        if self.policy.radio_gate:
            self._spawn(self._set_radio(RADIO_OFF_CFUN, {"reason": "sim_removed", "trigger": line}))

    def _rebooted(self, line: str) -> None:
        self._booted_at = asyncio.get_running_loop().time()
        self._generation += 1
        self._cfun = None  # a rebooted module is in its power-on state
        self._detached = False
        self.store.record("modem_rebooted", {"trigger": line})
        if self.policy.radio_gate:
            self._spawn(self._set_radio(RADIO_OFF_CFUN, {"reason": "modem_rebooted", "trigger": line}))

    async def _consume_events(self) -> None:
        while True:
            events = [await self._events.get()]
            while not self._events.empty():  # a burst (boot URCs, swap) makes one check
                events.append(self._events.get_nowait())
            reasons = []
            for event in events:
                try:
                    reason = await self._handle(event)
                except _MODEM_ERRORS as exc:
                    log.warning("handling %s failed: %s; checking again", event, exc)
                    reason = "retry"
                if reason:
                    reasons.append(reason)
            if reasons:
                await self.check(reasons[0])

    async def _handle(self, event: ModemEvent | _ConfirmRemoval) -> str | None:
        """Work an event needs before the check; returns the check's reason, or None."""
        if isinstance(event, _ConfirmRemoval):
            state = await self.modem.read_sim_state()
            if state != "absent":
                log.debug("%r after the agent's radio change: SIM still %s", event.line, state)
                return None
            self._sim_removed(event.line)
            return "sim_removed"
        if isinstance(event, ModemRebooted):
            await self.modem.initialise()
            if self.policy.radio_gate:  # re-gated by the URC callback; this covers a failure there
                await self._set_radio(RADIO_OFF_CFUN, {"reason": "modem_rebooted", "trigger": event.line})
            await self._read_identity()
            return "modem_rebooted"
        if isinstance(event, SimRemoved):
            return "sim_removed"
        if isinstance(event, SimInserted):
            return "sim_inserted"
        if isinstance(event, RegistrationChanged):
            return "registration_changed"  # a detach is pending undo
        return None

    # -- polling and retries ----------------------------------------------------------

    def _poll_delay(self) -> float | None:
        delays = ([self.sim_poll_interval] if self.polling else []) + ([UNREADABLE_RETRY] if self._retry_due else [])
        return min(delays, default=None)

    async def _poll_loop(self) -> None:
        while True:
            self._wake_poller.clear()
            try:
                await asyncio.wait_for(self._wake_poller.wait(), self._poll_delay())
                continue  # the schedule changed: compute it again
            except TimeoutError:
                pass
            try:
                if self.polling:
                    await self._poll_once()
                else:
                    await self.check("retry")
            except _MODEM_ERRORS as exc:
                log.warning("SIM poll failed: %s", exc)
                self._schedule_retry()

    async def _poll_once(self) -> None:
        """+CPIN?, ICCID and +CFUN?: a changed SIM is gated and checked; a radio level
        that changed behind the agent's back means the module reset."""
        async with self._check_lock:
            sim_state = await self.modem.read_sim_state()
            iccid = await self.modem.read_iccid() if sim_state in ("ready", "locked") else None
            changed = not self._sim_known or sim_state != self._sim["state"] or iccid != self._sim["iccid"]
        async with self._radio_lock:
            if self._cfun is not None:
                cfun = await self.modem.get_cfun()
                if cfun != self._cfun:
                    self._rebooted(f"+CFUN: {cfun} (was {self._cfun}; module reset)")
                    self._events.put_nowait(ModemRebooted(f"+CFUN: {cfun}"))
                    return
        if changed:
            self._generation += 1
            if self.policy.radio_gate and (sim_state == "absent" or iccid != self._sim["iccid"]):
                await self._set_radio(RADIO_OFF_CFUN, {"reason": "sim_changed", "trigger": "poll"})
            await self.check("poll")
        elif self._retry_due:
            await self.check("retry")

    def _note_evidence_gap(self, exc: sqlite3.Error) -> None:
        if self._evidence_gap is None:
            self._evidence_gap = {"since": self.store.clock.now().iso(), "error": str(exc)}
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        self._retry_due = True
        self._wake_poller.set()

    # -- plumbing ---------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or isinstance(exc, _Stale):
            return
        if isinstance(exc, _MODEM_ERRORS):
            log.warning("radio command failed: %s; checking again", exc)
            self._schedule_retry()
            return
        if self._failure is not None and not self._failure.done():
            self._failure.set_exception(exc)  # PortLost or a bug: out of run()

    def _publish(self) -> None:
        if self._on_change is None:
            return
        state = self.state()
        if state != self._published:
            self._published = state
            self._on_change()
