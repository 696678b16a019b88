"""The state store: one SQLite file (WAL) in `state_dir` holding bindings, the evidence
chain, the MQTT outbox, used token ids and small facts (last IMEI, time floor, ...).

Everything that must survive `kill -9` or a power cut goes through `Store.transaction()`:
a state change, the evidence entry that records it and the event that reports it are
committed together or not at all (SPEC §7.1). `synchronous=FULL` makes a commit durable
before it returns.

**The store knows it has lived** (SPEC §4). Lost state must never look like a first start,
so a state directory keeps, beside the database, proof that an agent ran there (the
`.initialised` marker, the device key) and an *anchor*: the sequence number and hash of
the newest evidence entry, rewritten atomically at most once per `ANCHOR_INTERVAL` and at
close. At open the database must contain the anchored entry. A database that is missing,
empty (truncated to nothing, or a new file), damaged, of a newer schema, or rolled back
(an older copy put back, a WAL deleted or truncated) in a directory that has lived is a
*state reset*: the unusable file is moved aside (kept as evidence), a fresh store is
created, its first entry is `state_reset` with what was found, and `reset_pending` is set
so the binding fails closed (no card is bound by itself) until a signed rebind token or a
root `bind reset` says which card belongs here (`agent.core.binding`). A rollback of less than
`ANCHOR_INTERVAL` of history, or the whole state directory deleted with the key, cannot be
told from the inside (the platform sees a new device key then).

**Only damage is damage**: errors that mean the file is not a usable database (SQLite's
CORRUPT and NOTADB codes, a failed integrity check, a schema newer than this agent) are
answered as above. Locks, busy, I/O errors, a full disk or a read-only file raise
`StoreUnavailable` and leave the file alone; the caller retries or reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from agent.core.clock import Clock, Stamp
from agent.core.files import KIB, read_bounded

log = logging.getLogger(__name__)

DB_NAME = "state.db"
# Written next to the database when it is first created: a missing database beside it
# means state was lost, not that this is a first start.
INITIALISED_MARKER = ".initialised"
DEVICE_KEY_NAME = "device_key.pem"  # the device key (agent.core.evidence); its presence proves a start too
ANCHOR_NAME = "evidence.anchor"  # {"seq", "hash"} of the newest anchored evidence entry
ANCHOR_INTERVAL = 1.0  # seconds between anchor rewrites (each costs two fsyncs)
ANCHOR_MAX_BYTES = 4 * KIB  # the agent writes ~150 bytes; anything larger is not its anchor
MAX_SEQ = 2**63 - 1  # an SQLite INTEGER: the largest sequence number an anchor or a meta value can hold
# After a reset, event seq goes on from the anchored one plus this: more than the events
# one ANCHOR_INTERVAL can commit, so a seq the platform has seen is never reused.
EVENT_SEQ_GAP = 100_000
# SQLite's page cache of the store's connection, in KiB. Its default (2,000 KiB) is filled
# by the integrity check at open and by a growing log, and then held for the daemon's
# life: 2 MB of a 30 MB daemon (issue 12). What the daemon touches (the ends of the
# evidence and outbox b-trees, the small tables) fits in far less.
CACHE_KIB = 512
# Files whose presence shows that an agent has run in a state directory.
LIVED_FILES = (INITIALISED_MARKER, ANCHOR_NAME, DEVICE_KEY_NAME)
# Meta key: set with `state_reset`, cleared by a rebind token or `bind reset`; while set,
# no card is bound by itself (SPEC §4, fail closed).
RESET_PENDING_KEY = "reset_pending"
# SQLite primary result codes that mean the file is damaged, not merely unavailable.
_DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
GENESIS_HASH = "0" * 64
# Meta key: the latest wall time (epoch seconds) seen on a trusted stamp; never goes back.
# Token expiry is judged against it while the clock is untrusted (e.g. 1970 after a cold boot).
TIME_FLOOR_KEY = "trusted_time_floor"
EVENT_SEQ_KEY = "event_seq"  # the seq of the newest event queued
LAST_IMEI_KEY = "last_imei"  # the IMEI last read, so the agent can identify itself without a modem
LAST_DECISION_KEY = "last_decision"  # what `bind show` reports; also de-duplicates records
PROVISION_DIGEST_KEY = "provision_file_sha256"  # the provision file content last processed
EVENT_SCHEMA = "simagent/event/1"
TELEMETRY_SCHEMA = "simagent/telemetry/1"

# Each entry migrates the schema from version i to i + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE bindings (
        iccid TEXT PRIMARY KEY,
        imei TEXT NOT NULL,
        since TEXT NOT NULL,
        source TEXT NOT NULL
    );
    CREATE TABLE used_tokens (jti TEXT PRIMARY KEY, used_at TEXT NOT NULL, expires REAL);
    CREATE TABLE evidence (
        seq INTEGER PRIMARY KEY,
        entry TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE TABLE outbox (
        position INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('event', 'telemetry')),
        id TEXT NOT NULL UNIQUE,
        payload TEXT NOT NULL
    );
    CREATE INDEX outbox_kind ON outbox (kind, position);
    """,
)


