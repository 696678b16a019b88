"""Platform commands over MQTT, end to end: `P/cmd` in, `P/cmd/result` and events out."""

from __future__ import annotations

import json

from .conftest import FOREIGN_ICCID, HOME_ICCID, IMEI, last_seq, sign_token, swap_to, wait_event, wait_modem
from .gate_rig import evidence_entries

P = f"simagent/{IMEI}"


def send(platform, command: dict | bytes) -> dict:
    """Publishes one command and returns its reply (matched by id; by order for a
    command without a readable id)."""
    replies_before = len(platform.documents(f"{P}/cmd/result"))
    platform.publish(f"{P}/cmd", command if isinstance(command, bytes) else json.dumps(command))

    def reply(sub):
        new = sub.documents(f"{P}/cmd/result")[replies_before:]
        wanted = command.get("id") if isinstance(command, dict) else None
        return next((r for r in new if r["id"] == wanted), None)

    return platform.wait_for(reply, what=f"the reply to {command!r:.80}")


def test_platform_commands_end_to_end(home_modem, agent_process, subscriber, mosquitto):
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)
    wait_event(platform, "radio_restored")
    # The agent subscribes to P/cmd before it publishes its online status on the same link.
    platform.wait_for(lambda sub: any(d["online"] for d in sub.documents(f"{P}/status")), what="online")

    pong = send(platform, {"id": "c-ping", "name": "ping", "args": {}})
    assert pong["ok"] is True and pong["result"]["pong"] is True

    status = send(platform, {"schema": "simagent/command/1", "id": "c-status", "name": "status", "args": {}})
    assert status["ok"] and status["result"]["sim"]["iccid"] == HOME_ICCID
    assert status["result"]["binding"]["status"] == "ok" and status["result"]["mqtt"]["connected"] is True

    interval = send(platform, {"id": "c-tele", "name": "set_telemetry_interval", "args": {"interval": 30}})
    assert interval == {"schema": "simagent/cmd_result/1", "id": "c-tele", "ok": True, "result": {"interval": 30.0}}

    # A foreign card, then the platform makes it this terminal's card with a signed token.
    mark = last_seq(platform)
    swap_to(home_modem, FOREIGN_ICCID)
    wait_event(platform, "radio_blocked", after=mark)
    token = sign_token("rebind", FOREIGN_ICCID)
    mark = last_seq(platform)
    rebind = send(platform, {"id": "c-rebind", "name": "rebind", "args": {}, "token": token})
    assert rebind["ok"] is True and rebind["result"]["accepted"] is True, rebind
    wait_event(platform, "token_accepted", after=mark)
    bound = wait_event(platform, "bound", after=mark)
    assert (bound["data"]["iccid"], bound["data"]["source"]) == (FOREIGN_ICCID, "mqtt")
    wait_event(platform, "radio_restored", after=mark)
    wait_modem(home_modem, lambda s: s["cfun"] == 1, "CFUN=1 for the card made legitimate")

    # An AT write with its own `at` token is carried out; the evidence entry names the command.
    written = send(platform, {"id": "c-at", "name": "at", "args": {"command": "AT+CREG=2"},
                              "token": sign_token("at", FOREIGN_ICCID)})
    assert written["ok"] is True, written
    at_writes = [e["data"] for e in evidence_entries(agent.state_dir) if e["type"] == "at_write"]
    assert at_writes == [{"command_id": "c-at", "command": "AT+CREG=2", "gate": "allowed"}]

    # Hostile input: each gets an error reply and a command_refused event, nothing else.
    hostile = [
        (b'{"id": "c-bad", "name": "ping", ', None, "malformed"),
        ({"id": "c-replay", "name": "rebind", "args": {}, "token": token}, "c-replay", "replayed"),
        ({"id": "c-forged", "name": "unbind", "args": {}, "token": token[:-4] + "AAAA"}, "c-forged", None),
        ({"id": "c-unknown", "name": "format_disk", "args": {}}, "c-unknown", "unknown_command"),
        ({"id": "c-notoken", "name": "modem_reset", "args": {}}, "c-notoken", "token_required"),
        ({"id": "c-imei", "name": "at", "args": {"command": 'AT+EGMR=1,7,"864505040000021"'}, "token": token},
         "c-imei", "imei_rewrite_refused"),
        (b"x" * (64 * 1024 + 1), None, "too_large"),
    ]
    for command, request_id, code in hostile:
        mark = last_seq(platform)
        reply = send(platform, command)
        assert reply["ok"] is False and reply["id"] == request_id, reply
        if code:
            assert reply["error"]["code"] == code, reply
        refused = wait_event(platform, "command_refused", after=mark)
        assert refused["data"]["command_id"] == request_id and refused["data"]["code"] == reply["error"]["code"]
        assert token not in json.dumps(refused)  # a token is a credential: never copied into records

    state = home_modem.state()
    assert state["cfun"] == 1 and state["counters"]["imei_rewrite_attempts"] == 0 and state["iccid"] == FOREIGN_ICCID
    assert agent.running
    bindings = json.loads(agent.cli("bind", "show", "--json", check=True).stdout)["bindings"]
    assert [(b["iccid"], b["imei"]) for b in bindings] == [(FOREIGN_ICCID, IMEI)]  # the replay and forgery changed nothing
    assert agent.stop() == 0
