"""A device key lost while the state it signs lives on (issue 10: state loss is never
silent). The evidence log and the bindings are intact, so the terminal knows it has run:
a new key is made (exports must go on being signed), and its replacement of the key the
platform knows is recorded as `state_reset` (`device_key_missing`, with the public key
published before when it is still known), so the platform learns why later exports verify
only with the new key. The bindings stay: only the key was lost."""

from __future__ import annotations

import json

import pytest

from .conftest import HOME_ICCID, TIMEOUT, events, wait_event


@pytest.mark.parametrize("removed", [("device_key.pem",), ("device_key.pem", "device_key.pub")])
def test_a_lost_device_key_is_replaced_and_recorded(home_modem, agent_process, subscriber, mosquitto, removed, tmp_path):
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)
    wait_event(platform, "radio_restored")
    old_pubkey = (agent.state_dir / "device_key.pub").read_text().strip()
    assert agent.stop() == 0
    for name in removed:
        (agent.state_dir / name).unlink()
    mark = max(e["seq"] for e in events(platform))
    agent.restart()
    reset = wait_event(platform, "state_reset", after=mark, timeout=TIMEOUT)
    new_pubkey = (agent.state_dir / "device_key.pub").read_text().strip()
    assert new_pubkey != old_pubkey
    assert reset["data"]["reason"] == "device_key_missing"
    assert reset["data"]["device_pubkey"] == new_pubkey
    assert reset["data"].get("previous_pubkey") == (old_pubkey if len(removed) == 1 else None)
    wait_event(platform, "radio_restored", after=mark)  # the bindings were not lost: the home card keeps its radio
    view = json.loads(agent.cli("bind", "show", "--json", check=True).stdout)
    assert [row["iccid"] for row in view["bindings"]] == [HOME_ICCID]
    state = json.loads(agent.cli("status", "--json", check=True).stdout)
    assert state["device_pubkey"] == new_pubkey
    bundle = tmp_path / "evidence.json"
    agent.cli("evidence", "export", "--out", str(bundle), check=True)
    assert agent.cli("evidence", "verify", str(bundle), "--pubkey", new_pubkey, check=True).stdout.startswith("OK")
    assert agent.stop() == 0


def test_an_unusable_device_key_stops_exports_not_the_gate(home_modem, agent_process, subscriber, mosquitto):
    """A damaged key file (its public half gone too) was a traceback and exit 1 at every
    start: systemd restarted a daemon that never gated the radio. The key is never replaced
    by itself (it may be recoverable); exports say why they fail, enforcement goes on."""
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)
    wait_event(platform, "radio_restored")
    assert agent.stop() == 0
    (agent.state_dir / "device_key.pem").write_text("garbage\n")
    (agent.state_dir / "device_key.pub").unlink()
    mark = max(e["seq"] for e in events(platform))
    agent.restart()
    wait_event(platform, "radio_restored", after=mark)
    state = json.loads(agent.cli("status", "--json", check=True).stdout)
    assert state["device_pubkey"] is None
    export = agent.cli("evidence", "export", "--out", "/dev/null")
    assert export.returncode != 0 and "not a usable private key" in export.stderr, export
    assert (agent.state_dir / "device_key.pem").read_text() == "garbage\n"
    assert agent.stop() == 0
