"""Evidence bundles: the hash-chained evidence log, exported and signed with the device
key, and checked by anyone with the device's public key (SPEC §5, clause 5.12).

Bundle (JSON object, schema "simagent/evidence-bundle/1"):
    schema, device_id, device_pubkey (base64 of the raw 32-byte Ed25519 key),
    exported_at (ISO-8601 UTC), exported_at_trusted (bool),
    first_seq (seq of entries[0]; entries[i].seq == first_seq + i),
    entries (the evidence entries, objects), hashes (hex SHA-256 of each entry),
    head (hash of the last entry; with no entries, the prev of what would come next),
    signature (base64 Ed25519 signature over canonical JSON of the bundle without it).
Canonical JSON: RFC 8785 (JCS) - keys sorted, no whitespace, UTF-8, integers plain.
An entry's hash is SHA-256 of its canonical JSON; entry["prev"] is the previous entry's
hash, "0" * 64 for seq 1.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import io
import json
import mmap
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from agent.core.files import KIB, MIB, read_bounded
from agent.core.store import DEVICE_KEY_NAME, GENESIS_HASH, Store, canonical_json, connect_read_only, entry_hash

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# cryptography is imported where a key is used, not here: its native module (with PyJWT,
# about 9 MB) would be more than a quarter of the idle daemon's memory. The daemon never
# imports it: the device key is created (first start), exports signed and token signatures
# checked in helper processes (agent.service.offload); public keys are read and named by
# `public_key_bytes` (plain Python), and the public key it publishes comes from
# DEVICE_PUBKEY_NAME.

BUNDLE_SCHEMA = "simagent/evidence-bundle/1"
DEVICE_PUBKEY_NAME = "device_key.pub"  # base64 raw public key, written with the key


PAGE_ROWS = 500  # evidence rows read from SQLite at a time by an export
COPY_CHUNK = 1 << 20
KEY_FILE_MAX_BYTES = 4 * KIB  # an Ed25519 PEM is ~120 bytes, its public half 45
# What `evidence verify` reads: it holds the whole bundle in memory (~10x its size as
# objects). ~800,000 entries; a longer log is exported and verified in parts (--since).
BUNDLE_MAX_BYTES = 256 * MIB


class EvidenceError(Exception):
    pass


# -- keys ---------------------------------------------------------------------------


def load_or_create_device_key(state_dir: str | os.PathLike) -> Ed25519PrivateKey:
    """The device's signing key, created on first start (0600). Two processes starting
    together get the same key: the new key is written to a private temporary file and
    linked into place, which fails when another process got there first."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    state_dir = Path(state_dir)
    path = state_dir / DEVICE_KEY_NAME
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        temporary = state_dir / f".{DEVICE_KEY_NAME}.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass
        finally:
            temporary.unlink(missing_ok=True)
        _fsync_dir(state_dir)
    key = load_device_key(state_dir)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    _write_public_key(state_dir, device_public_key_b64(key))
    return key


