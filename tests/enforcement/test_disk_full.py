"""Disk full (SPEC §12): a decision that cannot be recorded is no decision. The radio
stays off until the evidence can be written again, and the enforcer never dies of it."""

import sqlite3

import pytest

from agent.core.store import Store

from .conftest import FOREIGN_ICCID, HOME_ICCID, HOME_IMEI, HOTSWAP_PROFILES, run


def fill_disk(store: Store) -> None:
    """SQLite's own limit: the database may not grow, and filler records use up the room
    left in its pages, so any further record fails with SQLITE_FULL ("database or disk is
    full"), the error a full file system gives."""
    conn = store.read()._conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    for pad in (2000, 200, 20, 0):
        try:
            while True:
                store.record("disk_filler", {"pad": "x" * pad})
        except sqlite3.OperationalError as exc:
            assert "full" in str(exc)


def free_disk(store: Store) -> None:
    store.read()._conn.execute("PRAGMA max_page_count = 1073741823")


@pytest.mark.faults
@pytest.mark.parametrize("profile", [HOTSWAP_PROFILES[0], "generic"])
def test_disk_full_holds_the_radio_off_until_the_evidence_can_be_written(open_terminal, profile):
    async def scenario():
        async with open_terminal(profile=profile) as t:
            assert t.started.status == "bound" and t.fake.state()["cfun"] == 1
            fill_disk(t.store)
            recorded = len(t.evidence())

            t.fake.sim_insert(FOREIGN_ICCID)
            await t.cfun(4, "after the foreign card on a full disk")
            t.fake.sim_insert(HOME_ICCID)
            await t.status("store_unwritable")
            await t.settle()
            assert t.fake.state()["cfun"] == 4, "the right card came back, but nothing could be recorded"
            assert FOREIGN_ICCID not in t.attached_iccids()
            assert len(t.evidence()) == recorded

            free_disk(t.store)
            await t.cfun(1, "once the evidence can be written", timeout=10)
            await t.status("ok")
            types = [e["type"] for e in t.evidence()[recorded:]]
            assert types[0] == "evidence_gap" and "radio_restored" in types
            assert t.verify_evidence().ok and t.bindings() == [(HOME_ICCID, HOME_IMEI)]

    run(scenario())
