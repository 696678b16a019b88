"""Evidence log: durable appends per second through the store (hash chain, one
transaction and one fsync each) against a raw sqlite3 insert+commit loop with the same
WAL / synchronous=FULL settings, measured in the same run; plus bundle verification."""

from __future__ import annotations

import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from agent.core.evidence import export_bundle, load_or_create_device_key, verify_bundle
from agent.core.store import Store

ROUNDS = 8
ROUND_S = 0.3  # raw and store take turns, so disk contention from elsewhere hits both alike
SAMPLE = {"iccid": "89860012345678901234", "imei": "490154203237518", "sim_state": "ready", "status": "ok"}


class _Counter:
    def __init__(self, step) -> None:
        self.step, self.count, self.rates = step, 0, []

    def burst(self) -> None:
        start, done = time.perf_counter(), 0
        while (elapsed := time.perf_counter() - start) < ROUND_S:
            self.step(self.count)
            self.count += 1
            done += 1
        self.rates.append(done / elapsed)

    def median(self) -> float:
        return statistics.median(self.rates)


def _raw_connection(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE evidence (seq INTEGER PRIMARY KEY, entry TEXT NOT NULL, hash TEXT NOT NULL)")
    return conn


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="simagent-bench-") as name:
        directory = Path(name)
        store = Store.open(directory / "store")
        conn = _raw_connection(directory / "raw.db")
        entry, digest = json.dumps(SAMPLE) * 2, "0" * 64  # about the size of a real entry

        def append(n: int) -> None:
            with store.transaction() as tx:
                tx.record("binding_checked", {**SAMPLE, "n": n}, event=False)

        def insert(n: int) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO evidence (seq, entry, hash) VALUES (?, ?, ?)", (n + 1, entry, digest))
            conn.execute("COMMIT")

        appends, raw = _Counter(append), _Counter(insert)
        for _ in range(ROUNDS):
            raw.burst()
            appends.burst()
        conn.close()
        bundle = export_bundle(store, load_or_create_device_key(directory / "store"))
        start = time.perf_counter()
        assert verify_bundle(bundle).ok
        verify_s = time.perf_counter() - start
        store.close()
    return {
        "evidence_appends_per_s": round(appends.median()),
        "evidence_raw_sqlite_commits_per_s": round(raw.median()),
        "evidence_append_ratio_to_raw": round(appends.median() / raw.median(), 3),
        "evidence_verify_entries_per_s": round(len(bundle["entries"]) / verify_s),
    }
