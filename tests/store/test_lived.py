"""The store knows it has lived (SPEC §4): a state directory that has run before tells a
lost, emptied, damaged or rolled-back database from a first start, records `state_reset`
with what it found and sets `reset_pending`; a lock or another passing error is not taken
for damage and leaves the file alone."""

import contextlib
import os
import shutil
import sqlite3

import pytest

from agent.core.store import (ANCHOR_NAME, DEVICE_KEY_NAME, RESET_PENDING_KEY, Binding, Store, StoreDamaged,
                              StoreUnavailable)

from .test_store import FixedClock, events

pytestmark = pytest.mark.faults


def lived(state, bound="89860012345678901234"):
    """A state directory an agent has run in, with one binding; returns its path."""
    s = Store.open(state, clock=FixedClock())
    with s.transaction() as tx:
        tx.put_binding(Binding(bound, "490154203237518", "2026-01-01T00:00:00Z", "first-use"))
        tx.record("bound", {"iccid": bound})
    s.close()
    return state


def reopened(state):
    s = Store.open(state, clock=FixedClock())
    return s, [e for e, _ in s.evidence_entries() if e["type"] == "state_reset"]


def assert_reset(s, resets, reason):
    assert s.reset_reason == reason
    assert [r["data"]["reason"] for r in resets] == [reason]
    assert s.read().get_meta(RESET_PENDING_KEY)["reason"] == reason
    assert s.read().bindings() == []
    assert "state_reset" in [e["type"] for e in events(s)]


def test_a_first_start_and_a_clean_restart_are_not_resets(tmp_path):
    state = lived(tmp_path / "state")
    s, resets = reopened(state)
    assert resets == [] and s.reset_reason is None and s.read().get_meta(RESET_PENDING_KEY) is None
    assert [b.iccid for b in s.read().bindings()] == ["89860012345678901234"]
    s.close()


def test_a_database_emptied_by_hand_is_a_reset(tmp_path):
    state = lived(tmp_path / "state")
    (state / "state.db").write_bytes(b"")  # `: > state.db`
    s, resets = reopened(state)
    assert_reset(s, resets, "database_empty")
    s.close()


def test_a_zeroed_database_is_damaged_and_kept(tmp_path):
    state = lived(tmp_path / "state")
    size = (state / "state.db").stat().st_size
    (state / "state.db").write_bytes(bytes(size))
    s, resets = reopened(state)
    assert_reset(s, resets, "database_damaged")
    kept = resets[0]["data"]["moved_to"]
    assert (state / kept).read_bytes() == bytes(size)
    s.close()


