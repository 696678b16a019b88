"""Network time (SPEC §5): without NTP, the time the network sends after registration
(+CTZE once +CTZR is on) makes the agent's stamps trustworthy - without touching the
system clock."""

import time

import pytest

from agent.clock import Clock

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
