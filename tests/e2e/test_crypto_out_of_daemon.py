"""The daemon never loads cryptography (issue 12: idle RSS <= 30 MB, also after token
checks and evidence exports). Its native module and PyJWT are about 9 MB of a ~30 MB
daemon, so the device key is created, token signatures are checked and exports are
signed in helper processes (agent.service.offload).

Read from /proc/PID/maps: an imported extension module is mapped, so cryptography's
`_rust` module shows there once anything of it is imported (PyJWT imports it too). Cheap
and deterministic, unlike an RSS threshold; the path, not the file name, so Debian's
python3-cryptography and a wheel are both seen."""

from __future__ import annotations

import json

from .conftest import HOME_ICCID, IMEI, TIMEOUT, events, sign_token, wait_event


def cryptography_mapped(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as maps:
        return sorted({line.split(maxsplit=5)[5].strip() for line in maps
                       if len(line.split(maxsplit=5)) == 6 and "/cryptography/" in line})


def test_key_creation_token_checks_and_exports_leave_cryptography_out_of_the_daemon(
        home_modem, agent_process, subscriber, mosquitto, tmp_path):
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)  # a first start: the device key is created
    agent.wait_ready()
    wait_event(platform, "radio_restored")
    assert (agent.state_dir / "device_key.pem").stat().st_mode & 0o777 == 0o600
    assert cryptography_mapped(agent.pid) == []

    accepted = agent.cli("bind", "accept", sign_token("rebind", HOME_ICCID), check=True)
    assert "accepted: rebind" in accepted.stdout
    forged = sign_token("rebind", HOME_ICCID)
    forged = forged.rsplit(".", 1)[0] + ".AAAA" + forged.rsplit(".", 1)[1][4:]
    refused = agent.cli("bind", "accept", forged)
    assert refused.returncode == 1 and "refused (bad_signature)" in refused.stderr
    wait_event(platform, "token_refused")
    # A platform command's token: checked before the command runs, consumed by it.
    platform.publish(f"simagent/{IMEI}/cmd", json.dumps({"id": "r1", "name": "rebind", "args": {},
                                                        "token": sign_token("rebind", HOME_ICCID)}))
    platform.wait_for(lambda sub: [m for m in sub.messages("/cmd/result") if m.json().get("id") == "r1"],
                      timeout=TIMEOUT, what="the rebind command's result")
    results = [m.json() for m in platform.messages("/cmd/result") if m.json().get("id") == "r1"]
    assert results[0]["ok"] is True, results
    bundle = tmp_path / "evidence.json"
    agent.cli("evidence", "export", "--out", str(bundle), check=True)
    verdict = agent.cli("evidence", "verify", str(bundle), check=True)
    assert verdict.stdout.startswith("OK")

    assert cryptography_mapped(agent.pid) == []
    refusals = [e["data"]["code"] for e in events(platform, ("token_refused",))]
    assert refusals == ["bad_signature"]
    assert agent.stop() == 0
