"""Adversarial review findings (issue 9): each test shows a way the promise, the gate's
liveness or its evidence still breaks. Real parts: the fake modem on a pty, the real
client, modem layer, store and Enforcer."""

import asyncio
import contextlib

from agent.core import at_rules
from at_commands.commands import is_query
from at_commands.client import CommandTimeout

from .conftest import FOREIGN_ICCID, HOME_ICCID, run, sent


def test_a_query_naming_the_hotswap_tag_does_not_swallow_a_sim_swap(open_terminal):
    """A service-group member (or a token-free P/cmd) may send any read form, e.g.
    AT+QSIMSTAT?. While it is pending, the protocol core takes every line with that tag
    for its answer, so Quectel's hot-swap URCs (+QSIMSTAT: 1,0 / 1,1) go to the caller
    and never reach the gate: a foreign card inserted meanwhile stays on CFUN=1."""

    async def scenario():
        async with open_terminal(profile="quectel") as t:
            assert t.started.status == "bound" and t.fake.state()["cfun"] == 1
            assert is_query("AT+QSIMSTAT?")  # no --unsafe, no token needed
            # A slow answer (0.3 s, well within the fake's 0.6 s registration delay: with
            # AT+CSQ in its place the gate's +CFUN=4 comes in time).
            t.fake.fault("delay", seconds=0.3)
            caller = asyncio.create_task(
                t.enforcer.user_command("AT+QSIMSTAT?", write=False, who={"uid": 1000}))
            await asyncio.sleep(0.1)
            t.fake.sim_insert(FOREIGN_ICCID)  # the swap URCs arrive while the query is pending
            with contextlib.suppress(CommandTimeout):  # given up for the gate (client.PRIORITY_WAIT)
                await caller
            await t.settle()
            await asyncio.sleep(1.0)
            assert FOREIGN_ICCID not in t.attached_iccids(), (
                f"foreign card attached; gate state {t.enforcer.gate.state}, cfun {t.fake.state()['cfun']}")

    run(scenario())


def test_a_flood_of_hotswap_tag_queries_does_not_hide_a_sim_swap(open_terminal):
    """The same without any modem fault: a group member keeps AT+QSIMSTAT? (a query) in
    flight back to back; a swap URC that lands while one is pending goes to the caller."""

    async def scenario():
        async with open_terminal(profile="quectel") as t:
            assert t.started.status == "bound" and t.fake.state()["cfun"] == 1
            stop = asyncio.Event()

            async def flood():
                while not stop.is_set():
                    await t.enforcer.user_command("AT+QSIMSTAT?", write=False, who={"uid": 1000})

            callers = [asyncio.create_task(flood()) for _ in range(4)]
            await asyncio.sleep(0.3)
            t.fake.sim_insert(FOREIGN_ICCID)
            await t.settle()
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*callers)
            assert FOREIGN_ICCID not in t.attached_iccids(), (
                f"foreign card attached; gate state {t.enforcer.gate.state}, cfun {t.fake.state()['cfun']}")

    run(scenario())


def test_a_timed_out_query_does_not_hide_later_sim_swaps(open_terminal):
    """A technician's AT+CPIN?;+QSIMSTAT? whose reply the module drops times out; the core
    then discards every line with those tags as the stale reply until the next command
    resynchronises it. On a hot-swap profile the gate sends nothing by itself, so a swap
    made in that window is never seen (no fault at the time of the swap)."""

    async def scenario():
        async with open_terminal(profile="quectel") as t:
            assert t.started.status == "bound" and t.fake.state()["cfun"] == 1
            t.fake.fault("drop")  # one reply lost
            response = None
            try:
                response = await t.enforcer.user_command("AT+CPIN?;+QSIMSTAT?", write=False, who={"uid": 1000})
            except Exception as exc:  # CommandTimeout after USER_TIMEOUT
                print("caller:", exc)
            assert response is None
            await asyncio.sleep(0.5)  # the modem answers normally again
            t.fake.sim_insert(FOREIGN_ICCID)
            await t.settle()
            await asyncio.sleep(1.0)
            assert FOREIGN_ICCID not in t.attached_iccids(), (
                f"foreign card attached; gate state {t.enforcer.gate.state}, cfun {t.fake.state()['cfun']}")

    run(scenario())


