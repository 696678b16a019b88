"""Issue 9 (AT layer): a session that cannot wedge, priority for the radio gate, SIM busy.
The real ATClient / Modem against the fake modem on a real pty; faults through the fake's
control operations."""

from __future__ import annotations

import asyncio
import time

import pytest

from at_commands.client import ATClient, CommandAborted, CommandTimeout, PortLost
from at_commands import profiles
from at_commands.modem import Modem
from at_commands.profiles import CRSM_READ_ICCID

ICCID = "89860000A1B2C3D4E5F6"
FAST_BACKOFF = (0.01,) * 5


def run(coro, limit: float = 30):
    return asyncio.run(asyncio.wait_for(coro, limit))


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# -- a caller that gives up leaves the core recoverable (bug 1) ------------------------------

def test_cancelled_caller_during_hang_then_clear_next_command_succeeds(fake_modem):
    """Reproduces `status` timing out during `fault hang`: the old core stayed AWAITING and
    every later command raised LocalProtocolError."""
    imei = fake_modem.state()["imei"]

    async def scenario():
        client = await ATClient.open(fake_modem.port)
        try:
            await client.command("ATE0")
            fake_modem.fault("hang")
            caller = asyncio.ensure_future(client.command("AT+CGSN", timeout=30))
            await asyncio.sleep(0.2)
            caller.cancel()  # e.g. the daemon's control op timed out
            with pytest.raises(asyncio.CancelledError):
                await caller
            fake_modem.fault("clear")
            started = time.monotonic()
            assert (await client.command("AT+CGSN", timeout=5)).lines == [imei]
            return time.monotonic() - started
        finally:
            client.close()

    assert run(scenario()) < 2.0


def test_cancelled_while_resynchronising_then_clear_next_command_succeeds(fake_modem):
    """The old core stayed PROBING: "cannot probe in state probing"."""
    imei = fake_modem.state()["imei"]

    async def scenario():
        client = await ATClient.open(fake_modem.port, resync_timeout=1.0)
        try:
            await client.command("ATE0")
            fake_modem.fault("hang")
            with pytest.raises(CommandTimeout):
                await client.command("AT+CSQ", timeout=0.1)
            caller = asyncio.ensure_future(client.command("AT+CGSN", timeout=5))
            await asyncio.sleep(0.3)  # its probe is out, unanswered
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            fake_modem.fault("clear")
            assert (await client.command("AT+CGSN", timeout=5)).lines == [imei]
            assert (await client.command("AT+CFUN?", timeout=5)).lines == ["+CFUN: 1"]
        finally:
            client.close()

    run(scenario())


def test_cancelled_while_queued_for_the_channel_passes_it_on(fake_modem):
    async def scenario():
        client = await ATClient.open(fake_modem.port)
        try:
            await client.command("ATE0")
            fake_modem.fault("delay", seconds=0.3)
            first = asyncio.ensure_future(client.command("AT+CGSN", timeout=5))
            queued = [asyncio.ensure_future(client.command("AT+CSQ", timeout=5)) for _ in range(3)]
            await asyncio.sleep(0.05)
            queued[1].cancel()
            await first
            assert [r.lines for r in await asyncio.gather(queued[0], queued[2])] == [["+CSQ: 14,99"]] * 2
            assert queued[1].cancelled()
        finally:
            client.close()

    run(scenario())


def test_consecutive_timeouts_close_the_port_and_a_fresh_client_works(fake_modem):
    async def scenario():
        client = await ATClient.open(fake_modem.port, resync_timeout=0.2)
        await client.command("ATE0")
        fake_modem.fault("hang")
        with pytest.raises(CommandTimeout):
            await client.command("AT+CSQ", timeout=0.2)
        waiting = asyncio.ensure_future(client.command("AT+CFUN?", timeout=5))
        with pytest.raises(PortLost, match="unresponsive: 3 consecutive timeouts"):
            await client.command("AT+CGSN", timeout=5)  # its two probes go unanswered
        with pytest.raises(PortLost):
            await waiting
        assert client.lost.done()
        fake_modem.fault("clear")
        again = await ATClient.open(fake_modem.port)
        try:
            return (await again.command("AT+CFUN?")).lines
        finally:
            again.close()

    assert run(scenario()) == ["+CFUN: 1"]


# -- priority for the radio gate -------------------------------------------------------------

def _wire_time(fm, line: str) -> float:
    return next(e["t"] for e in fm.transcript if e["dir"] == "in" and e["line"] == line)


