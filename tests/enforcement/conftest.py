"""A terminal for enforcement tests: the in-process fake modem on a real pty, the real
modem layer, a real store in tmp_path and the Enforcer running its event loop.

Tests are plain functions that run one async scenario with `run(...)`; `open_terminal`
is an async context manager that starts everything and tears it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from agent.core.binding import BindingPolicy, Decision
from agent.core.clock import Clock
from agent.service.enforcer import Enforcer
from agent.core.evidence import VerifyResult, export_bundle, load_or_create_device_key, verify_bundle
from agent.core.store import Binding, Store
from at_commands import profiles
from simagent_lab.fakemodem import DEFAULT_ICCID, DEFAULT_IMEI, ef_iccid_hex, luhn_check_digit
from at_commands.modem import Modem
from simagent_lab.fakemodem_handles import InProcessFakeModem

HOME_ICCID = DEFAULT_ICCID
FOREIGN_ICCID = "89860077777777777777"
HOME_IMEI = DEFAULT_IMEI
OTHER_IMEI = "35209900176148" + luhn_check_digit("35209900176148")

# Profiles that report SIM changes and reboots by URC, and one that must be polled.
HOTSWAP_PROFILES = tuple(p.name for p in profiles.PROFILES.values() if p.sim_removed_urcs and p.boot_urcs)
ALL_SWAP_PROFILES = (*HOTSWAP_PROFILES, "generic")
# Short enough to keep the suite fast; the fake registers a card this long after CFUN=1
# with a card in, so a radio left on for a foreign card would show up as an attach.
POLL_INTERVAL = 0.1
REGISTER_DELAY = 0.6


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclass
class Terminal:
    fake: InProcessFakeModem
    store: Store
    modem: Modem
    enforcer: Enforcer
    started: Decision
    runner: asyncio.Task

    async def until(self, predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self.runner.done():
                self.runner.result()  # surface the enforcer's failure
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; fake: {self.fake.state()['cfun']=}, "
                                     f"enforcer: {self.enforcer.state()}")
            await asyncio.sleep(0.01)

    async def cfun(self, value: int, what: str = "", timeout: float = 5.0) -> None:
        """Waits until the fake is at `value` and the enforcer has taken note (recorded
        the switch, if it made one)."""
        await self.until(lambda: self.fake.state()["cfun"] == value and self.enforcer.state()["radio"]["cfun"] == value,
                         f"cfun {value} {what}", timeout)

    async def status(self, status: str, reason: str | None = None) -> None:
        def reached() -> bool:
            binding = self.enforcer.state()["binding"]
            return binding["status"] == status and (reason is None or binding["reason"] == reason)

        await self.until(reached, f"binding status {status} {reason or ''}")

    async def settle(self) -> None:
        """Lets any registration the fake would do for a card with the radio on happen."""
        await asyncio.sleep(REGISTER_DELAY + 0.2)

    def evidence(self) -> list[dict]:
        return [entry for entry, _ in self.store.evidence_entries()]

    def types(self) -> list[str]:
        return [entry["type"] for entry in self.evidence()]

    def events(self) -> list[dict]:
        return [json.loads(r.payload) for r in self.store.outbox_pending(100_000) if r.kind == "event"]

    def bindings(self) -> list[tuple[str, str]]:
        return [(b.iccid, b.imei) for b in self.store.read().bindings()]

    def attached_iccids(self) -> set[str]:
        return {a["iccid"] for a in self.fake.state()["attaches"]}

    def verify_evidence(self) -> VerifyResult:
        """The evidence chain exported and checked as `simagent evidence verify` does."""
        key = load_or_create_device_key(self.store.path.parent)
        return verify_bundle(export_bundle(self.store, key), key.public_key())


@pytest.fixture
def clock() -> Clock:
    # The one seam: wall time counts as NTP-synchronised, so token expiry is judged
    # against it on any test machine.
    return Clock(kernel_synchronised=lambda: True)


@pytest.fixture
def open_terminal(fake_modem_factory, tmp_path, clock):
    counter = itertools.count()

    @contextlib.asynccontextmanager
    async def open_(policy: BindingPolicy = BindingPolicy(), *, bindings: tuple[tuple[str, str], ...] = (),
                    last_imei: str | None = None, sim_poll_interval: float = POLL_INTERVAL,
                    on_change: Callable[[], None] | None = None, **fake_args: Any):
        fake_args.setdefault("register_delay", REGISTER_DELAY)
        fake = fake_modem_factory(**fake_args)
        store = Store.open(tmp_path / f"state{next(counter)}", clock=clock)
        with store.transaction() as tx:
            for iccid, imei in bindings:
                tx.put_binding(Binding(iccid, imei, "2026-01-01T00:00:00.000Z", "test"))
            if last_imei:
                tx.set_meta("last_imei", last_imei)
        modem = await Modem.open(fake.port, "auto")
        await modem.initialise()
        enforcer = Enforcer(modem, store, policy, sim_poll_interval=sim_poll_interval, on_change=on_change)
        runner = None
        try:
            started = await enforcer.start()
            runner = asyncio.create_task(enforcer.run())
            yield Terminal(fake, store, modem, enforcer, started, runner)
        finally:
            if runner is not None:
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
            modem.close()
            store.close()

    return open_


def _iccid_forms(iccid: str) -> tuple[str, str]:
    return iccid, ef_iccid_hex(iccid)


def assert_radio_on_only_after_allowed_card(transcript: list[dict], allowed: set[str]) -> int:
    """Every `AT+CFUN=1` the agent sent came after the modem, since the last SIM change or
    reboot, answered an ICCID read with an allowed card. Returns how many there were."""
    verified = False
    radio_on = 0
    forms = {form for iccid in allowed for form in _iccid_forms(iccid)}
    for entry in transcript:
        line = entry["line"]
        if entry["dir"] == "ctl" and re.match(r"(sim-insert|sim-remove|reboot)\b", line):
            verified = False
        elif entry["dir"] == "out" and any(form in line for form in forms) and not line.upper().startswith("AT"):
            verified = True
        elif entry["dir"] == "in" and re.sub(r"\s+", "", line).upper() == "AT+CFUN=1":
            assert verified, f"AT+CFUN=1 at t={entry['t']} before an allowed card was read since the last SIM change"
            radio_on += 1
    return radio_on


def sent(transcript: list[dict], command: str) -> list[float]:
    return [e["t"] for e in transcript if e["dir"] == "in" and re.sub(r"\s+", "", e["line"]).upper() == command]
