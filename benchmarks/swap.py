"""SIM removal -> radio off: the time from the fake modem writing the removal to it
receiving `AT+CFUN=4` from the enforcer, both stamped by the fake's transcript (one
monotonic clock, in the fake's I/O thread).

Hot-swap profile (quectel): from the `+QSIMSTAT: 1,0` URC leaving the fake. Polling profile
(generic, no URC): from the moment the card leaves the tray (the `sim-remove` control
operation), at a random phase of the poll, so the figure includes the wait for the poll.
Each round re-inserts the card and waits for the radio to come back before the next one
(with polling, a direct `check()` takes the card back at once, to keep the run short).
"""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import tempfile
from pathlib import Path

from agent.core.binding import BindingPolicy
from agent.core.clock import Clock
from agent.service.enforcer import Enforcer
from agent.core.store import Store
from at_commands import profiles
from simagent_lab.fakemodem import DEFAULT_ICCID
from at_commands.modem import Modem
from simagent_lab.fakemodem_handles import InProcessFakeModem, start_in_process

SWAPS = 200
POLL_INTERVAL = 0.1
# No registration during the run: the figure is the agent's reaction, not the network's.
REGISTER_DELAY = 3600.0


def _norm(line: str) -> str:
    return re.sub(r"\s+", "", line).upper()


async def _until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("benchmark round did not settle")
        await asyncio.sleep(0.002)


def _latency(transcript: list[dict], start: int, is_trigger) -> float:
    """Seconds from the first trigger entry at or after `start` to the next AT+CFUN=4."""
    entries = transcript[start:]
    trigger = next(e["t"] for e in entries if is_trigger(e))
    return next(e["t"] for e in entries if e["dir"] == "in" and e["t"] >= trigger and _norm(e["line"]) == "AT+CFUN=4") - trigger


async def _swaps(fake: InProcessFakeModem, directory: Path, poll_interval: float) -> list[float]:
    store = Store.open(directory / f"state-{fake.modem.state.profile.name}", clock=Clock())
    modem = await Modem.open(fake.port, "auto")
    await modem.initialise()
    enforcer = Enforcer(modem, store, BindingPolicy(), sim_poll_interval=poll_interval)
    await enforcer.start()
    runner = asyncio.create_task(enforcer.run())
    removed = fake.modem.state.profile.sim_removed_sample
    if enforcer.polling:
        def is_trigger(e):
            return e["dir"] == "ctl" and e["line"] == "sim-remove"
    else:
        def is_trigger(e):
            return e["dir"] == "out" and e["line"] == removed
    latencies = []
    rng = random.Random(1)
    try:
        for _ in range(SWAPS):
            if enforcer.polling:
                await asyncio.sleep(rng.uniform(0, poll_interval))  # a random phase of the poll
            start = len(fake.modem.transcript.entries)
            fake.sim_remove()
            await _until(lambda: enforcer.state()["radio"]["cfun"] == 4)
            latencies.append(_latency(fake.modem.transcript.entries, start, is_trigger))
            fake.sim_insert(DEFAULT_ICCID)
            if enforcer.polling:  # bring the card back now rather than at the next poll
                await enforcer.check("benchmark")
            await _until(lambda: enforcer.state()["radio"]["cfun"] == 1)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        modem.close()
        store.close()
    return latencies


def _p99_ms(values: list[float]) -> float:
    return round(statistics.quantiles(values, n=100, method="inclusive")[98] * 1000, 2)


def run() -> dict:
    assert profiles.QUECTEL.sim_removed_urcs and not profiles.GENERIC.sim_removed_urcs
    with tempfile.TemporaryDirectory(prefix="simagent-bench-swap-") as name:
        directory = Path(name)
        hotswap = start_in_process(directory, "quectel", profile="quectel", register_delay=REGISTER_DELAY)
        polled = start_in_process(directory, "generic", profile="generic", register_delay=REGISTER_DELAY)
        try:
            urc = asyncio.run(_swaps(hotswap, directory, POLL_INTERVAL))
            poll = asyncio.run(_swaps(polled, directory, POLL_INTERVAL))
        finally:
            hotswap.modem.stop()
            polled.modem.stop()
    return {
        "swap_count": SWAPS,
        "swap_to_radio_off_p99_ms": _p99_ms(urc),
        "swap_to_radio_off_median_ms": round(statistics.median(urc) * 1000, 2),
        "swap_to_radio_off_polling_p99_ms": _p99_ms(poll),
        "swap_to_radio_off_polling_median_ms": round(statistics.median(poll) * 1000, 2),
        "swap_poll_interval_ms": round(POLL_INTERVAL * 1000),
    }
