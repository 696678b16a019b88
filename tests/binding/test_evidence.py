import base64
import copy
import datetime as dt
import hashlib
import json
import multiprocessing
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.evidence import (
    EvidenceError,
    device_public_key,
    device_public_key_b64,
    export_bundle,
    load_or_create_device_key,
    parse_since,
    verify_bundle,
)
from agent.core.store import GENESIS_HASH, canonical_json


@pytest.fixture
def key(store):
    return load_or_create_device_key(store.path.parent)


@pytest.fixture
def bundle(store, key, clock):
    for n in range(1, 7):
        clock.wall += 60
        store.record("sim_inserted", {"n": n, "iccid": "8986001"})
    return export_bundle(store, key, device_id="490154203237518")


def pubkey(key):
    return device_public_key_b64(key)


# -- device key ----------------------------------------------------------------------


def test_device_key_is_private_and_stable_across_restarts(tmp_path):
    first = load_or_create_device_key(tmp_path)
    path = tmp_path / "device_key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert device_public_key_b64(load_or_create_device_key(tmp_path)) == device_public_key_b64(first)
    assert len(base64.b64decode(device_public_key_b64(first))) == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device_key.pem", "device_key.pub"]  # no temporary left


def test_published_public_key_needs_no_private_key_and_is_repaired(tmp_path):
    published = device_public_key(tmp_path)  # first start: creates the key pair
    assert published == device_public_key_b64(load_or_create_device_key(tmp_path))
    assert stat.S_IMODE((tmp_path / "device_key.pub").stat().st_mode) == 0o644
    (tmp_path / "device_key.pub").write_text("tampered\n")
    assert device_public_key(tmp_path) == "tampered"  # read as is, without cryptography...
    load_or_create_device_key(tmp_path)  # ...until the key is next used
    assert device_public_key(tmp_path) == published


def _public_key_of(directory, queue):
    queue.put(device_public_key_b64(load_or_create_device_key(directory)))


def test_concurrent_first_starts_agree_on_one_key(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_public_key_of, args=(tmp_path, queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert len({queue.get(timeout=5) for _ in workers}) == 1


def test_unusable_key_file_is_an_error_not_silently_replaced(tmp_path):
    (tmp_path / "device_key.pem").write_text("garbage")
    with pytest.raises(EvidenceError, match="device_key.pem"):
        load_or_create_device_key(tmp_path)
    assert (tmp_path / "device_key.pem").read_text() == "garbage"


# -- export and verify ---------------------------------------------------------------


def test_exported_bundle_verifies_and_is_documented_shape(bundle, key):
    assert bundle["schema"] == "simagent/evidence-bundle/1"
    assert [e["seq"] for e in bundle["entries"]] == list(range(1, 7)) and bundle["first_seq"] == 1
    assert bundle["entries"][0]["prev"] == GENESIS_HASH and bundle["head"] == bundle["hashes"][-1]
    result = verify_bundle(bundle, pubkey(key))
    assert result.ok and result.entries == 6 and result.key_source == "given"
    assert verify_bundle(bundle).ok  # the key inside the bundle


def test_bundle_survives_a_json_file_round_trip(bundle, key, tmp_path):
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle, indent=2))
    assert verify_bundle(json.loads(path.read_text()), pubkey(key)).ok


def test_rules_are_reproducible_without_the_agent(bundle, key):
    """What the README tells a platform team, done by hand."""
    prev = GENESIS_HASH
    for entry, digest in zip(bundle["entries"], bundle["hashes"]):
        text = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert hashlib.sha256(text.encode()).hexdigest() == digest and entry["prev"] == prev
        prev = digest
    body = {k: v for k, v in bundle.items() if k != "signature"}
    message = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    key.public_key().verify(base64.b64decode(bundle["signature"]), message)


def tamper_data(b):
    b["entries"][2]["data"]["iccid"] = "8986999"


def tamper_data_and_hash(b):
    b["entries"][2]["data"]["iccid"] = "8986999"
    b["hashes"][2] = hashlib.sha256(canonical_json(b["entries"][2])).hexdigest()


def delete_entry(b):
    del b["entries"][2], b["hashes"][2]


def reorder(b):
    b["entries"][2], b["entries"][3] = b["entries"][3], b["entries"][2]
    b["hashes"][2], b["hashes"][3] = b["hashes"][3], b["hashes"][2]


def drop_first_and_claim_partial(b):
    del b["entries"][0], b["hashes"][0]


@pytest.mark.parametrize(
    "tamper,bad_seq,words",
    [
        (tamper_data, 3, "altered"),
        (tamper_data_and_hash, 3, "altered"),
        (delete_entry, 3, "missing"),
        (reorder, 3, "out of order"),
        (drop_first_and_claim_partial, 1, "missing"),
    ],
)
def test_tampering_names_the_entry(bundle, key, tamper, bad_seq, words):
    tampered = copy.deepcopy(bundle)
    tamper(tampered)
    result = verify_bundle(tampered, pubkey(key))
    assert not result.ok
    assert result.first_bad_seq == bad_seq
    assert words in result.reason and f"entry {bad_seq}" in result.describe()


