"""Tokens through `Enforcer.accept_token` on a running terminal, and the evidence story
of a swap exported, verified, and tampered with."""

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.binding import BindingPolicy
from agent.core.evidence import export_bundle, load_or_create_device_key, verify_bundle
from agent.core.tokens import load_trusted_keys

from .conftest import FOREIGN_ICCID, HOME_ICCID, HOME_IMEI, OTHER_IMEI, run, sent

SIGNER = Ed25519PrivateKey.generate()
STRANGER = Ed25519PrivateKey.generate()
KEYS = load_trusted_keys([base64.b64encode(SIGNER.public_key().public_bytes(
    serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()])


def token(signer=SIGNER, **claims):
    body = {"sub": HOME_IMEI, "iccid": FOREIGN_ICCID, "act": "rebind", "exp": time.time() + 3600, "jti": "rebind-1",
            **claims}
    return jwt.encode(body, signer, algorithm="EdDSA")


def frozen(t):
    """Everything a refused token must leave alone."""
    return t.bindings(), t.evidence(), t.fake.state()["cfun"], len(sent(t.fake.transcript, "AT+CFUN=1"))


REFUSALS = {
    "expired": dict(exp=time.time() - 60),
    "bad_signature": dict(signer=STRANGER),
    "wrong_device": dict(sub=OTHER_IMEI),
}


@pytest.mark.parametrize("mode, stored", [("first-use", ((HOME_ICCID, HOME_IMEI),)), ("provisioned", ())])
def test_token_flows_refusals_change_nothing_and_a_valid_rebind_restores_the_radio(open_terminal, mode, stored):
    async def scenario():
        async with open_terminal(BindingPolicy(mode=mode), bindings=stored, profile="quectel",
                                 iccid=FOREIGN_ICCID) as t:
            expected_reason = "iccid_mismatch" if stored else "not_provisioned"
            assert (t.started.status, t.started.reason) == ("violation", expected_reason)
            assert t.fake.state()["cfun"] == 4

            for code, claims in REFUSALS.items():
                bindings, evidence, cfun, radio_on = frozen(t)
                result = await t.enforcer.accept_token(token(**claims), KEYS)
                assert (result.accepted, result.code) == (False, code)
                assert frozen(t)[0] == bindings and frozen(t)[2:] == (cfun, radio_on)
                after = t.evidence()
                assert after[:-1] == evidence and after[-1]["type"] == "token_refused"
                assert after[-1]["data"]["code"] == code and "token" not in after[-1]["data"]

            valid = token()
            result = await t.enforcer.accept_token(valid, KEYS)
            assert result.accepted
            assert t.fake.state()["cfun"] == 1  # the re-check ran before accept_token returned
            assert t.bindings() == [(FOREIGN_ICCID, HOME_IMEI)]
            assert t.enforcer.state()["binding"]["status"] == "ok"
            types = t.types()
            assert types[-4:] == ["token_accepted", "bound", "binding_checked", "radio_restored"]

            bindings, evidence, cfun, radio_on = frozen(t)
            replay = await t.enforcer.accept_token(valid, KEYS)
            assert (replay.accepted, replay.code) == (False, "replayed")
            assert t.bindings() == bindings and t.evidence()[:-1] == evidence
            assert t.evidence()[-1]["type"] == "token_refused"
            assert t.fake.state()["cfun"] == 1

    run(scenario())


def test_evidence_bundle_tells_the_swap_story_and_names_a_tampered_entry(open_terminal, tmp_path):
    async def scenario():
        async with open_terminal(profile="quectel") as t:
            t.fake.sim_insert(FOREIGN_ICCID)
            await t.status("violation", "iccid_mismatch")
            await t.cfun(4)
            t.fake.sim_insert(HOME_ICCID)
            await t.status("ok")
            await t.cfun(1)
            key = load_or_create_device_key(t.store.path.parent)
            return export_bundle(t.store, key, device_id=HOME_IMEI), key

    bundle, key = run(scenario())
    story = [(e["type"], e["data"].get("reason")) for e in bundle["entries"]]
    assert story == [
        ("radio_blocked", "start"), ("bound", None), ("radio_restored", "bound"),
        ("radio_blocked", "sim_removed"), ("sim_removed", None), ("sim_inserted", None),
        ("binding_violation", "iccid_mismatch"),
        ("sim_removed", None), ("sim_inserted", None), ("binding_checked", None), ("radio_restored", "ok"),
    ]
    inserted = [e["data"]["iccid"] for e in bundle["entries"] if e["type"] == "sim_inserted"]
    assert inserted == [FOREIGN_ICCID, HOME_ICCID]
    assert all(e["data"]["command"] == "+CFUN=4" for e in bundle["entries"] if e["type"] == "radio_blocked")

    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    pubkey = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    assert verify_bundle(json.loads(path.read_text()), pubkey).ok

    # Make the violation look like the right card: the chain names that entry.
    tampered = json.loads(path.read_text())
    violation = next(e for e in tampered["entries"] if e["type"] == "binding_violation")
    violation["data"]["observed"]["iccid"] = HOME_ICCID
    path.write_text(json.dumps(tampered))
    result = verify_bundle(json.loads(path.read_text()), pubkey)
    assert not result.ok and result.first_bad_seq == violation["seq"]
    assert f"entry {violation['seq']}" in result.describe()