def test_priority_command_aborts_a_network_scan(fake_modem_factory):
    fm = fake_modem_factory(scan_seconds=10)

    async def scenario():
        client = await ATClient.open(fm.port)
        try:
            await client.command("ATE0")
            scan = asyncio.ensure_future(client.command("AT+COPS=?", timeout=30, abortable=True))
            await until(lambda: fm.state()["executing"])
            issued = time.monotonic()
            await client.command("AT+CFUN=4", timeout=5, priority=True)
            done = time.monotonic()
            with pytest.raises(CommandAborted) as aborted:
                await scan
            assert aborted.value.response is not None and aborted.value.response.final.text == "ERROR"
            # The channel is in step: the next commands get their own answers.
            assert (await client.command("AT+CFUN?")).lines == ["+CFUN: 4"]
            return issued, done
        finally:
            client.close()

    issued, done = run(scenario())
    on_wire = _wire_time(fm, "AT+CFUN=4") - issued
    assert on_wire < 0.05, f"AT+CFUN=4 reached the wire {on_wire * 1000:.1f} ms after it was issued"
    assert done - issued < 0.5
    state = fm.state()
    assert state["cfun"] == 4 and state["counters"]["aborted"] == 1


def test_priority_command_jumps_a_queue_of_twenty(fake_modem):
    async def scenario():
        client = await ATClient.open(fake_modem.port)
        try:
            await client.command("ATE0")
            # The command in flight is not abortable and answers within PRIORITY_WAIT.
            fake_modem.fault("delay", seconds=0.06)
            in_flight = asyncio.ensure_future(client.command("AT+CGSN", timeout=5))
            await asyncio.sleep(0.02)
            queued = [asyncio.ensure_future(client.command("AT+CSQ", timeout=10)) for _ in range(20)]
            await asyncio.sleep(0.02)
            await client.command("AT+CFUN=4", timeout=5, priority=True)
            assert (await in_flight).final.ok  # not abortable: it finished normally
            assert all(r.final.ok for r in await asyncio.gather(*queued))
        finally:
            client.close()

    run(scenario())
    sent = [e["line"] for e in fake_modem.transcript if e["dir"] == "in"]
    start = sent.index("AT+CGSN")
    assert sent[start:start + 3] == ["AT+CGSN", "AT+CFUN=4", "AT+CSQ"]
    assert sent.count("AT+CSQ") == 20


# -- SIM busy (+CME ERROR: 14) -------------------------------------------------------------------

@pytest.mark.parametrize("busy, expected", [(2, ICCID), (20, None)])
def test_iccid_busy_is_retried_never_a_fallback(fake_modem_factory, busy, expected):
    fm = fake_modem_factory(profile="quectel", iccid=ICCID)

    async def scenario():
        modem = await Modem.open(fm.port, "quectel")
        modem.sim_busy_backoff = FAST_BACKOFF
        try:
            await modem.initialise()
            fm.fault("busy", count=busy)
            return await modem.read_iccid()
        finally:
            modem.close()

    assert run(scenario()) == expected
    commands = fm.state()["commands"]
    assert commands["AT+QCCID"] == min(busy + 1, len(FAST_BACKOFF) + 1)
    every_iccid_command = {c for p in profiles.PROFILES.values() for c, _tag in p.iccid_commands}
    assert not any(commands.get(c) for c in every_iccid_command - {"AT+QCCID"})


@pytest.mark.parametrize("cmee", [1, 2])  # numeric and textual "SIM busy"
def test_cimi_and_cpin_busy_are_retried(fake_modem, cmee):
    imsi = fake_modem.state()["imsi"]

    async def scenario():
        modem = await Modem.open(fake_modem.port, "generic")
        modem.sim_busy_backoff = FAST_BACKOFF
        try:
            await modem.initialise()
            await modem.client.command(f"AT+CMEE={cmee}")
            fake_modem.fault("busy", count=3)
            imsi_read = await modem.read_imsi()
            fake_modem.fault("busy", count=3)
            state_read = await modem.read_sim_state()
            fake_modem.fault("busy", count=20)
            unreadable = await modem.read_imsi(), await modem.read_sim_state()
            fake_modem.fault("clear")
            return imsi_read, state_read, unreadable
        finally:
            modem.close()

    assert run(scenario()) == (imsi, "ready", (None, "unknown"))


def test_crsm_busy_is_retried(fake_modem):
    async def scenario():
        modem = await Modem.open(fake_modem.port, "generic")
        modem.sim_busy_backoff = FAST_BACKOFF
        try:
            await modem.initialise()
            fake_modem.fault("busy", count=2)  # the card is busy for +CRSM twice
            return await modem.read_iccid()
        finally:
            modem.close()

    fake_modem.sim_insert(ICCID)
    assert run(scenario()) == ICCID
    assert fake_modem.state()["commands"][CRSM_READ_ICCID] == 3


