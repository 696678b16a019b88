import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.binding import BindingPolicy, Observation, evaluate
from agent.core.tokens import TokenError, accept_token, key_id, load_trusted_keys, provision_from_file, verify_token

IMEI = "490154203237518"
OTHER_IMEI = "356938035643809"
ICCID = "89860012345678901234"
OTHER_ICCID = "89860098765432109876"
NOW = 1_767_225_600.0  # the test clock's wall time (2026-01-01)

SIGNER = Ed25519PrivateKey.generate()
STRANGER = Ed25519PrivateKey.generate()


def pem(private):
    return private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def raw_b64(private):
    return base64.b64encode(private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


KEYS = load_trusted_keys([pem(SIGNER)])


CLAIMS = {"sub": IMEI, "iccid": OTHER_ICCID, "act": "rebind", "exp": NOW + 3600, "jti": "t-1", "iat": NOW - 60}


def token(signer=SIGNER, headers=None, **overrides):
    claims = {**CLAIMS, **overrides}
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, signer, algorithm="EdDSA", headers=headers)


def unsigned(header, payload, signature=b""):
    part = lambda obj: base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{part(header)}.{part(payload)}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


@pytest.fixture
def bound_store(store):
    """A terminal bound by first use to ICCID with IMEI."""
    evaluate(store, Observation(IMEI, "ready", ICCID), BindingPolicy())
    return store


def snapshot(store):
    return store.read().bindings(), [e for e, _ in store.evidence_entries()]


def test_keys_load_from_pem_and_raw_base64_and_bad_ones_are_named():
    assert [k.id for k in load_trusted_keys([pem(SIGNER), raw_b64(SIGNER)])] == [key_id(SIGNER.public_key().public_bytes_raw())] * 2
    with pytest.raises(ValueError, match=r"trusted_keys\[1\].*32"):
        load_trusted_keys([pem(SIGNER), base64.b64encode(b"short").decode()])


def test_rebind_replaces_binding_with_evidence_and_events(bound_store, events):
    result = accept_token(bound_store, token(), KEYS, IMEI)
    assert result.accepted and result.time_trusted is True
    (row,) = bound_store.read().bindings()
    assert (row.iccid, row.imei, row.source) == (OTHER_ICCID, IMEI, "token")
    types = [e["type"] for e in events(bound_store)]
    assert types[-2:] == ["token_accepted", "bound"]
    bound = events(bound_store)[-1]["data"]
    assert bound["replaced"] == [{"iccid": ICCID, "imei": IMEI}] and bound["jti"] == "t-1"
    # the new card is now the right one
    assert evaluate(bound_store, Observation(IMEI, "ready", OTHER_ICCID), BindingPolicy()).status == "ok"


def test_unbind_deletes_the_binding(bound_store, events, evidence_types):
    result = accept_token(bound_store, token(act="unbind", iccid=ICCID, reason="returned to depot"), KEYS, IMEI)
    assert result.accepted
    assert bound_store.read().bindings() == []
    assert evidence_types(bound_store)[-2:] == ["token_accepted", "unbound"]
    assert events(bound_store)[-1]["data"]["reason"] == "returned to depot"


def test_token_can_name_its_key(bound_store):
    assert accept_token(bound_store, token(headers={"kid": key_id(SIGNER.public_key().public_bytes_raw())}), KEYS, IMEI).accepted


