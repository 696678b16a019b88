"""`simagent-platform` against the real daemon and mosquitto: the README's platform walk
through (key, trust, token, send, fleet, watch, evidence) with nothing built by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import FOREIGN_ICCID, HOME_ICCID, IMEI, TIMEOUT, swap_to, wait_event, wait_modem

PLATFORM = str(Path(sys.executable).with_name("simagent-platform"))  # the installed console script
P = f"simagent/{IMEI}"
OTHER = "864505040000021"  # a healthy terminal next to ours (its retained documents)


def platform(*argv: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([PLATFORM, *argv], capture_output=True, text=True, timeout=timeout)


def fleet(broker) -> tuple[int, list[dict]]:
    result = platform("fleet", "--broker", broker, "--json", "--settle", "0.3")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_a_platform_engineer_rebinds_a_terminal_with_the_platform_tools(home_modem, agent_process, subscriber, mosquitto, tmp_path):
    broker = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    made = platform("keygen", "--out", str(tmp_path / "operator.key"), "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert (tmp_path / "operator.key").stat().st_mode & 0o777 == 0o600
    # The terminal trusts only the operator key keygen made (the suite's own signer is replaced).
    agent = agent_process(home_modem, mosquitto, binding={"trusted_keys": [key["trusted_key"]]})
    seen = subscriber(mosquitto, "simagent/#")
    wait_event(seen, "radio_restored")
    seen.wait_for(lambda s: any(d["online"] for d in s.documents(f"{P}/status")), what="online")
    state = seen.wait_for(lambda s: next((d for d in s.documents(f"{P}/state") if d["binding"]["status"] == "ok"), None))
    other = {**state, "device_id": OTHER, "modem": {**state["modem"], "imei": OTHER}}
    seen.client.publish(f"simagent/{OTHER}/state", json.dumps(other), qos=1, retain=True).wait_for_publish(5)
    seen.client.publish(f"simagent/{OTHER}/status", json.dumps({"schema": "simagent/status/1", "online": True, "ts": state["binding"]["since"],
                                                               "agent_version": state["agent_version"]}), qos=1, retain=True).wait_for_publish(5)

    code, rows = fleet(broker)
    assert code == 0 and [r["device"] for r in rows] == [IMEI, OTHER]
    assert rows[0] | {"last_seen": None} == {"device": IMEI, "online": True, "binding": "ok", "iccid": HOME_ICCID, "imei": IMEI,
                                             "last_seen": None, "violation": None, "bound_iccid": HOME_ICCID, "invalid": []}
    assert rows[0]["last_seen"]

    watch = subprocess.Popen([PLATFORM, "watch", "--broker", broker, "--count", "3", "--type", "binding_violation",
                              "--type", "token_accepted", "--type", "bound"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "watching simagent/+/events" in watch.stderr.readline()

        swap_to(home_modem, FOREIGN_ICCID)
        wait_event(seen, "radio_blocked")
        seen.wait_for(lambda s: s.documents(f"{P}/state")[-1]["binding"]["status"] == "violation", what="the state's violation")
        code, rows = fleet(broker)
        assert code == 1  # a violation in the fleet
        assert [r["device"] for r in rows] == [IMEI, OTHER]  # problems first, though OTHER sorts before by name
        assert (rows[0]["binding"], rows[0]["violation"], rows[0]["iccid"]) == ("violation", "iccid_mismatch", FOREIGN_ICCID)
        table = platform("fleet", "--broker", broker, "--settle", "0.3")
        assert table.stdout.splitlines()[1].split()[:4] == [IMEI, "yes", "VIOLATION", FOREIGN_ICCID]

        minted = platform("token", "rebind", "--key", str(tmp_path / "operator.key"), "--device", IMEI,
                          "--iccid", FOREIGN_ICCID, "--reason", "card swapped by the field team")
        assert minted.returncode == 0, minted.stderr
        token = minted.stdout.strip()
        sent = platform("send", "--broker", broker, "--device", IMEI, "rebind", "--token", token, "--json")
        assert sent.returncode == 0, sent.stderr
        reply = json.loads(sent.stdout)
        assert reply["ok"] is True and reply["result"]["accepted"] is True, reply
        bound = wait_event(seen, "bound", where=lambda e: e["data"]["iccid"] == FOREIGN_ICCID)
        assert bound["data"]["source"] == "mqtt"
        wait_modem(home_modem, lambda s: s["cfun"] == 1, "CFUN=1 for the card the token made legitimate")
        seen.wait_for(lambda s: s.documents(f"{P}/state")[-1]["binding"]["status"] == "ok", what="the state back to ok")
        code, rows = fleet(broker)
        assert code == 0 and (rows[0]["device"], rows[0]["binding"], rows[0]["bound_iccid"]) == (IMEI, "ok", FOREIGN_ICCID)

        out, err = watch.communicate(timeout=TIMEOUT)
        assert watch.returncode == 0, err
    finally:
        watch.kill()
    lines = out.splitlines()
    assert [line.split()[3] for line in lines] == ["binding_violation", "token_accepted", "bound"], lines
    assert all(line.split()[1] == IMEI for line in lines) and f"iccid={FOREIGN_ICCID}" in lines[2]

    # The same token again: the terminal refuses the replay; send says so and exits 1.
    replay = platform("send", "--broker", broker, "--device", IMEI, "rebind", "--token", token)
    assert replay.returncode == 1 and "replayed" in replay.stderr, (replay.stdout, replay.stderr)
    ping = platform("send", "--broker", broker, "--device", IMEI, "ping", "--json")
    assert ping.returncode == 0 and json.loads(ping.stdout)["result"]["pong"] is True
    nobody = platform("send", "--broker", broker, "--device", "864505040000039", "ping", "--wait", "0.5")
    assert nobody.returncode == 1 and "no reply from 864505040000039 within 0.5 s" in nobody.stderr

    # The terminal's evidence, verified on the platform with the same verifier.
    bundle = tmp_path / "evidence.json"
    agent.cli("evidence", "export", "--out", str(bundle), check=True)
    verified = platform("evidence", "verify", str(bundle))
    assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.stdout
    document = json.loads(bundle.read_text())
    document["entries"][1]["data"] = {"forged": True}
    bundle.write_text(json.dumps(document))
    assert platform("evidence", "verify", str(bundle)).returncode == 1
    assert agent.stop() == 0