def test_a_radio_on_overtaken_by_a_swap_is_recorded_with_its_own_cause(open_terminal):
    """+CFUN=1 for the allowed card is in flight when the tray changes. The module did
    switch the radio on, so the `radio_restored` entry must say why (the allowed card, its
    decision): `_record_radio` takes `_target_why` *after* the command, which by then is
    the next wish's (the swap's), so the entry reads "radio restored: sim_changed"."""

    async def scenario():
        async with open_terminal(profile="quectel") as t:
            assert t.started.status == "bound" and t.fake.state()["cfun"] == 1
            t.fake.sim_remove()
            await t.cfun(4, "after the removal")
            await t.status("no_sim")
            t.fake.fault("delay", seconds=0.3, count=20)  # a slow module: every answer takes 0.3 s
            before = len(sent(t.fake.transcript, "AT+CFUN=1"))
            t.fake.sim_insert(HOME_ICCID)
            await t.until(lambda: len(sent(t.fake.transcript, "AT+CFUN=1")) > before, "the radio-on on the wire", 10)
            t.fake.sim_insert(FOREIGN_ICCID)  # while +CFUN=1 executes
            await t.until(lambda: t.enforcer.state()["binding"]["reason"] == "iccid_mismatch", "the violation", 15)
            await t.cfun(4, "after the foreign card", timeout=10)
            restored = [e["data"] for e in t.evidence() if e["type"] == "radio_restored"]
            print(restored)
            assert restored[-1].get("iccid") == HOME_ICCID and restored[-1].get("reason") != "sim_changed", restored[-1]

    run(scenario(), timeout=60)


def test_a_write_checked_before_a_swap_does_not_go_out_after_the_gate(open_terminal):
    """`user_command` checks `held_off` before it waits for the channel. Root's AT+CFUN=1
    (allowed: the card is allowed) queues behind a slow query; the tray changes to a
    foreign card; the gate's +CFUN=4 (priority) goes first, then root's +CFUN=1 goes out
    while the gate holds the radio off, and the foreign card is on the air until the
    gate's next decision."""

    async def scenario():
        async with open_terminal(profile="quectel") as t:
            assert t.started.status == "bound" and t.fake.state()["cfun"] == 1
            t.fake.fault("delay", seconds=1.0)  # the next command (a caller's query) is slow
            query = asyncio.create_task(t.enforcer.user_command("AT+CSQ", write=False, who={"uid": 1000}))
            await asyncio.sleep(0.1)
            write = asyncio.create_task(t.enforcer.user_command("AT+CFUN=1", write=True, who={"uid": 0}))
            await asyncio.sleep(0.1)
            swapped_at = t.fake.transcript[-1]["t"]
            t.fake.sim_insert(FOREIGN_ICCID)
            await asyncio.gather(query, write, return_exceptions=True)
            await t.status("violation", "iccid_mismatch")
            await t.cfun(4, "after the foreign card")
            after = [time for time in sent(t.fake.transcript, "AT+CFUN=1") if time > swapped_at]
            gate_off = min(time for time in sent(t.fake.transcript, "AT+CFUN=4") if time > swapped_at)
            assert not [time for time in after if time > gate_off], (
                "a caller's +CFUN=1 went out after the gate switched the radio off for a foreign card")

    run(scenario())


def test_a_second_reboot_within_the_boot_burst_is_not_ignored(open_terminal):
    """Boot URCs within BOOT_BURST (10 s) of the previous reboot are taken for the same
    boot. A module that reboots twice in a row (a brown-out loop, or root's AT+CFUN=1,1
    twice while the card is allowed) comes back from the second boot with its power-on
    settings: Quectel's hot-swap detection (AT+QSIMDET/QSIMSTAT) is off, and the agent
    never re-initialises it. The profile is not polled, so a foreign card inserted later
    is never seen."""

    async def scenario():
        async with open_terminal(profile="quectel") as t:
            assert t.started.status == "bound" and t.fake.state()["cfun"] == 1
            t.fake.reboot()
            await t.until(lambda: t.fake.state()["hotswap_active"] and t.fake.state()["cfun"] == 1
                          and t.enforcer.gate.state.value == "allowed", "back after the first reboot")
            await asyncio.sleep(0.5)
            t.fake.reboot()  # a second boot, a couple of seconds after the first
            await asyncio.sleep(2.0)
            hotswap_after_second_boot = t.fake.state()["hotswap_active"]
            t.fake.sim_insert(FOREIGN_ICCID)
            await t.settle()
            await asyncio.sleep(1.0)
            assert FOREIGN_ICCID not in t.attached_iccids(), (
                f"foreign card attached; hot-swap detection after the second boot: {hotswap_after_second_boot}, "
                f"gate {t.enforcer.gate.state}")

    run(scenario())


