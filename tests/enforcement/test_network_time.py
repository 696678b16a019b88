"""Network time (SPEC §5): without NTP, the time the network sends after registration
(+CTZE once +CTZR is on) makes the agent's stamps trustworthy - without touching the
system clock. The fault suite's clock faults (a forged network time, a system clock at
1970 then stepped) are here: the system clock cannot be set on a shared test machine, so
the agent's Clock reads a wall clock the test moves."""

import asyncio
import time

import pytest

from agent.core.binding import BOUND
from agent.core.clock import Clock
from agent.core.store import TIME_FLOOR_KEY

from .conftest import FOREIGN_ICCID, HOME_ICCID, HOME_IMEI, run

EPOCH_DAY_2 = 86_400.0  # 1970-01-02: a terminal without RTC after a cold boot


class SteppedWall:
    """The system's wall clock, at an offset from the real one that `step` changes (as
    NTP, an operator or an RTC battery does)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def step(self, to: float) -> None:
        self.offset = to - time.time()


@pytest.fixture
def wall() -> SteppedWall:
    return SteppedWall()


@pytest.fixture
def clock(wall) -> Clock:
    return Clock(kernel_synchronised=lambda: False, wall=wall)  # a terminal without NTP


def test_network_time_from_the_modem_makes_stamps_trusted(open_terminal, clock):
    async def scenario():
        async with open_terminal(profile="quectel") as t:
            assert t.started.status == "bound"
            await t.until(lambda: clock.now().trusted, "network time after registration")
            assert abs(clock.now().wall - time.time()) < 60  # the fake sends the host's time
            assert t.evidence()[0]["wall_trusted"] is False  # before the network told the time
            t.store.record("sim_inserted", {"iccid": "probe"}, event=False)
            assert t.evidence()[-1]["wall_trusted"] is True

    run(scenario())


@pytest.mark.faults
def test_a_forged_network_time_is_rejected_and_recorded(open_terminal, clock, fault):
    """A rogue cell's NITZ for 2099 (issue: it stamped events 2098 as trusted and ratcheted
    the floor to 2099, so every valid token was refused as expired)."""
    async def scenario():
        async with open_terminal(profile="quectel") as t:
            await t.until(lambda: clock.now().trusted, "network time after registration")
            floor = t.store.read().time_floor()
            forged = '+CTZE: "+32",0,"2099/01/01,00:00:00"'
            t.fake.urc(forged)
            t.fake.urc(forged)  # repeated by the cell: one record
            await t.until(lambda: "network_time_rejected" in t.types(), "the rejection recorded")
            await asyncio.sleep(0.1)
            rejected = [e["data"] for e in t.evidence() if e["type"] == "network_time_rejected"]
            assert len(rejected) == 1 and rejected[0]["line"] == forged and "from the trusted time" in rejected[0]["why"]
            assert abs(clock.now().wall - time.time()) < 60
            t.store.record("sim_inserted", {"iccid": "probe"}, event=False)
            assert t.evidence()[-1]["wall"].startswith(time.strftime("%Y", time.gmtime()))
            assert t.store.read().time_floor() == floor  # network time alone never raises it
            assert t.verify_evidence().ok and t.bindings() == [(HOME_ICCID, HOME_IMEI)]
            record_outbox(fault, t, "forged_network_time")

    run(scenario())


def record_outbox(fault, t, kind: str) -> dict:
    """Nothing lost without a broker: every event committed (seq 1..event_seq) waits in
    the outbox, once."""
    committed = t.store.read().get_meta("event_seq")
    row = fault.record(f"{kind} (outbox)", trials=1, committed=range(1, committed + 1), received=[e["seq"] for e in t.events()])
    assert row["lost"] == 0 and row["duplicated"] == 0, row
    return row


@pytest.mark.faults
def test_a_clock_at_1970_then_stepped_keeps_order_binding_and_chain(open_terminal, clock, wall, fault):
    """A cold boot without RTC (the wall clock at 1970), network time after registration,
    then the system clock stepped years ahead of it: stamps are untrusted until network time
    comes, trusted ones follow the network's time, the floor does not move, the binding
    holds, the events keep their order and the chain verifies."""
    async def scenario():
        wall.step(EPOCH_DAY_2)
        async with open_terminal(profile="quectel") as t:
            assert t.started.status == BOUND
            first = t.evidence()[0]
            assert first["wall"].startswith("1970-") and first["wall_trusted"] is False
            await t.until(lambda: clock.now().trusted, "network time after registration")
            for step_to in (time.time() + 3 * 365 * 86_400, EPOCH_DAY_2 + fault.rng.uniform(0, 86_400)):
                wall.step(step_to)  # forward years, then back to 1970
                t.fake.sim_insert(FOREIGN_ICCID)
                await t.cfun(4, "for the foreign card")
                t.fake.sim_insert(HOME_ICCID)
                await t.cfun(1, "for the home card again")
            trusted = [e for e in t.evidence() if e["wall_trusted"]]
            assert trusted and all(e["wall"].startswith(time.strftime("%Y", time.gmtime())) for e in trusted)
            assert t.store.read().get_meta(TIME_FLOOR_KEY) is None  # no two sources agreed
            assert t.bindings() == [(HOME_ICCID, HOME_IMEI)]
            assert t.verify_evidence().ok
            record_outbox(fault, t, "clock_1970_stepped")

    run(scenario())


def test_a_stream_of_new_forged_times_costs_a_bounded_number_of_records(open_terminal, clock, monkeypatch):
    """Each rejected network time was a durable entry (an fsync, kept for good) once per
    distinct line: a cell sending a new forged time every second filled the log. The first
    of each window are recorded; the next recorded one says how many were left out."""
    from agent.service import enforcer as enforcer_module

    monkeypatch.setattr(enforcer_module, "TIME_REJECTIONS_RECORDED", (3, 0.5))

    async def scenario():
        async with open_terminal(profile="quectel") as t:
            await t.until(lambda: clock.now().trusted, "network time after registration")
            for n in range(12):
                t.fake.urc(f'+CTZE: "+32",0,"2099/01/{n + 1:02d},00:00:00"')
            await t.until(lambda: t.types().count("network_time_rejected") == 3, "the first three recorded")
            await asyncio.sleep(0.7)  # the window ends
            t.fake.urc('+CTZE: "+32",0,"2098/01/01,00:00:00"')
            await t.until(lambda: t.types().count("network_time_rejected") == 4, "the next window's first")
            rejected = [e["data"] for e in t.evidence() if e["type"] == "network_time_rejected"]
            assert [r.get("unrecorded_before", 0) for r in rejected] == [0, 0, 0, 9]
            assert abs(clock.now().wall - time.time()) < 60

    run(scenario())
