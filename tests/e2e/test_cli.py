"""The field technician's CLI while the daemon runs: everything goes through its control
socket, and the daemon's answers match what the CLI reads directly when it does not run."""

from __future__ import annotations

import json

from agent.service.control import BlockingControlClient, ControlError

from .conftest import HOME_ICCID, IMEI, wait_event

STATE_KEYS = {"device_id", "agent_version", "modem", "sim", "binding", "radio", "device_pubkey"}
NETWORK_KEYS = {"registration", "operator", "access_tech", "signal_dbm"}


def comparable(doc: dict) -> dict:
    """What both paths must agree on: identity, SIM, binding verdict, network words."""
    return {
        "modem": {k: doc["modem"][k] for k in ("vendor", "model", "revision", "imei", "imei_luhn_ok")},
        "sim": doc["sim"],
        "binding": {k: doc["binding"][k] for k in ("mode", "status", "bound_iccid", "bound_imei")},
        "network": {k: doc["network"][k] for k in ("registration", "access_tech", "signal_dbm")},
    }


def test_status_at_and_diag_through_the_daemon(fake_modem_process, agent_process, subscriber, mosquitto):
    modem = fake_modem_process(profile="quectel", imei=IMEI, iccid=HOME_ICCID, register_delay=0.0)
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(modem, mosquitto)
    wait_event(platform, "radio_restored")
    platform.wait_for(lambda sub: any(d["online"] for d in sub.documents("/status")), what="online")
    commands_before = modem.state()["counters"]["commands"]

    status = agent.cli("status", "--json", check=True)
    via_daemon = json.loads(status.stdout)
    assert STATE_KEYS | {"network", "mqtt", "outbox"} <= set(via_daemon)
    assert NETWORK_KEYS <= set(via_daemon["network"])
    assert via_daemon["sim"] == {"state": "ready", "iccid": HOME_ICCID, "imsi": modem.state()["imsi"]}
    assert via_daemon["binding"]["status"] == "ok" and via_daemon["binding"]["bound_iccid"] == HOME_ICCID
    assert via_daemon["mqtt"]["connected"] is True and via_daemon["mqtt"]["tls"] is False
    assert set(via_daemon["outbox"]) == {"event", "telemetry"} and via_daemon["outbox"]["event"] >= 0
    assert via_daemon["radio"] == {"cfun": 1, "gated": False}
    assert modem.state()["counters"]["commands"] > commands_before  # the daemon read the live network facts

    # The daemon owns the port (TIOCEXCL): a direct open is refused, never shared.
    direct_while_running = agent.cli("status", "--json", "--port", modem.port)
    assert direct_while_running.returncode == 69, direct_while_running.stderr

    at = agent.cli("at", "AT+CSQ", check=True)
    assert at.stdout.splitlines()[-1] == "OK" and at.stdout.startswith("+CSQ:")

    write = agent.cli("at", "AT+CFUN=0")
    assert write.returncode == 1 and "--unsafe" in write.stderr
    rewrite = agent.cli("at", "--unsafe", 'AT+EGMR=1,7,"864505040000021"')
    assert rewrite.returncode == 1
    # The daemon applies the same rule to whoever reaches its socket, not only to this CLI.
    with BlockingControlClient.connect(agent.control_socket) as client:
        try:
            client.call("at", command="AT+CFUN=0", unsafe=False)
        except ControlError as exc:
            assert "unsafe" in exc.message
        else:
            raise AssertionError("the daemon ran a write without unsafe")
    state = modem.state()
    assert state["cfun"] == 1 and state["counters"]["imei_rewrite_attempts"] == 0
    assert "AT+CFUN=0" not in state["commands"]

    diag = agent.cli("diag", "--json")
    report = json.loads(diag.stdout)
    checks = {c["name"]: c["result"] for c in report["checks"]}
    assert diag.returncode in (0, 1), diag.stderr
    assert checks, report
    assert all(result in ("PASS", "WARN", "FAIL") for result in checks.values())
    failed = [c for c in report["checks"] if c["result"] == "FAIL"]
    assert not [c for c in failed if "modem" in c["name"] or "sim" in c["name"] or "binding" in c["name"]], failed

    assert agent.stop() == 0
    direct = agent.cli("status", "--json", check=True)  # no daemon: the CLI opens the modem itself
    assert comparable(json.loads(direct.stdout)) == comparable(via_daemon)