def test_rehashed_and_resigned_by_another_key_fails_against_the_device_key(bundle, key):
    forger = Ed25519PrivateKey.generate()
    forged = copy.deepcopy(bundle)
    tamper_data_and_hash(forged)
    for i in range(3, len(forged["entries"])):  # re-link the rest of the chain
        forged["entries"][i]["prev"] = forged["hashes"][i - 1]
        forged["hashes"][i] = hashlib.sha256(canonical_json(forged["entries"][i])).hexdigest()
    forged["head"] = forged["hashes"][-1]
    forged["device_pubkey"] = device_public_key_b64(forger)
    del forged["signature"]
    forged["signature"] = base64.b64encode(forger.sign(canonical_json(forged))).decode()
    assert verify_bundle(forged).ok  # self-consistent: that is why --pubkey matters
    result = verify_bundle(forged, pubkey(key))
    assert not result.ok and "signature" in result.reason


@pytest.mark.parametrize("field,value", [("signature", base64.b64encode(b"x" * 64).decode()), ("device_id", "someone-else"), ("exported_at", "2020-01-01T00:00:00.000Z")])
def test_bad_signature_or_altered_header_fails(bundle, key, field, value):
    tampered = dict(bundle, **{field: value})
    result = verify_bundle(tampered, pubkey(key))
    assert not result.ok and result.first_bad_seq is None and "signature" in result.reason


@pytest.mark.parametrize("bad", [[], "x", {"schema": "other"}, {"schema": "simagent/evidence-bundle/1"}])
def test_malformed_bundles_are_reported_not_raised(bad):
    result = verify_bundle(bad)
    assert not result.ok and "malformed" in result.reason


def test_since_seq_exports_a_verifiable_tail(store, key, bundle):
    tail = export_bundle(store, key, since=4)
    assert [e["seq"] for e in tail["entries"]] == [4, 5, 6] and tail["first_seq"] == 4
    assert verify_bundle(tail, pubkey(key)).ok
    broken = copy.deepcopy(tail)
    tamper_data(broken)  # entries[2] is seq 6 here
    assert verify_bundle(broken, pubkey(key)).first_bad_seq == 6


def test_since_time_starts_at_first_entry_stamped_then_keeps_everything_after(store, key, bundle, clock):
    clock.wall, clock.trusted = 0.0, False  # a later entry with a 1970 clock is kept
    store.record("sim_removed", {})
    third_wall = bundle["entries"][2]["wall"]
    tail = export_bundle(store, key, since=parse_since(third_wall))
    assert [e["seq"] for e in tail["entries"]] == [3, 4, 5, 6, 7]
    assert verify_bundle(tail).ok


def test_empty_export_anchors_on_the_newest_entry(store, key, bundle):
    empty = export_bundle(store, key, since=100)
    assert empty["entries"] == [] and empty["first_seq"] == 7 and empty["head"] == bundle["head"]
    assert verify_bundle(empty, pubkey(key)).ok


def test_parse_since():
    assert parse_since("12") == 12
    assert parse_since("2026-01-01T00:00:00Z") == dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    assert parse_since("2026-01-01 08:00").tzinfo == dt.timezone.utc
    with pytest.raises(ValueError, match="yesterday"):
        parse_since("yesterday")


def test_non_ascii_and_integral_float_data_hash_identically_after_round_trip(store, key):
    store.record("sim_inserted", {"note": "机卡绑定", "exp": 1767225600.0})
    bundle = export_bundle(store, key)
    assert bundle["entries"][-1]["data"]["exp"] == 1767225600 and isinstance(bundle["entries"][-1]["data"]["exp"], int)
    assert verify_bundle(json.loads(json.dumps(bundle)), pubkey(key)).ok


def test_private_key_never_in_bundle(store, key, bundle):
    pem = (store.path.parent / "device_key.pem").read_text()
    secret_b64 = pem.splitlines()[1]
    assert secret_b64 not in json.dumps(bundle)
    assert os.stat(store.path.parent / "device_key.pem").st_mode & 0o077 == 0


class _BytesOnlyKey:
    """An Ed25519 key as cryptography 38 (Debian 12's python3-cryptography) signs: its
    sign() takes bytes only and raises TypeError for an mmap."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    def sign(self, data) -> bytes:
        if not isinstance(data, bytes):
            raise TypeError(f"initializer for ctype 'unsigned char *' must be a cdata pointer, not {type(data).__name__}")
        return self._key.sign(data)

    def public_key(self):
        return self._key.public_key()


def test_export_signs_with_a_key_that_takes_bytes_only(store, key, bundle):
    """Found by packaging/test-matrix on bookworm: the export worker failed there."""
    assert export_bundle(store, _BytesOnlyKey(key), device_id="490154203237518") == bundle