def canonical_json(value: Any) -> bytes:
    """The byte form that evidence hashes and signatures cover: RFC 8785 (JCS) for the
    values the agent writes (ASCII keys sorted, no whitespace, UTF-8). Integral floats are
    written as integers, as ECMAScript prints them, so verifiers in other languages
    reproduce the same bytes."""
    return json.dumps(_jcs_numbers(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _jcs_numbers(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {key: _jcs_numbers(item) for key, item in value.items()}
    if kind is float:
        return int(value) if value.is_integer() else value
    if kind is list or kind is tuple:
        return [_jcs_numbers(item) for item in value]
    return value


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical_json(entry)).hexdigest()


class StoreError(Exception):
    pass


class StoreDamaged(StoreError):
    """The database file is not usable as it is (damaged, newer schema)."""


class StoreUnavailable(StoreError):
    """The database cannot be used right now (locked, busy, I/O error, disk full,
    read-only); it is left as it is."""


def _is_seq(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_SEQ


def _is_time(value: Any) -> bool:
    """Epoch seconds (a float, or an int as JSON may write one) within any clock's range."""
    return (type(value) is float and math.isfinite(value)) or (type(value) is int and abs(value) <= MAX_SEQ)


# What each fact the agent keeps must be (None: cleared). Anything else was written by
# someone else: the database is damaged, and no such value reaches the binding or the gate.
_META_CHECKS: dict[str, Callable[[Any], bool]] = {
    EVENT_SEQ_KEY: _is_seq,
    TIME_FLOOR_KEY: _is_time,
    RESET_PENDING_KEY: lambda value: value is None or type(value) is dict,
    LAST_IMEI_KEY: lambda value: value is None or type(value) is str,
    LAST_DECISION_KEY: lambda value: value is None or type(value) is dict,
    PROVISION_DIGEST_KEY: lambda value: value is None or type(value) is str,
}


def checked_meta(key: str, text: str) -> Any:
    """The decoded value of the fact `key`; raises StoreDamaged when it is not JSON or not
    of its kind."""
    try:
        value = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        raise StoreDamaged(f"the stored fact {key!r} is not JSON") from None
    if not _META_CHECKS.get(key, lambda _: True)(value):
        raise StoreDamaged(f"the stored fact {key!r} is not of its kind")
    return value


def _meta_problem(conn: sqlite3.Connection) -> str | None:
    """Why a stored fact is unusable (None when all are usable)."""
    for key, text in conn.execute("SELECT key, value FROM meta"):
        try:
            checked_meta(key, text)
        except StoreDamaged as exc:
            return str(exc)
    return None


@dataclass(frozen=True)
class Binding:
    iccid: str
    imei: str
    since: str
    source: str  # "first-use", "token", "provision-file", "observe"


@dataclass(frozen=True)
class OutboxRow:
    position: int
    kind: str
    id: str
    payload: str  # the JSON message, exactly as it is published


@dataclass(frozen=True)
class Caps:
    max_events: int = 100_000
    max_telemetry: int = 10_000


class Transaction:
    """What may be done inside one atomic, durable change of state."""

    def __init__(self, conn: sqlite3.Connection, store: "Store") -> None:
        self._conn = conn
        self._store = store
        self.enqueued = False  # something was added to the outbox
        self.appended = False  # something was added to the evidence chain
        self.recorded: list[tuple[str, dict]] = []  # (type, data) of each record, for the listener

    # -- facts -------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        """The value of a fact; raises StoreDamaged when it is not one the agent wrote."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else checked_meta(key, row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self._conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    def now(self) -> Stamp:
        """A stamp from the store's clock; a trusted one raises the time floor."""
        stamp = self._store.clock.now()
        self.raise_time_floor(stamp)
        return stamp

    def time_floor(self) -> float | None:
        return self.get_meta(TIME_FLOOR_KEY)

    def raise_time_floor(self, stamp: Stamp) -> None:
        """Remembers a wall time two sources agreed on; an earlier one never lowers the
        floor, and time from one source alone (a forged network time) never raises it."""
        if stamp.trusted and stamp.agreed:
            self._conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
                " WHERE CAST(meta.value AS REAL) < CAST(excluded.value AS REAL)",
                (TIME_FLOOR_KEY, json.dumps(stamp.wall)),
            )

    # -- bindings ----------------------------------------------------------------
    def bindings(self) -> list[Binding]:
        return [Binding(*row) for row in self._conn.execute("SELECT iccid, imei, since, source FROM bindings ORDER BY since")]

    def put_binding(self, binding: Binding) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO bindings (iccid, imei, since, source) VALUES (?, ?, ?, ?)",
            (binding.iccid, binding.imei, binding.since, binding.source),
        )

    def delete_binding(self, iccid: str) -> bool:
        return self._conn.execute("DELETE FROM bindings WHERE iccid = ?", (iccid,)).rowcount > 0

    def delete_all_bindings(self) -> int:
        return self._conn.execute("DELETE FROM bindings").rowcount

    # -- tokens ------------------------------------------------------------------
    def use_token_id(self, jti: str, expires: float | None, stamp: Stamp) -> bool:
        """Marks a token id as used; False when it was used before (a replay)."""
        cursor = self._conn.execute(
            "INSERT OR IGNORE INTO used_tokens (jti, used_at, expires) VALUES (?, ?, ?)",
            (jti, stamp.iso(), expires),
        )
        return cursor.rowcount == 1

    # -- evidence and events -----------------------------------------------------
    def record(self, type_: str, data: dict, *, event: bool = True, evidence: bool = True) -> Stamp:
        """Appends an evidence entry and/or queues an event, stamped now."""
        stamp = self.now()
        self.recorded.append((type_, data))
        if evidence:
            self.append_evidence(type_, data, stamp)
        if event:
            self.enqueue_event(type_, data, stamp)
        return stamp

    def append_evidence(self, type_: str, data: dict, stamp: Stamp) -> dict:
        last = self._conn.execute("SELECT seq, hash FROM evidence ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
        entry = {
            "seq": seq,
            "prev": prev,
            "type": type_,
            "data": data,
            "wall": stamp.iso(),
            "wall_trusted": stamp.trusted,
            "mono": round(stamp.mono, 6),
            "boot_id": stamp.boot_id,
        }
        text = canonical_json(entry)
        self.appended = True
        self._conn.execute(
            "INSERT INTO evidence (seq, entry, hash) VALUES (?, ?, ?)",
            (seq, text.decode(), hashlib.sha256(text).hexdigest()),  # = entry_hash(entry)
        )
        return entry

    def enqueue_event(self, type_: str, data: dict, stamp: Stamp) -> dict:
        caps = self._store.caps
        if self._position_span("event") >= caps.max_events and (queued := self._count("event")) >= caps.max_events:
            # Make room for the new event and for the event that reports the drop.
            removed = self._drop_oldest("event", queued - caps.max_events + 2)
            # A dropped drop notice carries its count into the new one, so the counts
            # plus the events still queued always add up to every event ever queued.
            lost = sum(
                message["data"]["count"] if message["type"] == "events_dropped" else 1
                for message in map(json.loads, removed)
            )
            self._insert_event("events_dropped", {"count": lost, "reason": "outbox full"}, stamp)
        return self._insert_event(type_, data, stamp)

    def enqueue_telemetry(self, sample: dict, stamp: Stamp) -> dict:
        message = {"schema": TELEMETRY_SCHEMA, "id": str(uuid.uuid4()), "ts": stamp.iso(), "time_trusted": stamp.trusted, **sample}
        self.enqueued = True
        self._conn.execute(
            "INSERT INTO outbox (kind, id, payload) VALUES ('telemetry', ?, ?)",
            (message["id"], json.dumps(message, separators=(",", ":"))),
        )
        cap = self._store.caps.max_telemetry
        if self._position_span("telemetry") > cap and (excess := self._count("telemetry") - cap) > 0:
            self._drop_oldest("telemetry", excess)
        return message

    def _insert_event(self, type_: str, data: dict, stamp: Stamp) -> dict:
        seq = self.get_meta(EVENT_SEQ_KEY, 0) + 1
        self.set_meta(EVENT_SEQ_KEY, seq)
        message = {
            "schema": EVENT_SCHEMA,
            "id": str(uuid.uuid4()),
            "seq": seq,
            "type": type_,
            "ts": stamp.iso(),
            "time_trusted": stamp.trusted,
            "uptime_s": round(stamp.mono, 3),
            "data": data,
        }
        self.enqueued = True
        self._conn.execute(
            "INSERT INTO outbox (kind, id, payload) VALUES ('event', ?, ?)",
            (message["id"], json.dumps(message, separators=(",", ":"))),
        )
        return message

    def _position_span(self, kind: str) -> int:
        """An upper bound of the rows of a kind, from two index seeks: counting them
        scans the index, which an enqueue cannot afford on every commit."""
        first, last = self._conn.execute(
            "SELECT (SELECT position FROM outbox WHERE kind = ?1 ORDER BY position LIMIT 1),"
            " (SELECT position FROM outbox WHERE kind = ?1 ORDER BY position DESC LIMIT 1)",
            (kind,),
        ).fetchone()
        return 0 if first is None else last - first + 1

    def _count(self, kind: str) -> int:
        return self._conn.execute("SELECT count(*) FROM outbox WHERE kind = ?", (kind,)).fetchone()[0]

    def _drop_oldest(self, kind: str, count: int) -> list[str]:
        """Deletes the oldest `count` rows of a kind and returns their payloads."""
        rows = self._conn.execute(
            "DELETE FROM outbox WHERE position IN (SELECT position FROM outbox WHERE kind = ? ORDER BY position LIMIT ?)"
            " RETURNING payload",
            (kind, count),
        ).fetchall()
        return [payload for (payload,) in rows]


class Store:
    """Thread-safe: the daemon's loop and the MQTT thread may both use it. Calls are
    short; nothing holds the lock across network I/O."""

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Clock, caps: Caps) -> None:
        self._conn = conn
        self._lock = threading.RLock()
        self.path = path
        self.clock = clock
        self.caps = caps
        # Why the previous state could not be used, when it could not (else None).
        self.reset_reason: str | None = None
        self._anchored_at = float("-inf")
        self._closed = False
        self.read_only = False
        # Called (from the committing thread) after a commit that added to the outbox,
        # so the reporter sends at once; it must be cheap and must not raise.
        self.outbox_listener: Callable[[], None] | None = None
        # Called after a commit with each record it made, (type, data): the daemon's log
        # line per event (journald); it must be cheap and must not raise.
        self.record_listener: Callable[[str, dict], None] | None = None

    @classmethod
    def open(cls, state_dir: str | os.PathLike, *, clock: Clock | None = None, caps: Caps = Caps(),
             busy_timeout: float = 10.0) -> "Store":
        """Opens (or creates) the store; a lost state is recorded as `state_reset` (see the
        module docstring). Raises StoreUnavailable when the file cannot be used now."""
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = state_dir / DB_NAME
        lived = any((state_dir / name).exists() for name in LIVED_FILES)
        clock = clock or Clock()
        found: dict[str, Any] | None = None
        existed = path.exists()
        try:
            conn, empty = _connect(path, busy_timeout)
        except StoreDamaged as exc:
            found = {"reason": "database_damaged", "detail": str(exc), "moved_to": _move_aside(path).name}
            conn, empty = _connect(path, busy_timeout)
        if found is None and lived and (not existed or empty):
            found = {"reason": "database_missing" if not existed else "database_empty"}
        if found is None and lived:
            problem = _anchor_problem(conn, state_dir / ANCHOR_NAME)
            if problem is not None:
                conn.close()
                found = {"reason": "database_rolled_back", "detail": problem, "moved_to": _move_aside(path).name}
                conn, _ = _connect(path, busy_timeout)
        (state_dir / INITIALISED_MARKER).touch(exist_ok=True)
        store = cls(conn, path, clock, caps)
        store._repair_time_floor()
        if found is not None:
            store.reset_reason = found["reason"]
            log.error("state reset: %s", found)
            with store.transaction() as tx:
                with contextlib.suppress(ValueError):  # an unusable anchor is what `found` says
                    anchored_seq = (_read_anchor(state_dir / ANCHOR_NAME) or {}).get("event_seq", 0)
                    if 0 < anchored_seq <= MAX_SEQ // 2:  # beyond: no agent's count (2**62 events)
                        tx.set_meta(EVENT_SEQ_KEY, anchored_seq + EVENT_SEQ_GAP)
                tx.record("state_reset", found)
                tx.set_meta(RESET_PENDING_KEY, {**found, "at": tx.now().iso()})
            store.write_anchor()
        return store

    def _repair_time_floor(self) -> None:
        """A floor an earlier version ratcheted on one forged network time is put back
        by the rule that guards it now (`Clock.floor_repair`), and the repair recorded."""
        floor = self.read().time_floor()
        repaired = self.clock.floor_repair(floor)
        if repaired is None:
            return
        with self.transaction() as tx:
            tx.set_meta(TIME_FLOOR_KEY, repaired)
            tx.record("time_floor_repaired", {"was": floor, "now": repaired}, event=False)

    @classmethod
    def open_read_only(cls, state_dir: str | os.PathLike, *, clock: Clock | None = None) -> "Store":
        """The store for a command that only reads: nothing is created, migrated, moved,
        recorded or anchored. Raises StoreDamaged when the database is missing, damaged,
        of another schema or not the one the anchor saw (the daemon will record the
        reset), StoreUnavailable when it cannot be read now."""
        state_dir = Path(state_dir)
        path = state_dir / DB_NAME
        if not path.exists():
            lived = any((state_dir / name).exists() for name in LIVED_FILES)
            raise StoreDamaged(f"{path}: the state database is missing" + (" (state lost)" if lived else ""))
        try:
            conn = connect_read_only(path)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise _classified(exc, path) from exc
        problem = None if version == len(MIGRATIONS) else f"schema version {version}, this agent reads {len(MIGRATIONS)}"
        problem = problem or _meta_problem(conn) or _anchor_problem(conn, state_dir / ANCHOR_NAME)
        if problem is not None:
            conn.close()
            raise StoreDamaged(f"{path}: {problem}")
        store = cls(conn, path, clock or Clock(), Caps())
        store.read_only = True
        return store

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        if self.read_only:
            raise StoreError("a read-only store cannot change")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            tx = Transaction(self._conn, self)
            try:
                yield tx
                self._conn.execute("COMMIT")
            except BaseException:
                # SQLite has already rolled back after some errors (SQLITE_FULL): a second
                # ROLLBACK would raise and hide the error that matters.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        if tx.appended and self._anchor_due():
            self.write_anchor()
        if tx.enqueued and self.outbox_listener is not None:
            self.outbox_listener()
        if self.record_listener is not None:
            for type_, data in tx.recorded:
                self.record_listener(type_, data)

    def record(self, type_: str, data: dict, **kwargs) -> Stamp:
        with self.transaction() as tx:
            return tx.record(type_, data, **kwargs)

    def read(self) -> Transaction:
        """For reads outside a transaction (each statement sees committed state)."""
        return Transaction(self._conn, self)

    # -- outbox, for the reporter ------------------------------------------------
    def outbox_pending(self, limit: int, after_position: int = 0) -> list[OutboxRow]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT position, kind, id, payload FROM outbox WHERE position > ? ORDER BY position LIMIT ?",
                (after_position, limit),
            ).fetchall()
        return [OutboxRow(*row) for row in rows]

    def outbox_ack_many(self, positions: Iterable[int]) -> None:
        """Deletes acknowledged rows in one commit (one fsync for a whole batch)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany("DELETE FROM outbox WHERE position = ?", ((p,) for p in positions))
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # a failed COMMIT (disk full) may leave it open
                    self._conn.execute("ROLLBACK")
                raise

    def outbox_depth(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT kind, count(*) FROM outbox GROUP BY kind").fetchall()
        depth = {"event": 0, "telemetry": 0}
        depth.update(dict(rows))
        return depth

    # -- evidence, for export -----------------------------------------------------
    def evidence_entries(self, since_seq: int = 0) -> list[tuple[dict, str]]:
        with self._lock:
            rows = self._conn.execute("SELECT entry, hash FROM evidence WHERE seq > ? ORDER BY seq", (since_seq,)).fetchall()
        return [(json.loads(entry), digest) for entry, digest in rows]

    def evidence_tail(self, count: int) -> list[dict]:
        """The newest ``count`` evidence entries, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT entry FROM evidence ORDER BY seq DESC LIMIT ?", (count,)).fetchall()
        return [json.loads(entry) for (entry,) in reversed(rows)]

    # -- the anchor -----------------------------------------------------------------
    def _anchor_due(self) -> bool:
        return time.monotonic() - self._anchored_at >= ANCHOR_INTERVAL

    def write_anchor(self) -> None:
        """Records the newest evidence entry beside the database (atomically). A failure
        (disk full) is logged: the next write tries again."""
        with self._lock:
            head = self._conn.execute("SELECT seq, hash FROM evidence ORDER BY seq DESC LIMIT 1").fetchone()
            event_seq = self.read().get_meta(EVENT_SEQ_KEY, 0)
            self._anchored_at = time.monotonic()
            if head is None:
                return
            anchor = {"seq": head[0], "hash": head[1], "event_seq": event_seq}
            try:
                write_atomically(self.path.with_name(ANCHOR_NAME), json.dumps(anchor).encode())
            except OSError as exc:
                log.error("evidence anchor not written: %s", exc)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if not self.read_only:
                    self.write_anchor()
                self._conn.close()