def load_device_key(state_dir: str | os.PathLike) -> Ed25519PrivateKey:
    """The device's signing key as it is: nothing is created, repaired or rewritten (an
    export signs with it and is a read)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(state_dir) / DEVICE_KEY_NAME
    try:
        key = serialization.load_pem_private_key(read_bounded(path, KEY_FILE_MAX_BYTES), password=None)
    except FileNotFoundError:
        raise EvidenceError(f"{path}: no device key (the daemon creates it on first start)") from None
    except OSError as exc:
        raise EvidenceError(f"{path}: cannot read the device key: {exc.strerror}") from None
    except ValueError as exc:
        raise EvidenceError(f"{path}: not a usable private key ({exc}); move it aside to create a new one") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise EvidenceError(f"{path}: not an Ed25519 key")
    return key


def device_public_key(state_dir: str | os.PathLike) -> str:
    """The device public key (base64) for the state document, without loading the
    private key (nor cryptography) when it was written before."""
    try:
        return published_public_key(state_dir)
    except FileNotFoundError:
        return device_public_key_b64(load_or_create_device_key(state_dir))


def published_public_key(state_dir: str | os.PathLike) -> str:
    """The public key written beside the device key, as it is; OSError when it cannot be
    read (a FIFO or a device there is refused unread)."""
    return read_bounded(Path(state_dir) / DEVICE_PUBKEY_NAME, KEY_FILE_MAX_BYTES).decode("ascii", "replace").strip()


def _write_public_key(state_dir: Path, text: str) -> None:
    """Keeps DEVICE_PUBKEY_NAME equal to the private key's public half (rewritten when
    it differs, so an edited file is repaired the next time the key is used)."""
    path = state_dir / DEVICE_PUBKEY_NAME
    with contextlib.suppress(OSError):  # missing or unreadable: replaced below
        if published_public_key(state_dir) == text:
            return
    temporary = state_dir / f".{DEVICE_PUBKEY_NAME}.{os.getpid()}.tmp"
    temporary.write_text(text + "\n")
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)

def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_b64(key: Ed25519PublicKey) -> str:
    return base64.b64encode(raw_public_key(key)).decode()


def device_public_key_b64(key: Ed25519PrivateKey) -> str:
    """The device public key as published in the state document."""
    return public_key_b64(key.public_key())


# An Ed25519 public key in DER SubjectPublicKeyInfo form is this prefix and the 32 raw
# key bytes: SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING } (RFC 8410 §4; DER has
# one encoding, so anything else is not an Ed25519 key).
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_BEGIN, _PEM_END = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"


def public_key_bytes(text: str) -> bytes:
    """The raw 32 bytes of an Ed25519 public key given as PEM (SubjectPublicKeyInfo), or as
    base64 of the raw 32 bytes or of the DER SubjectPublicKeyInfo. The one parser:
    configuration (`trusted_keys`), tokens and evidence verification all use it. Plain
    Python, so the daemon checks its configuration and names keys without cryptography
    (any 32 bytes are a key to Ed25519PublicKey.from_public_bytes as well)."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        lines = [line.strip() for line in text.splitlines()]
        if lines[0] != _PEM_BEGIN or lines[-1] != _PEM_END:
            raise ValueError(f"not a PEM public key: expected {_PEM_BEGIN} ... {_PEM_END}")
        try:
            der = base64.b64decode("".join(lines[1:-1]), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"not a PEM public key: {exc}") from None
        if not _is_ed25519_spki(der):
            raise ValueError("PEM key is not Ed25519")
        return der[len(_ED25519_SPKI_PREFIX):]
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError("neither PEM nor base64") from exc
    if len(raw) == 32:
        return raw
    if _is_ed25519_spki(raw):
        return raw[len(_ED25519_SPKI_PREFIX):]
    raise ValueError(f"base64 key is {len(raw)} bytes: neither a raw Ed25519 key (32) nor an Ed25519 DER "
                     "SubjectPublicKeyInfo")


def _is_ed25519_spki(der: bytes) -> bool:
    return len(der) == len(_ED25519_SPKI_PREFIX) + 32 and der.startswith(_ED25519_SPKI_PREFIX)