REFUSALS = {
    "bad_signature: signed by a stranger": (lambda: token(signer=STRANGER), "bad_signature"),
    "bad_signature: payload altered": (
        lambda: ".".join([token().split(".")[0], token(sub=IMEI, iccid=ICCID).split(".")[1], token().split(".")[2]]),
        "bad_signature",
    ),
    "bad_signature: alg none": (lambda: unsigned({"alg": "none", "typ": "JWT"}, CLAIMS), "bad_signature"),
    "bad_signature: HS256 keyed with the public key": (lambda: _hs256_confusion(), "bad_signature"),
    "untrusted_key: kid not trusted": (lambda: token(signer=STRANGER, headers={"kid": key_id(STRANGER.public_key().public_bytes_raw())}), "untrusted_key"),
    "expired: before now": (lambda: token(exp=NOW - 1), "expired"),
    "wrong_device": (lambda: token(sub=OTHER_IMEI), "wrong_device"),
    "malformed: not a JWT": (lambda: "not-a-token", "malformed"),
    "malformed: empty": (lambda: "  ", "malformed"),
    "malformed: four parts": (lambda: token() + ".x", "malformed"),
    "malformed: header not JSON": (lambda: "bm90IGpzb24." + token().split(".", 1)[1], "malformed"),
    "malformed: kid not a string": (lambda: unsigned({"alg": "EdDSA", "kid": 7}, CLAIMS), "malformed"),
    "bad_claims: unknown act": (lambda: token(act="steal"), "bad_claims"),
    "bad_claims: no jti": (lambda: token(jti=None), "bad_claims"),
    "bad_claims: exp not a number": (lambda: token(exp="tomorrow"), "bad_claims"),
    "bad_claims: ICCID not digits": (lambda: token(iccid="8986'; DROP TABLE"), "bad_claims"),
    "bad_claims: unbind of an unknown card": (lambda: token(act="unbind", iccid=OTHER_ICCID), "bad_claims"),
}


def _hs256_confusion():
    """The classic attack: HMAC with the (public) verification key as the secret."""
    header = {"alg": "HS256", "typ": "JWT"}
    body = unsigned(header, CLAIMS).rsplit(".", 1)[0]
    signature = hmac.new(pem(SIGNER).encode(), body.encode(), hashlib.sha256).digest()
    return unsigned(header, CLAIMS, signature)


@pytest.mark.parametrize("name", REFUSALS)
def test_refusal_records_token_refused_and_changes_nothing_else(bound_store, events, name):
    make, code = REFUSALS[name]
    bindings_before, evidence_before = snapshot(bound_store)
    events_before = events(bound_store)
    result = accept_token(bound_store, make(), KEYS, IMEI)
    assert (result.accepted, result.code) == (False, code)
    bindings_after, evidence_after = snapshot(bound_store)
    assert bindings_after == bindings_before
    assert evidence_after[:-1] == evidence_before
    assert evidence_after[-1]["type"] == "token_refused" and evidence_after[-1]["data"]["code"] == code
    assert [e["type"] for e in events(bound_store)] == [e["type"] for e in events_before] + ["token_refused"]


def test_replayed_jti_is_refused_after_one_use(bound_store, events):
    assert accept_token(bound_store, token(), KEYS, IMEI).accepted
    before = snapshot(bound_store)
    result = accept_token(bound_store, token(), KEYS, IMEI)
    assert result.code == "replayed"
    after = snapshot(bound_store)
    assert after[0] == before[0] and after[1][:-1] == before[1]
    assert after[1][-1]["type"] == "token_refused"


def test_replay_refused_after_restart(tmp_path, make_clock):
    from agent.core.store import Store

    s = Store.open(tmp_path, clock=make_clock())
    assert accept_token(s, token(), KEYS, IMEI).accepted
    s.close()
    s = Store.open(tmp_path, clock=make_clock())
    assert accept_token(s, token(), KEYS, IMEI).code == "replayed"
    s.close()


def test_refused_token_is_never_stored(bound_store):
    secret_token = token(signer=STRANGER)
    accept_token(bound_store, secret_token, KEYS, IMEI)
    dump = json.dumps([e for e, _ in bound_store.evidence_entries()]) + json.dumps([r.payload for r in bound_store.outbox_pending(1000)])
    assert secret_token.split(".")[2] not in dump


def test_untrusted_clock_judges_expiry_against_the_time_floor(bound_store, clock, events):
    # A trusted stamp was seen at NOW (the bound_store fixture recorded at NOW).
    assert bound_store.read().time_floor() == NOW
    clock.wall, clock.trusted = 0.0, False  # cold boot without RTC: 1970
    stale = token(exp=NOW - 10, jti="old")
    assert accept_token(bound_store, stale, KEYS, IMEI).code == "expired"
    fresh = token(exp=NOW + 10, jti="new")
    result = accept_token(bound_store, fresh, KEYS, IMEI)
    assert result.accepted and result.time_trusted is False
    accepted = [e for e in events(bound_store) if e["type"] == "token_accepted"][-1]
    assert accepted["data"]["time_trusted"] is False and accepted["time_trusted"] is False