def connect_read_only(path: str | os.PathLike) -> sqlite3.Connection:
    """The state database at `path` opened read-only, for readers that must never create,
    migrate or repair it (diag, evidence exports, `bind show`). Transactions are explicit;
    one connection per thread (never the daemon's). Without a WAL beside it the file holds
    everything: it is read as immutable, which creates no -wal/-shm files. With a WAL and
    its -shm (a daemon runs, or ran), SQLite reads both in place. With a WAL but no -shm
    (a daemon killed, the -shm removed), SQLite would create the -shm beside the database
    (as root: a root-owned file in the agent's directory), so a private copy of both is
    read instead; it is deleted when the connection closes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no state database at {path}")
    wal = path.with_name(path.name + "-wal")
    if not wal.exists():
        return _connect_read_only(path, immutable=True)
    if path.with_name(path.name + "-shm").exists():
        return _connect_read_only(path, immutable=False)
    copy = Path(tempfile.mkdtemp(prefix="simagent-read-"))
    try:
        shutil.copyfile(path, copy / path.name)
        shutil.copyfile(wal, copy / wal.name)
        return _connect_read_only(copy / path.name, immutable=False, private_copy=copy)
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise


class _PrivateCopyConnection(sqlite3.Connection):
    """A connection to a private copy of the database, deleted at close."""

    private_copy: Path | None = None

    def close(self) -> None:
        super().close()
        if self.private_copy is not None:
            shutil.rmtree(self.private_copy, ignore_errors=True)


def _connect_read_only(path: Path, *, immutable: bool, private_copy: Path | None = None) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro{'&immutable=1' if immutable else ''}", uri=True,
                           timeout=10, isolation_level=None, check_same_thread=False, factory=_PrivateCopyConnection)
    conn.private_copy = private_copy
    return conn


def _connect(path: Path, busy_timeout: float) -> tuple[sqlite3.Connection, bool]:
    """The database, checked and migrated, and whether it held no schema (new or emptied).
    Raises StoreDamaged or StoreUnavailable."""
    try:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
    except sqlite3.Error as exc:
        raise _classified(exc, path) from exc
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise StoreDamaged(f"integrity check: {check}")
        empty = conn.execute("PRAGMA user_version").fetchone()[0] == 0
        _migrate(conn)
        if problem := _meta_problem(conn):
            raise StoreDamaged(problem)
        os.chmod(path, 0o600)
    except sqlite3.Error as exc:
        conn.close()
        raise _classified(exc, path) from exc
    except BaseException:
        conn.close()
        raise
    return conn, empty


def _classified(exc: sqlite3.Error, path: Path) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _DAMAGE_CODES:
        return StoreDamaged(str(exc))
    return StoreUnavailable(f"{path}: {exc}")


def _read_anchor(anchor_path: Path) -> dict | None:
    """The anchor's content, checked (None when there is none). Raises ValueError naming
    why it is unusable: the file is hostile input like any other (an edited anchor must
    fail closed, not stop the start before the radio is gated)."""
    try:
        anchor = json.loads(read_bounded(anchor_path, ANCHOR_MAX_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"the evidence anchor is unreadable ({exc.__class__.__name__}: {exc})"[:300]) from None
    if not (type(anchor) is dict and _is_seq(anchor.get("seq")) and _is_entry_hash(anchor.get("hash"))
            and _is_seq(anchor.get("event_seq", 0))):
        raise ValueError("the evidence anchor is unreadable (not the agent's {seq, hash, event_seq})")
    return anchor


def _is_entry_hash(value: Any) -> bool:
    return type(value) is str and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _anchor_problem(conn: sqlite3.Connection, anchor_path: Path) -> str | None:
    """Why the database is not the one the anchor saw (None when it is, or no anchor)."""
    try:
        anchor = _read_anchor(anchor_path)
    except ValueError as exc:
        return str(exc)
    if anchor is None:
        return None
    seq = anchor["seq"]
    top = conn.execute("SELECT coalesce(max(seq), 0) FROM evidence").fetchone()[0]
    row = conn.execute("SELECT hash FROM evidence WHERE seq = ?", (seq,)).fetchone()
    if row is None:
        return f"the evidence chain ends at entry {top}, the anchor saw entry {seq}"
    if row[0] != anchor["hash"]:
        return f"evidence entry {seq} is not the one the anchor saw"
    return None


def write_atomically(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` so that a crash leaves the old or the new file, never half."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreDamaged(f"schema version {version} is newer than this agent knows ({len(MIGRATIONS)})")
    for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    path.rename(aside)
    for suffix in ("-wal", "-shm"):
        sidecar = path.with_name(path.name + suffix)
        if sidecar.exists():
            sidecar.rename(aside.with_name(aside.name + suffix))
    return aside
