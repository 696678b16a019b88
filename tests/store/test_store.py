import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from agent.core.clock import Clock
from agent.core.store import GENESIS_HASH, Binding, Caps, Store, entry_hash


class FixedClock(Clock):
    def __init__(self):
        super().__init__(kernel_synchronised=lambda: False)


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "state", clock=FixedClock())
    yield s
    s.close()


def events(store):
    return [json.loads(r.payload) for r in store.outbox_pending(10_000) if r.kind == "event"]


def test_first_start_is_not_a_reset(store):
    assert store.reset_reason is None
    assert events(store) == []


def test_state_change_evidence_and_event_commit_together(store):
    with store.transaction() as tx:
        tx.put_binding(Binding("8986001", "490154203237518", "2026-01-01T00:00:00Z", "first-use"))
        tx.record("bound", {"iccid": "8986001"})
    assert [b.iccid for b in store.read().bindings()] == ["8986001"]
    assert [e["type"] for e in events(store)] == ["bound"]
    assert [e["type"] for e, _ in store.evidence_entries()] == ["bound"]


def test_failed_transaction_leaves_nothing(store):
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            tx.put_binding(Binding("8986002", "490154203237518", "x", "first-use"))
            tx.record("bound", {})
            raise RuntimeError("crash between write and commit")
    assert store.read().bindings() == []
    assert events(store) == [] and store.evidence_entries() == []


def test_evidence_is_hash_chained(store):
    for i in range(5):
        store.record("sim_inserted", {"n": i})
    prev = GENESIS_HASH
    for entry, digest in store.evidence_entries():
        assert entry["prev"] == prev
        assert entry_hash(entry) == digest
        assert {"wall", "wall_trusted", "mono", "boot_id"} <= entry.keys()
        prev = digest


def test_event_seq_increases_and_ids_are_unique(store):
    for i in range(3):
        store.record("sim_inserted", {"n": i}, evidence=False)
    evs = events(store)
    assert [e["seq"] for e in evs] == [1, 2, 3]
    assert len({e["id"] for e in evs}) == 3
    assert all(e["schema"] == "simagent/event/1" for e in evs)


def test_ack_removes_only_that_row(store):
    for i in range(3):
        store.record("sim_inserted", {"n": i})
    rows = store.outbox_pending(10)
    store.outbox_ack_many([rows[1].position])
    assert [r.position for r in store.outbox_pending(10)] == [rows[0].position, rows[2].position]
    assert store.outbox_pending(10, after_position=rows[0].position)[0].position == rows[2].position


def test_telemetry_dropped_oldest_first_at_its_cap(tmp_path):
    s = Store.open(tmp_path, clock=FixedClock(), caps=Caps(max_events=100, max_telemetry=3))
    for i in range(5):
        with s.transaction() as tx:
            tx.enqueue_telemetry({"n": i}, s.clock.now())
    assert [json.loads(r.payload)["n"] for r in s.outbox_pending(10)] == [2, 3, 4]


def test_event_drop_is_itself_an_event(tmp_path):
    s = Store.open(tmp_path, clock=FixedClock(), caps=Caps(max_events=5, max_telemetry=3))
    for i in range(8):
        s.record("sim_inserted", {"n": i}, evidence=False)
    evs = events(s)
    assert len(evs) <= 5
    assert any(e["type"] == "events_dropped" for e in evs)
    assert evs[-1]["data"] == {"n": 7}
    assert sum(e["data"]["count"] for e in evs if e["type"] == "events_dropped") + sum(
        1 for e in evs if e["type"] == "sim_inserted") == 8


def test_token_ids_are_single_use(store):
    stamp = store.clock.now()
    with store.transaction() as tx:
        assert tx.use_token_id("j1", 1e10, stamp)
        assert not tx.use_token_id("j1", 1e10, stamp)


def test_corrupt_database_is_moved_aside_and_reported(tmp_path):
    Store.open(tmp_path, clock=FixedClock()).close()
    (tmp_path / "state.db").write_bytes(b"this is not a database" * 100)
    for sidecar in ("state.db-wal", "state.db-shm"):
        (tmp_path / sidecar).unlink(missing_ok=True)
    s = Store.open(tmp_path, clock=FixedClock())
    assert s.reset_reason == "database_damaged"
    assert list(tmp_path.glob("state.db.corrupt-*"))
    assert [e["type"] for e in events(s)] == ["state_reset"]
    assert [e["type"] for e, _ in s.evidence_entries()] == ["state_reset"]


def test_missing_database_after_first_start_is_a_reset(tmp_path):
    Store.open(tmp_path, clock=FixedClock()).close()
    for f in tmp_path.glob("state.db*"):
        f.unlink()
    s = Store.open(tmp_path, clock=FixedClock())
    assert s.reset_reason == "database_missing"


def test_newer_schema_is_refused_not_overwritten(tmp_path):
    Store.open(tmp_path, clock=FixedClock()).close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    s = Store.open(tmp_path, clock=FixedClock())
    assert s.reset_reason == "database_damaged"
    (entry, _), = s.evidence_entries()
    assert "newer" in entry["data"]["detail"]
    assert list(tmp_path.glob("state.db.corrupt-*"))


def test_database_file_is_private(store):
    assert os.stat(store.path).st_mode & 0o077 == 0


WRITER = textwrap.dedent("""
    import sys
    from agent.core.store import Store
    s = Store.open(sys.argv[1])
    i = 0
    while True:
        with s.transaction() as tx:
            tx.record("sim_inserted", {"n": i})
        print(i, flush=True)
        i += 1
""")


@pytest.mark.parametrize("after", [5, 50, 200])
def test_kill_9_loses_no_committed_event(tmp_path, after):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    acknowledged = -1
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged >= after:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    s = Store.open(tmp_path)
    numbers = [e["data"]["n"] for e in events(s)]
    assert numbers == list(range(len(numbers)))  # in order, no gap
    assert len(numbers) > acknowledged  # everything reported committed is there
    entries = s.evidence_entries()
    assert all(e["prev"] == p for (e, _), (_, p) in zip(entries[1:], entries))


def test_disk_full_surfaces_as_such_and_leaves_the_store_usable(store):
    conn = store.read()._conn
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        for i in range(10_000):
            store.record("sim_inserted", {"pad": "x" * 500, "n": i})
    entries = store.evidence_entries()
    conn.execute("PRAGMA max_page_count = 1073741823")
    store.record("sim_removed", {})
    assert [e["type"] for e, _ in store.evidence_entries()][-1] == "sim_removed"
    assert len(store.evidence_entries()) == len(entries) + 1


def test_a_read_only_open_of_a_wal_without_its_shm_creates_nothing_and_reads_the_wal(tmp_path):
    """A daemon killed -9 with its WAL not checkpointed, the -shm then removed: SQLite
    would create a -shm beside the database (SPEC §4: read-only commands create nothing;
    as root it left a root-owned file in the simagent user's directory)."""
    state = tmp_path / "state"
    pid = os.fork()
    if pid == 0:
        s = Store.open(state)
        with s.transaction() as tx:
            tx.put_binding(Binding("89860012345678901234", "490154203237518", "2026-01-01T00:00:00Z", "first-use"))
        os._exit(0)
    os.waitpid(pid, 0)
    (state / "state.db-shm").unlink()
    before = sorted((p.name, p.stat().st_size) for p in state.iterdir())
    s = Store.open_read_only(state)
    assert [b.iccid for b in s.read().bindings()] == ["89860012345678901234"]  # the WAL's commit is read
    s.close()
    assert sorted((p.name, p.stat().st_size) for p in state.iterdir()) == before
