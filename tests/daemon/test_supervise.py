"""The supervisor of the daemon's long-lived jobs (agent/service/supervise.py)."""

from __future__ import annotations

import asyncio

from agent.service import supervise
from agent.service.supervise import Supervisor


def test_a_job_given_up_says_why_and_a_restart_starts_it_again(monkeypatch):
    monkeypatch.setattr(supervise, "RESTART_DELAY", 0.0)
    broken = True
    started = asyncio.Event()

    async def job():
        if broken:
            raise OSError("cannot read /etc/simagent/mqtt-password")
        started.set()
        await asyncio.Event().wait()

    async def scenario():
        nonlocal broken
        watched = {}
        supervisor = Supervisor(watch=watched.__setitem__)
        keeper = supervisor.start("reporting", job)
        await asyncio.gather(keeper, return_exceptions=True)
        assert isinstance(keeper.exception(), supervise.GaveUp)
        assert supervisor.gave_up("reporting") == "cannot read /etc/simagent/mqtt-password"

        broken = False
        supervisor.restart("reporting")
        await asyncio.wait_for(started.wait(), 1.0)
        assert supervisor.gave_up("reporting") is None
        assert not watched["reporting"].done()  # the health check watches the new keeper
        await supervisor.stop()

    asyncio.run(scenario())


def test_a_second_restart_does_not_cut_the_first_runs_clean_up_short():
    cleaned_up, runs = [], 0

    async def job():
        nonlocal runs
        runs += 1
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.05)  # a goodbye that takes a while (the reporter's disconnect)
            cleaned_up.append(runs)

    async def scenario():
        supervisor = Supervisor()
        supervisor.start("reporting", job)
        await asyncio.sleep(0)
        supervisor.restart("reporting")
        await asyncio.sleep(0.01)
        supervisor.restart("reporting")  # while the first run is still cleaning up
        await asyncio.sleep(0.2)
        assert cleaned_up == [1] and runs == 2
        await supervisor.stop()

    asyncio.run(scenario())