def parse_public_key(text: str) -> Ed25519PublicKey:
    """`public_key_bytes` as a key object, for checking a signature."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(public_key_bytes(text))


# -- export -------------------------------------------------------------------------


def parse_since(text: str) -> int | dt.datetime:
    """`--since`: a decimal number is an entry seq (that entry and all later ones); anything
    else must be an ISO-8601 time (naive means UTC)."""
    shown = text if len(text) <= 40 else text[:40] + "..."
    if text.isascii() and text.isdigit():
        if len(text) > 18:  # beyond any entry number (SQLite integers are 64-bit)
            raise ValueError(f"--since: entry number too large: {shown!r}")
        return int(text)
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since: expected an entry number or an ISO-8601 time, got {shown!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def export_bundle(store: Store, key: Ed25519PrivateKey, since: int | dt.datetime | None = None,
                  device_id: str | None = None) -> dict:
    """A signed bundle of the evidence from `since` on (see `write_bundle`), as an object;
    for callers that want one in memory (tests, small tools). The daemon streams instead."""
    stamp = store.clock.now()
    buffer = io.BytesIO()
    with contextlib.closing(connect_read_only(store.path)) as conn:
        write_bundle(conn, key, buffer, since=since, device_id=device_id,
                     exported_at=stamp.iso(), exported_at_trusted=stamp.trusted)
    return json.loads(buffer.getvalue())


class BundleTooLarge(EvidenceError):
    def __init__(self, size: int, limit: int, entries: int) -> None:
        super().__init__(f"the bundle would be {size} bytes ({entries} entries), over the {limit} bytes this "
                         "channel carries: ask for fewer entries with since")
        self.size, self.limit, self.entries = size, limit, entries


_SIGNATURE_OPEN = b',"signature":"'
_SIGNATURE_CLOSE = b'"}'
SIGNATURE_B64_LEN = 88  # an Ed25519 signature is 64 bytes


def write_bundle(conn: sqlite3.Connection, key: Ed25519PrivateKey, out: BinaryIO, *,
                 since: int | dt.datetime | None = None, device_id: str | None = None,
                 exported_at: str, exported_at_trusted: bool, max_bytes: int | None = None) -> int:
    """Writes the signed bundle of the evidence from `since` on to `out` and returns its
    number of entries. `since` is a seq (inclusive), or a time: then the bundle starts at
    the first entry stamped at or after it and includes everything later, so entries
    stamped by a wrong (untrusted) clock inside the range are kept and the chain stays
    contiguous.

    What is written is the canonical JSON of the whole bundle, "signature" (the last key
    in sort order) included, on one line. Memory stays flat however long the log is:
    entries are read PAGE_ROWS at a time inside one read transaction of `conn` (one
    consistent snapshot, never a write lock), and the text the signature covers is built
    in an unnamed temporary file, signed through mmap (Ed25519 hashes the whole message
    twice, so it cannot be fed in pieces) and then copied to `out`. A bundle longer than
    `max_bytes` raises BundleTooLarge before anything is written."""
    with tempfile.TemporaryFile() as message, tempfile.TemporaryFile() as hashes:
        message.write(b'{"device_id":' + canonical_json(device_id)
                      + b',"device_pubkey":' + canonical_json(device_public_key_b64(key)) + b',"entries":[')
        conn.execute("BEGIN")
        try:
            count, first_seq, head = 0, 1, GENESIS_HASH
            for entry, digest in _evidence_from(conn, since):
                if count:
                    message.write(b",")
                    hashes.write(b",")
                else:
                    first_seq = entry["seq"]
                message.write(canonical_json(entry))
                hashes.write(b'"' + digest.encode() + b'"')
                head = digest
                count += 1
            if not count:  # nothing to export: anchor on the newest entry, if any
                newest = conn.execute("SELECT seq, hash FROM evidence ORDER BY seq DESC LIMIT 1").fetchone()
                if newest:
                    first_seq, head = newest[0] + 1, newest[1]
        finally:
            conn.execute("ROLLBACK")
        message.write(b'],"exported_at":' + canonical_json(exported_at)
                      + b',"exported_at_trusted":' + canonical_json(exported_at_trusted)
                      + b',"first_seq":' + canonical_json(first_seq) + b',"hashes":[')
        hashes.seek(0)
        shutil.copyfileobj(hashes, message)
        message.write(b'],"head":' + canonical_json(head) + b',"schema":' + canonical_json(BUNDLE_SCHEMA) + b"}")
        message.flush()
        unsigned = message.tell()
        size = unsigned - 1 + len(_SIGNATURE_OPEN) + SIGNATURE_B64_LEN + len(_SIGNATURE_CLOSE)
        if max_bytes is not None and size > max_bytes:
            raise BundleTooLarge(size, max_bytes, count)
        with mmap.mmap(message.fileno(), 0, access=mmap.ACCESS_READ) as view:
            try:
                signature = base64.b64encode(key.sign(view))
            except TypeError:  # cryptography 38 (Debian 12) signs bytes only: one copy
                signature = base64.b64encode(key.sign(view[:]))
        message.seek(0)
        remaining = unsigned - 1  # the closing brace comes after the signature
        while remaining:
            chunk = message.read(min(remaining, COPY_CHUNK))
            out.write(chunk)
            remaining -= len(chunk)
        out.write(_SIGNATURE_OPEN + signature + _SIGNATURE_CLOSE)
    return count


def _evidence_from(conn: sqlite3.Connection, since: int | dt.datetime | None) -> Iterator[tuple[dict, str]]:
    """(entry, hash) from `since` on, in seq order, read a page at a time."""
    after = since - 1 if isinstance(since, int) and since > 0 else 0
    waiting_for_time = since if isinstance(since, dt.datetime) else None
    while True:
        rows = conn.execute("SELECT seq, entry, hash FROM evidence WHERE seq > ? ORDER BY seq LIMIT ?",
                            (after, PAGE_ROWS)).fetchall()
        if not rows:
            return
        for seq, text, digest in rows:
            try:
                entry = json.loads(text)
            except (ValueError, RecursionError):
                entry = None
            if type(entry) is not dict or not isinstance(entry.get("wall"), str):
                raise EvidenceError(f"evidence entry {seq} is not an entry the agent wrote (edited in the database?)")
            if waiting_for_time is not None:
                if _parse_wall(entry["wall"]) < waiting_for_time:
                    continue
                waiting_for_time = None
            yield entry, digest
        after = rows[-1][0]


def _parse_wall(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- verification -------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    first_bad_seq: int | None = None  # the entry that breaks, when one does
    reason: str = ""
    entries: int = 0
    key_source: str = ""  # "given" or "bundle": which key the signature was checked with

    def describe(self) -> str:
        if self.ok:
            trust = "" if self.key_source == "given" else " (checked with the key inside the bundle; pass --pubkey to check it is this device's)"
            return f"OK: {self.entries} entries, chain intact, signature valid{trust}"
        where = f" at entry {self.first_bad_seq}" if self.first_bad_seq is not None else ""
        return f"BROKEN{where}: {self.reason}"


def verify_bundle(bundle: Any, pubkey: Ed25519PublicKey | str | None = None) -> VerifyResult:
    """Checks every entry's hash, the prev links, seq continuity, the head and the
    signature; names the first entry that breaks."""
    shape = _shape_problem(bundle)
    if shape:
        return VerifyResult(False, None, f"malformed bundle: {shape}")
    entries, hashes = bundle["entries"], bundle["hashes"]
    chain = _chain_problem(bundle["first_seq"], entries, hashes, bundle["head"])
    if chain:
        return VerifyResult(False, chain[0], chain[1], len(entries))
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key_source = "given" if pubkey is not None else "bundle"
    try:
        key = pubkey if isinstance(pubkey, Ed25519PublicKey) else parse_public_key(pubkey or bundle["device_pubkey"])
    except ValueError as exc:
        return VerifyResult(False, None, f"{key_source} public key unusable: {exc}", len(entries))
    try:
        signature = base64.b64decode(bundle["signature"], validate=True)
        unsigned = {k: v for k, v in bundle.items() if k != "signature"}
        key.verify(signature, canonical_json(unsigned))
    except (binascii.Error, InvalidSignature):
        return VerifyResult(False, None, f"signature does not verify with the {key_source} key", len(entries), key_source)
    return VerifyResult(True, None, "", len(entries), key_source)


def _shape_problem(bundle: Any) -> str | None:
    if not isinstance(bundle, dict):
        return "not a JSON object"
    if bundle.get("schema") != BUNDLE_SCHEMA:
        return f"schema is {bundle.get('schema')!r}, expected {BUNDLE_SCHEMA!r}"
    expected = {"first_seq": int, "entries": list, "hashes": list, "head": str, "signature": str, "device_pubkey": str}
    for name, kind in expected.items():
        if not isinstance(bundle.get(name), kind) or isinstance(bundle.get(name), bool):
            return f"{name} missing or not a {kind.__name__}"
    if bundle["first_seq"] < 1:
        return "first_seq must be >= 1"
    if len(bundle["entries"]) != len(bundle["hashes"]):
        return f"{len(bundle['entries'])} entries but {len(bundle['hashes'])} hashes"
    return None


def _chain_problem(first_seq: int, entries: list, hashes: list, head: str) -> tuple[int | None, str] | None:
    previous_hash = GENESIS_HASH if first_seq == 1 else None  # a partial export anchors on its first prev
    for position, (entry, digest) in enumerate(zip(entries, hashes)):
        expected_seq = first_seq + position
        if not isinstance(entry, dict) or entry.get("seq") != expected_seq:
            found = entry.get("seq") if isinstance(entry, dict) else None
            return expected_seq, f"entry {expected_seq} missing or out of order (found seq {found} in its place)"
        if entry_hash(entry) != digest:
            return expected_seq, f"entry {expected_seq} does not match its recorded hash (content altered)"
        if previous_hash is not None and entry.get("prev") != previous_hash:
            if position == 0:
                return expected_seq, f"entry {expected_seq} is the first entry but its prev is not the genesis hash"
            return expected_seq - 1, (
                f"entry {expected_seq - 1} does not match the hash entry {expected_seq} links to (entry {expected_seq - 1} altered)"
            )
        previous_hash = digest
    if entries and head != hashes[-1]:
        return first_seq + len(entries) - 1, "head does not match the hash of the last entry"
    return None
