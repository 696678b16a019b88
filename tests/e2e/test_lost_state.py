"""A state directory emptied by hand can no longer bind a new card: the real daemon
records `state_reset`, holds the radio off for the card in the tray and binds nothing by
itself until root's `bind reset` (or a rebind token) says which card belongs here."""

from __future__ import annotations

import contextlib
import json
import sqlite3

import pytest

from .conftest import (FOREIGN_ICCID, HOME_ICCID, TIMEOUT, assert_delivered_in_order, committed_event_seq, events,
                       sign_token, swap_to, trusted_key, wait_event, wait_modem)
from ..conftest import wait_until

pytestmark = pytest.mark.faults
# What was done to state.db (its WAL and shm removed first) -> the reset reason recorded.
DAMAGE = {"emptied": "database_empty", "deleted": "database_missing", "zeroed": "database_damaged",
          "truncated": "database_damaged"}


def bindings(agent) -> list[str]:
    view = json.loads(agent.cli("bind", "show", "--json").stdout)
    return [row["iccid"] for row in view["bindings"]]


def damage(db, how: str) -> None:
    if how == "emptied":
        db.write_bytes(b"")  # `: > state.db`
    elif how == "deleted":
        db.unlink()
    elif how == "zeroed":
        db.write_bytes(bytes(db.stat().st_size))
    else:
        db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])


@pytest.mark.parametrize("how", list(DAMAGE))
def test_lost_state_fails_closed_until_root_resets(home_modem, agent_process, subscriber, mosquitto, how, fault, tmp_path):
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)
    wait_event(platform, "radio_restored")
    swap_to(home_modem, FOREIGN_ICCID)  # blocked, so the radio is off when the agent stops
    wait_event(platform, "binding_violation")
    wait_modem(home_modem, lambda s: s["cfun"] == 4, "the foreign card held off")
    agent.stop()
    committed = committed_event_seq(agent)
    platform.wait_for(lambda sub: max(e["seq"] for e in events(sub)) >= committed, TIMEOUT, what="the events before the damage")
    fault.record(how, trials=1, committed=range(1, committed + 1), received=[e["seq"] for e in events(platform)])
    assert_delivered_in_order(platform, committed)

    for sidecar in ("state.db-wal", "state.db-shm"):
        (agent.state_dir / sidecar).unlink(missing_ok=True)
    damage(agent.state_dir / "state.db", how)
    attaches_before = len(home_modem.state()["attaches"])
    mark = max(e["seq"] for e in events(platform))  # before the restart: its events come fast
    agent.restart()

    reset = wait_event(platform, "state_reset", timeout=TIMEOUT)
    assert reset["seq"] > mark, "event seq goes on across a reset (the anchor keeps it)"
    assert reset["data"]["reason"] == DAMAGE[how]
    violation = wait_event(platform, "binding_violation", after=reset["seq"], timeout=TIMEOUT)
    assert violation["data"]["reason"] == "state_reset"
    wait_modem(home_modem, lambda s: s["cfun"] == 4, "radio held off after the reset")
    wait_until(lambda: json.loads(agent.cli("status", "--json").stdout)["binding"]["reason"] == "state_reset",
               TIMEOUT, what="status shows the reset")
    assert bindings(agent) == []
    assert not [a for a in home_modem.state()["attaches"][attaches_before:] if a["iccid"] == FOREIGN_ICCID]

    result = agent.cli("bind", "reset", "--reason", "card replaced on site, ticket 31")
    assert result.returncode == 0, result.stderr
    wait_modem(home_modem, lambda s: s["cfun"] == 1, "the card in the tray bound by root's reset")
    assert bindings(agent) == [FOREIGN_ICCID]
    bundle = tmp_path / "evidence.json"  # the chain begun at the reset verifies
    agent.cli("evidence", "export", "--out", str(bundle), check=True)
    verdict = agent.cli("evidence", "verify", str(bundle))
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr


def test_a_rebind_token_lifts_the_reset(home_modem, agent_process, subscriber, mosquitto):
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto, binding={"trusted_keys": [trusted_key()]})
    wait_event(platform, "radio_restored")
    agent.stop()
    (agent.state_dir / "state.db").write_bytes(b"")
    for sidecar in ("state.db-wal", "state.db-shm"):
        (agent.state_dir / sidecar).unlink(missing_ok=True)
    agent.restart()
    wait_event(platform, "state_reset")
    wait_modem(home_modem, lambda s: s["cfun"] == 4, "held off after the reset, even for the right card")
    result = agent.cli("bind", "accept", sign_token("rebind", HOME_ICCID))
    assert result.returncode == 0, result.stderr
    wait_modem(home_modem, lambda s: s["cfun"] == 1, "radio back for the card the token names")
    assert bindings(agent) == [HOME_ICCID]
    assert "state_reset" in [e["type"] for e in events(platform)]


def edit_anchor(state_dir, text: str) -> None:
    (state_dir / "evidence.anchor").write_text(text)


def edit_event_seq(state_dir, text: str) -> None:
    with contextlib.closing(sqlite3.connect(state_dir / "state.db")) as db, db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'event_seq'", (text,))


# A hand-edited anchor or fact -> the reset it is. The daemon once died at start on these,
# before the radio gate ran: a module rebooting with RF on attached the foreign card.
EDITS = {
    "anchor_float_overflow": (edit_anchor, '{"seq": 1e400, "hash": "x"}', "database_rolled_back"),
    "anchor_deep_nesting": (edit_anchor, "[" * 100_000, "database_rolled_back"),
    "event_seq_not_json": (edit_event_seq, "{not json", "database_damaged"),
    "event_seq_a_string": (edit_event_seq, '"x"', "database_damaged"),
}


@pytest.mark.parametrize("edit,text,reason", EDITS.values(), ids=EDITS.keys())
def test_an_edited_state_still_gates_the_radio(home_modem, agent_process, subscriber, mosquitto, edit, text, reason):
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)
    wait_event(platform, "radio_restored")
    swap_to(home_modem, FOREIGN_ICCID)
    wait_modem(home_modem, lambda s: s["cfun"] == 4, "the foreign card held off")
    agent.stop()
    edit(agent.state_dir, text)
    agent.start()
    reset = wait_event(platform, "state_reset", timeout=TIMEOUT)  # its seq: from 1 when the anchor was unusable
    assert reset["data"]["reason"] == reason
    attaches_before = len(home_modem.state()["attaches"])
    home_modem.reboot()  # the module boots with RF on
    rebooted = wait_event(platform, "modem_rebooted", after=reset["seq"], timeout=TIMEOUT)
    wait_event(platform, "radio_blocked", after=rebooted["seq"], timeout=TIMEOUT)
    wait_modem(home_modem, lambda s: s["cfun"] == 4, "the foreign card held off after the reboot")
    assert not [a for a in home_modem.state()["attaches"][attaches_before:] if a["iccid"] == FOREIGN_ICCID], agent.log[-400:]
