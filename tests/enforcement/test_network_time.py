"""Network time (SPEC §5): without NTP, the time the network sends after registration
(+CTZE once +CTZR is on) makes the agent's stamps trustworthy - without touching the
system clock."""

import asyncio
import time

import pytest

from agent.core.clock import Clock

from .conftest import run


@pytest.fixture
def clock() -> Clock:
    return Clock(kernel_synchronised=lambda: False)  # a terminal without NTP


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


def test_a_forged_network_time_is_rejected_and_recorded(open_terminal, clock):
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

    run(scenario())
