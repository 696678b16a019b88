"""What the enforcer says about the tray: the `trigger` of SIM, reboot and radio records is
a word from a fixed vocabulary, the AT line behind it (a hot-swap or boot URC) is in
`trigger_line`, exactly as the module sent it (every event is checked against
agent/schemas/event.json, whose trigger enum is the enforcer's vocabulary); and the SIM it
shows is the one it read last, not an earlier read's."""

import json

from agent.service.enforcer import Trigger
from ..conftest import SCHEMA_DIR, validate_message

from .conftest import FOREIGN_ICCID, run

TRIGGERED = ("sim_removed", "sim_inserted", "modem_rebooted", "radio_blocked", "radio_restored")


def triggered_events(events: list[dict]) -> list[dict]:
    for event in events:
        validate_message(event, "event")
    return [e for e in events if e["type"] in TRIGGERED]


def sent_by_modem(transcript: list[dict], prefix: str) -> list[str]:
    return [e["line"] for e in transcript if e["dir"] == "out" and e["line"].startswith(prefix)]


def test_the_schema_names_the_enforcers_vocabulary():
    schema = json.loads((SCHEMA_DIR / "event.json").read_text())
    (rule,) = [r for r in schema["allOf"] if "sim_removed" in r["if"]["properties"]["type"].get("enum", ())]
    assert set(rule["then"]["properties"]["data"]["properties"]["trigger"]["enum"]) == {t.value for t in Trigger}


def test_a_removal_urc_is_the_word_and_its_line_travels_beside_it(open_terminal):
    async def scenario():
        async with open_terminal(profile="quectel") as t:
            start = triggered_events(t.events())
            assert {e["data"]["trigger"] for e in start} == {"session_start"}
            assert all("trigger_line" not in e["data"] for e in start)

            t.fake.sim_remove()
            await t.status("no_sim")
            await t.cfun(4, "after removal")
            (urc,) = sent_by_modem(t.fake.transcript, "+QSIMSTAT:")
            removal = triggered_events(t.events())[len(start):]
            assert {e["type"] for e in removal} == {"sim_removed", "radio_blocked"}
            for event in removal:
                assert (event["data"]["trigger"], event["data"]["trigger_line"]) == ("urc_sim_removed", urc)

    run(scenario())


def test_a_boot_urc_is_the_word_and_its_line_travels_beside_it(open_terminal):
    async def scenario():
        async with open_terminal(profile="quectel") as t:
            t.fake.reboot()
            await t.until(lambda: "modem_rebooted" in t.types(), "the reboot recorded")
            (rebooted,) = [e for e in triggered_events(t.events()) if e["type"] == "modem_rebooted"]
            assert rebooted["data"] == {"trigger": "urc_boot", "trigger_line": "RDY"}

    run(scenario())


def test_a_polled_change_says_poll_and_has_no_line(open_terminal):
    async def scenario():
        async with open_terminal(profile="generic") as t:
            t.fake.sim_insert(FOREIGN_ICCID)
            await t.status("violation", "iccid_mismatch")
            await t.cfun(4, "after the foreign card")
            swap = [e for e in triggered_events(t.events()) if e["type"] in ("sim_removed", "sim_inserted")]
            assert [e["type"] for e in swap] == ["sim_removed", "sim_inserted"]
            for event in swap:
                assert event["data"]["trigger"] == "poll" and "trigger_line" not in event["data"]

    run(scenario())


def test_an_unreadable_sim_shows_no_iccid_and_the_card_read_again_is_no_change(open_terminal):
    """A read that could not tell the SIM state reads no ICCID: the state document must not
    show the previous read's ICCID beside `sim_unreadable` as if it had been read now, and
    the same card read again afterwards is not a removal and an insertion."""
    async def scenario():
        async with open_terminal(profile="generic") as t:
            assert t.started.status == "bound"
            home = t.enforcer.state()["sim"]["iccid"]
            changes = [e["type"] for e in t.events()].count("sim_removed")
            t.fake.fault("error")  # the next command, the poll's AT+CPIN?, answers ERROR
            await t.status("sim_unreadable")
            assert t.enforcer.state()["sim"] == {"state": "unknown", "iccid": None, "imsi": None}
            await t.status("ok")  # the retry reads the card again
            assert t.enforcer.state()["sim"]["iccid"] == home
            assert [e["type"] for e in t.events()].count("sim_removed") == changes
            assert "sim_inserted" not in [e["type"] for e in t.events()]

    run(scenario())