def test_a_status_read_does_not_swallow_the_allowed_card_coming_back(open_terminal):
    """SIMCom announces an inserted card with +CPIN: READY. `simagent status` (any group
    member) and the token-free platform `status` read AT+CPIN? without priority; an
    insertion that lands while it is pending is taken for its answer. The gate, which
    holds the radio off for the empty tray, never hears of the card and (the profile is
    not polled) the terminal stays offline with its own card in."""
    from agent.core.facts import read_modem_status

    async def scenario():
        async with open_terminal(profile="simcom") as t:
            assert t.started.status == "bound" and t.fake.state()["cfun"] == 1
            t.fake.sim_remove()
            await t.cfun(4, "after the removal")
            await t.status("no_sim")
            t.fake.fault("delay", seconds=0.3, count=30)  # a slow module
            reads = len(sent(t.fake.transcript, "AT+CPIN?"))
            status = asyncio.create_task(read_modem_status(t.modem))
            await t.until(lambda: len(sent(t.fake.transcript, "AT+CPIN?")) > reads, "the status read's AT+CPIN?", 10)
            t.fake.sim_insert(HOME_ICCID)  # +CPIN: READY while the status read's AT+CPIN? is pending
            await status
            t.fake.fault("clear")
            await t.cfun(1, "after the allowed card came back", timeout=10)

    run(scenario(), timeout=60)


def test_a_write_that_disarms_sim_detection_does_not_blind_the_gate(open_terminal):
    """While the card is allowed, root's --unsafe (or a platform token's) AT+QSIMSTAT=0
    is accepted and recorded; it turns Quectel's SIM-change reports off. The gate only
    re-reads +CFUN? after a write, the profile is not polled, so the next card inserted —
    a foreign one — is never checked and attaches. (Recorded, but the gate is bypassed
    without being lifted.)"""

    async def scenario():
        async with open_terminal(profile="quectel") as t:
            assert t.started.status == "bound" and t.fake.state()["cfun"] == 1
            response = await t.enforcer.user_command("AT+QSIMSTAT=0", write=True, who={"uid": 0})
            assert response.final.ok
            await asyncio.sleep(0.3)
            t.fake.sim_insert(FOREIGN_ICCID)
            await t.settle()
            await asyncio.sleep(1.0)
            assert FOREIGN_ICCID not in t.attached_iccids(), (
                f"foreign card attached; hot-swap active: {t.fake.state()['hotswap_active']}, gate {t.enforcer.gate.state}")

    run(scenario())


def test_a_scan_joined_to_another_command_does_not_delay_the_gate(open_terminal):
    """`is_abortable` needs every command of the line to be abortable, so root's
    AT+CSQ;+COPS=? (a network scan all the same, refused without --unsafe) is sent not
    abortable: the gate's +CFUN=4 cannot abort it and waits for the whole scan
    (USER_TIMEOUT, 10 s, on a module whose scan runs longer), while a foreign card
    inserted meanwhile registers. at_rules says a scan "never delays the radio gate"."""

    async def scenario():
        async with open_terminal(profile="quectel", scan_seconds=4.0) as t:
            assert t.started.status == "bound" and t.fake.state()["cfun"] == 1
            line = "AT+CSQ;+COPS=?"
            try:
                at_rules.check_command(line, unsafe=True)  # what the daemon's run_at checks first
            except at_rules.Refused:
                return  # refused: nothing can hold the gate back
            scan = asyncio.create_task(t.enforcer.user_command(line, write=True, who={"uid": 0}))
            await asyncio.sleep(0.3)
            t.fake.sim_insert(FOREIGN_ICCID)
            await t.settle()
            await asyncio.sleep(0.5)
            assert FOREIGN_ICCID not in t.attached_iccids(), (
                f"foreign card attached behind a scan; cfun {t.fake.state()['cfun']}, gate {t.enforcer.gate.state}")
            await asyncio.gather(scan, return_exceptions=True)

    run(scenario())