def test_a_truncated_database_is_damaged_and_kept(tmp_path):
    state = lived(tmp_path / "state")
    for sidecar in ("state.db-wal", "state.db-shm"):
        (state / sidecar).unlink(missing_ok=True)
    db = state / "state.db"
    kept = db.read_bytes()[: db.stat().st_size // 2]  # a copy or a write cut short
    db.write_bytes(kept)
    s, resets = reopened(state)
    assert_reset(s, resets, "database_damaged")
    assert (state / resets[0]["data"]["moved_to"]).read_bytes() == kept
    s.close()


@pytest.mark.parametrize("remove", [("state.db",), ("state.db", ANCHOR_NAME, ".initialised")], ids=["db", "db+anchor+marker"])
def test_a_deleted_database_is_a_reset_while_anything_shows_the_terminal_ran(tmp_path, remove):
    state = lived(tmp_path / "state")
    (state / DEVICE_KEY_NAME).write_text("key")  # the daemon creates it on its first start
    for name in remove:
        (state / name).unlink()
    s, resets = reopened(state)
    assert_reset(s, resets, "database_missing")
    s.close()


def test_an_older_copy_put_back_is_a_rollback(tmp_path):
    state = lived(tmp_path / "state")
    shutil.copy(state / "state.db", tmp_path / "old.db")
    s = Store.open(state, clock=FixedClock())
    s.record("sim_inserted", {"iccid": "x"})
    s.close()  # writes the anchor
    shutil.copy(tmp_path / "old.db", state / "state.db")
    s, resets = reopened(state)
    assert_reset(s, resets, "database_rolled_back")
    assert "anchor saw entry 2" in resets[0]["data"]["detail"]
    assert (state / resets[0]["data"]["moved_to"]).exists()
    s.close()


def test_a_deleted_wal_that_held_the_history_is_a_rollback(tmp_path):
    state = tmp_path / "state"
    s = Store.open(state, clock=FixedClock())
    s.record("agent_started", {})
    s.close()
    s = Store.open(state, clock=FixedClock())
    s.record("bound", {"iccid": "y"})
    s.write_anchor()
    shutil.copy(state / "state.db", tmp_path / "main-file-only.db")  # what is left once the WAL is gone
    s.close()
    shutil.copy(tmp_path / "main-file-only.db", state / "state.db")
    (state / "state.db-wal").unlink(missing_ok=True)
    s, resets = reopened(state)
    assert_reset(s, resets, "database_rolled_back")
    s.close()


def test_a_damaged_anchor_fails_closed(tmp_path):
    state = lived(tmp_path / "state")
    (state / ANCHOR_NAME).write_text("{not json")
    s, resets = reopened(state)
    assert_reset(s, resets, "database_rolled_back")
    s.close()


HOSTILE_ANCHORS = {
    "float_overflow": '{"seq": 1e400, "hash": "x"}',  # OverflowError in int()
    "int_too_big_for_sqlite": '{"seq": 99999999999999999999999, "hash": "x"}',  # OverflowError in sqlite3
    "deep_nesting": "[" * 100_000,  # RecursionError in json
    "not_a_hash": '{"seq": 1, "hash": 7}',
    "huge": '{"seq": 1, "hash": "' + "a" * 1_000_000 + '"}',
}


@pytest.mark.parametrize("text", HOSTILE_ANCHORS.values(), ids=HOSTILE_ANCHORS.keys())
def test_the_start_fails_closed_on_a_hostile_anchor(tmp_path, text):
    state = lived(tmp_path / "state")
    (state / ANCHOR_NAME).write_text(text)
    s, resets = reopened(state)
    assert_reset(s, resets, "database_rolled_back")
    s.close()


@pytest.mark.parametrize("text", HOSTILE_ANCHORS.values(), ids=HOSTILE_ANCHORS.keys())
def test_a_read_only_reader_reports_a_hostile_anchor_as_damage(tmp_path, text):
    state = lived(tmp_path / "state")
    (state / ANCHOR_NAME).write_text(text)
    with pytest.raises(StoreDamaged, match="anchor is unreadable"):
        Store.open_read_only(state)


def test_an_anchor_fifo_fails_closed_without_blocking(tmp_path):
    state = lived(tmp_path / "state")
    (state / ANCHOR_NAME).unlink()
    os.mkfifo(state / ANCHOR_NAME)
    s, resets = reopened(state)
    assert_reset(s, resets, "database_rolled_back")
    s.close()


EDITED_FACTS = {"not_json": "{not json", "a_string_seq": '"x"', "a_float_seq": "1.5", "too_big": str(2**70)}


@pytest.mark.parametrize("value", EDITED_FACTS.values(), ids=EDITED_FACTS.keys())
def test_an_edited_fact_is_damage_at_the_start(tmp_path, value):
    state = lived(tmp_path / "state")
    with contextlib.closing(sqlite3.connect(state / "state.db")) as db, db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'event_seq'", (value,))
    with pytest.raises(StoreDamaged, match="'event_seq'"):
        Store.open_read_only(state)
    s, resets = reopened(state)
    assert_reset(s, resets, "database_damaged")
    assert "'event_seq'" in resets[0]["data"]["detail"]
    s.record("after", {})  # the event seq counts again
    s.close()


def test_a_locked_database_is_unavailable_not_damaged(tmp_path):
    state = lived(tmp_path / "state")
    holder = sqlite3.connect(state / "state.db", isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")  # as a careless sqlite3 shell can
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            Store.open(state, clock=FixedClock(), busy_timeout=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not list(state.glob("state.db.corrupt-*"))
    s, resets = reopened(state)
    assert resets == [] and [b.iccid for b in s.read().bindings()] == ["89860012345678901234"]
    s.close()


def test_a_full_disk_at_open_is_unavailable_not_damage(small_disk):
    """Issue 10: a full disk at open moved the healthy DB aside, left a 0-byte state.db and
    exited with a traceback; once space was free the bindings were gone, no reset said."""
    state = lived(small_disk.path / "state")
    for sidecar in ("state.db-wal", "state.db-shm"):
        (state / sidecar).unlink(missing_ok=True)
    small_disk.fill()
    before = sorted(p.name for p in state.iterdir())
    with pytest.raises(StoreUnavailable):
        Store.open(state, clock=FixedClock(), busy_timeout=0.2)
    assert not list(state.glob("state.db.corrupt-*"))
    assert (state / "state.db").stat().st_size > 0
    assert sorted(p.name for p in state.iterdir() if not p.name.startswith("state.db-")) == [
        n for n in before if not n.startswith("state.db-")]
    small_disk.free()
    s, resets = reopened(state)
    assert resets == [] and [b.iccid for b in s.read().bindings()] == ["89860012345678901234"]
    s.close()


def test_a_read_only_state_directory_is_unavailable_not_damage(small_disk):
    """A file system remounted read-only (as the kernel does after an I/O error): the
    store cannot be opened now, and nothing is moved, reset or lost."""
    state = lived(small_disk.path / "state")
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    small_disk.read_only(True)
    try:
        with pytest.raises(StoreUnavailable):
            Store.open(state, clock=FixedClock(), busy_timeout=0.2)
        assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    finally:
        small_disk.read_only(False)
    s, resets = reopened(state)
    assert resets == [] and [b.iccid for b in s.read().bindings()] == ["89860012345678901234"]
    s.close()
