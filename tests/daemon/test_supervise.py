"""The supervisor of the daemon's long-lived jobs (agent/service/supervise.py)."""

from __future__ import annotations

import asyncio

from agent.service.supervise import Supervisor


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