def test_a_reboot_voids_the_command_in_flight_and_the_next_one_goes_at_once(fake_modem):
    """A module that restarts never answers the command it was executing: after its boot
    URC the caller gets CommandTimeout at once (not after its timeout, not counted as a
    failure) and the next command - the gate's +CFUN=4 - needs no probe."""
    async def scenario():
        client = await ATClient.open(fake_modem.port)
        try:
            await client.command("ATE0")
            fake_modem.fault("drop")  # the reply to the next command is lost
            started = time.monotonic()
            caller = asyncio.ensure_future(client.command("AT+CGSN", timeout=30))
            await asyncio.sleep(0.1)
            fake_modem.reboot()  # prints RDY ...
            client.interrupt("modem rebooted")  # what the enforcer does on the boot URC
            with pytest.raises(CommandTimeout):
                await caller
            assert time.monotonic() - started < 1.0
            sent_before = fake_modem.state()["counters"]["commands"]
            assert (await client.command("AT+CFUN=4", timeout=2, priority=True)).final.ok
            assert fake_modem.state()["counters"]["commands"] == sent_before + 1  # no probe first
            assert client._failures == 0
        finally:
            client.close()

    run(scenario())


def test_a_callers_command_lost_to_a_hang_does_not_hold_off_the_gate(fake_modem):
    """The module hung and came back; a caller's AT+CSQ swallowed by the hang waits for its
    10 s timeout. A priority command does not wait with it: the lost command is given up
    (not counted as a failure) and the priority command goes after a probe."""
    from at_commands.client import PRIORITY_WAIT

    async def scenario():
        client = await ATClient.open(fake_modem.port)
        try:
            await client.command("ATE0")
            fake_modem.fault("hang")
            caller = asyncio.ensure_future(client.command("AT+CSQ", timeout=10))
            await asyncio.sleep(0.2)
            fake_modem.fault("clear")
            started = time.monotonic()
            assert (await client.command("AT+CFUN=4", timeout=2, priority=True)).final.ok
            took = time.monotonic() - started
            with pytest.raises(CommandTimeout):
                await caller
            assert client._failures == 0
            return took
        finally:
            client.close()

    took = run(scenario())
    assert took < PRIORITY_WAIT + 0.3, took


def test_a_probe_refused_by_a_busy_module_is_repeated_at_once(fake_modem):
    """The line is out of step and the module answers the gate's probes `+CME ERROR: 14`
    (still busy): an answer proves the module alive, so the next probe goes at once instead
    of after PRIORITY_PROBE_WAIT each (found by the long invariant run, seed 4242: three
    refused probes held +CFUN=4 off for 1.5 s and a foreign card attached)."""
    from at_commands.client import PRIORITY_PROBE_WAIT

    async def scenario():
        client = await ATClient.open(fake_modem.port)
        try:
            await client.command("ATE0")
            await client.command("AT+CMEE=1")
            fake_modem.fault("hang")
            with pytest.raises(CommandTimeout):
                await client.command("AT+CSQ", timeout=0.2)  # the line is out of step now
            fake_modem.fault("clear")
            fake_modem.fault("busy", count=3)
            started = time.monotonic()
            assert (await client.command("AT+CFUN=4", timeout=2, priority=True)).final.ok
            return time.monotonic() - started
        finally:
            client.close()

    took = run(scenario())
    assert took < PRIORITY_PROBE_WAIT / 2, took
    probes = [e["line"] for e in fake_modem.transcript if e["dir"] == "in" and e["line"].startswith("ATS")]
    assert len(probes) == 4, probes  # three refused, the fourth answered


def test_a_radio_command_lost_to_a_hang_is_given_up_when_the_module_speaks(fake_modem):
    """The gate sent `AT+CFUN=4` into a hang; the module came back without it (a hung
    module drops its input). The first URC it prints (a card pushed in) shows it alive:
    the command is given up at once and sent again, instead of after its 3 s timeout
    while the card registers (seen in the invariant run: an attach 0.8 s after a hang)."""
    from at_commands.client import GATE_RADIO, RADIO_LOST_AFTER

    async def scenario():
        client = await ATClient.open(fake_modem.port)
        try:
            await client.command("ATE0")
            fake_modem.fault("hang")
            lost = asyncio.ensure_future(client.command("AT+CFUN=4", timeout=3.0, priority=GATE_RADIO))
            await asyncio.sleep(RADIO_LOST_AFTER + 0.1)
            fake_modem.fault("clear")
            assert fake_modem.state()["cfun"] == 1  # the module never took it
            started = time.monotonic()
            fake_modem.urc("+QSIMSTAT: 1,1")
            with pytest.raises(CommandTimeout):
                await lost
            given_up = time.monotonic() - started
            assert (await client.command("AT+CFUN=4", timeout=3.0, priority=GATE_RADIO)).final.ok
            return given_up, time.monotonic() - started, client._failures
        finally:
            client.close()

    given_up, radio_off, failures = run(scenario())
    assert given_up < 0.3 and radio_off < 0.6, (given_up, radio_off)
    assert failures == 0  # a lost command is not the module's unresponsiveness
    assert fake_modem.state()["cfun"] == 4