def test_time_floor_never_goes_back(store, clock):
    store.record("agent_started", {})
    clock.wall = NOW - 86_400  # a trusted but earlier clock (e.g. corrected by NTP)
    store.record("agent_started", {})
    clock.wall, clock.trusted = NOW + 50, False  # untrusted stamps never raise it
    store.record("agent_started", {})
    assert store.read().time_floor() == NOW


def test_untrusted_clock_without_any_floor_accepts_with_flag(tmp_path, make_clock):
    from agent.core.store import Store

    s = Store.open(tmp_path, clock=make_clock(wall=0.0, trusted=False))
    result = accept_token(s, token(exp=100.0), KEYS, IMEI)
    assert result.accepted and result.time_trusted is False
    s.close()


def test_verify_token_raises_typed_error():
    stamp = type("S", (), {"wall": NOW, "trusted": True})()
    with pytest.raises(TokenError) as info:
        verify_token(token(sub=OTHER_IMEI), KEYS, IMEI, stamp, None)
    assert info.value.code == "wrong_device" and OTHER_IMEI in info.value.message
    with pytest.raises(TokenError) as info:
        verify_token(token(), [], IMEI, stamp, None)
    assert info.value.code == "untrusted_key"


def test_provision_file_binds_once_and_is_not_replayed_each_boot(store, tmp_path, events):
    path = tmp_path / "provision.tokens"
    path.write_text(f"# written at the factory\n\n{token(iccid=ICCID, jti='factory-1')}\n")
    assert provision_from_file(store, path, KEYS, None) == []  # IMEI unknown: wait
    (result,) = provision_from_file(store, path, KEYS, IMEI)
    assert result.accepted
    assert store.read().bindings()[0].source == "provision-file"
    count = len(events(store))
    assert provision_from_file(store, path, KEYS, IMEI) == []  # next start: same file
    assert len(events(store)) == count
    assert evaluate(store, Observation(IMEI, "ready", ICCID), BindingPolicy(mode="provisioned")).status == "ok"
    assert provision_from_file(store, tmp_path / "missing", KEYS, IMEI) == []


def test_command_token_is_not_a_binding_token(bound_store, events):
    """A token that authorises `modem_reset` cannot rebind, and using it for its own
    command consumes its jti without touching the binding."""
    reset = token(act="modem_reset", iccid=None, jti="cmd-1")
    before = bound_store.read().bindings()
    refused = accept_token(bound_store, reset, KEYS, IMEI)
    assert (refused.accepted, refused.code) == (False, "bad_claims")
    accepted = accept_token(bound_store, reset, KEYS, IMEI, actions=("modem_reset",))
    assert accepted.accepted and accepted.claims.iccid is None
    assert bound_store.read().bindings() == before
    again = accept_token(bound_store, reset, KEYS, IMEI, actions=("modem_reset",))
    assert again.code == "replayed"


def test_binding_token_must_name_the_card():
    with pytest.raises(TokenError) as refused:
        verify_token(token(iccid=None), KEYS, IMEI, _trusted_stamp(), None)
    assert refused.value.code == "bad_claims"


def _trusted_stamp():
    from agent.core.clock import Stamp

    return Stamp(NOW, True, 1.0, "boot")


def test_a_fresh_tokens_iat_corroborates_network_time_and_raises_the_floor(tmp_path):
    """Network time alone never raises the floor; a verified token issued moments before
    our trusted (network) time is the second source that agrees."""
    from agent.core.clock import Clock
    from agent.core.store import Store

    clock = Clock(kernel_synchronised=lambda: False, build_epoch=NOW - 86_400)
    clock.set_network_time(NOW)
    s = Store.open(tmp_path, clock=clock)
    s.record("agent_started", {})
    assert s.read().time_floor() is None
    stale_iat = token(iat=NOW - 3 * 3600, exp=NOW + 3600, jti="old-iat")
    assert accept_token(s, stale_iat, KEYS, IMEI).accepted
    assert s.read().time_floor() is None  # issued hours ago: proves nothing about now
    fresh = token(iat=NOW - 60, exp=NOW + 3600, jti="fresh-iat")
    assert accept_token(s, fresh, KEYS, IMEI).accepted
    assert s.read().time_floor() == pytest.approx(NOW, abs=5)
    s.close()
