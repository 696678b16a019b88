"""`simagent-platform` without a daemon: its exit codes and one-line errors, the tokens
it mints (checked by the agent's verifier), `send` matching its reply by id against a
responder on a real mosquitto, `fleet` with hostile retained documents and behind a
broker that refuses MQTT 5."""

from __future__ import annotations

import json
import time

import jwt
import pytest

from agent import exitcodes
from agent.core import tokens
from agent.core.clock import Stamp
from agent.core.evidence import parse_public_key
from agent.platform.cli import build_parser, main
from agent.platform.link import MAX_PAYLOAD

IMEI = "864505040000013"
ICCID = "89860321234567890123"
P = f"simagent/{IMEI}"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: --help and usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def operator_key(tmp_path, capsys) -> tuple[str, dict]:
    path = tmp_path / "op.key"
    code, out, err = run(capsys, "keygen", "--out", str(path), "--json")
    assert code == 0, err
    return str(path), json.loads(out)


def test_every_command_has_help(capsys):
    commands = ["keygen", "token", "send", "fleet", "watch", "evidence", "evidence verify"]
    for command in [""] + commands:
        code, out, _ = run(capsys, *command.split(), "--help")
        assert code == 0 and out.startswith("usage: simagent-platform"), command


def test_keygen_makes_a_key_the_agent_trusts_and_tokens_it_accepts(operator_key, capsys, tmp_path):
    path, made = operator_key
    code, out, err = run(capsys, "keygen", "--out", path)
    assert code == exitcodes.USAGE and out == "" and err.count("\n") == 1 and "exists" in err  # never overwritten silently
    keys = tokens.load_trusted_keys([made["trusted_key"]])  # the terminal's own parser of trusted_keys
    assert keys[0].id == made["kid"]
    assert parse_public_key(open(made["public_key"]).read()).public_bytes_raw() == keys[0].raw

    minted = []
    for _ in range(2):
        code, out, err = run(capsys, "token", "rebind", "--key", path, "--device", IMEI, "--iccid", ICCID, "--ttl", "2h")
        assert code == 0, err
        minted.append(out.strip())
    now = Stamp(wall=time.time(), trusted=True, mono=0.0, boot_id="test")
    claims = tokens.verify_token(minted[0], keys, IMEI, now, None, actions=("rebind",))
    assert (claims.sub, claims.iccid, claims.act, claims.exp - claims.iat) == (IMEI, ICCID, "rebind", 7200)
    assert abs(claims.iat - time.time()) < 5
    assert jwt.get_unverified_header(minted[0])["kid"] == made["kid"]
    assert claims.jti != tokens.verify_token(minted[1], keys, IMEI, now, None).jti  # each token used once: jti random
    with pytest.raises(tokens.TokenError, match="wrong_device"):
        tokens.verify_token(minted[0], keys, "864505040000021", now, None)

    code, out, err = run(capsys, "token", "modem-reset", "--key", path, "--device", IMEI)
    claims = tokens.verify_token(out.strip(), keys, IMEI, now, None, actions=("modem_reset",))
    assert claims.act == "modem_reset" and claims.exp - claims.iat == 600  # the default --ttl 10m


@pytest.mark.parametrize("argv, words", [
    (["token", "rebind", "--key", "{key}", "--device", IMEI], "needs --iccid"),
    (["token", "unbind", "--key", "{key}", "--device", "12ab", "--iccid", ICCID], "would refuse this token"),
    (["token", "at", "--key", "{key}", "--device", IMEI, "--ttl", "30d"], "--ttl"),
    (["token", "at", "--key", "{key}.pub", "--device", IMEI], "readable by others"),
    (["token", "at", "--key", "/nonexistent/op.key", "--device", IMEI], "cannot read"),
    (["token", "format", "--key", "{key}", "--device", IMEI], "invalid choice"),
    (["send", "--device", IMEI, "ping"], "--broker URL is required"),
    (["send", "--broker", "http://broker", "--device", IMEI, "ping"], "expected mqtt://HOST"),
    (["send", "--broker", "mqtt://127.0.0.1:1", "--device", IMEI, "format_disk"], "unknown command"),
    (["send", "--broker", "mqtt://127.0.0.1:1", "--device", IMEI, "set_telemetry_interval", "interval=4"], ">= 5"),
    (["send", "--broker", "mqtt://127.0.0.1:1", "--device", IMEI, "unbind"], "needs --token"),
    (["send", "--broker", "mqtt://127.0.0.1:1", "--device", IMEI, "at", "command=AT+CFUN=1"], "needs --token"),
    (["send", "--broker", "mqtt://127.0.0.1:1", "--device", IMEI, "at", 'command=AT+EGMR=1,7,"1"', "--token", "x"], "rewrites the IMEI"),
    (["send", "--broker", "mqtt://127.0.0.1:1", "--ca-file", "/x", "--device", IMEI, "ping"], "need an mqtts:// broker"),
    (["fleet", "--broker", "mqtt://127.0.0.1:1", "--prefix", "fleet/+/x"], "--prefix"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, words, operator_key, capsys):
    code, out, err = run(capsys, *[a.replace("{key}", operator_key[0]) for a in argv])
    last = err.strip().splitlines()[-1]  # argparse's own errors come after its usage lines
    assert code == exitcodes.USAGE and out == "" and words in last and last.startswith("simagent-platform"), err
    assert "Traceback" not in err


def test_a_broker_that_is_not_there_is_exit_69(capsys, mosquitto):
    port = mosquitto.port
    mosquitto.stop()
    for command in (["send", "--device", IMEI, "ping"], ["fleet"], ["watch"]):
        code, out, err = run(capsys, command[0], "--broker", f"mqtt://127.0.0.1:{port}", *command[1:])
        assert code == exitcodes.UNAVAILABLE and err == f"simagent-platform: 127.0.0.1:{port}: connection refused (broker down?)\n"


def test_send_prints_the_reply_with_its_own_id(mosquitto, subscriber, capsys):
    """A responder that first answers with another id (an earlier request's reply), then
    with the command's own: send takes only its own."""
    terminal = subscriber(mosquitto, f"{P}/cmd")
    commands = []

    def respond(client, userdata, message):
        command = json.loads(message.payload)
        commands.append(command)
        ok = command["name"] == "ping"
        for request_id in ("p-someone-else", command["id"]):
            reply = {"schema": "simagent/cmd_result/1", "id": request_id, "ok": ok}
            reply.update({"result": {"pong": request_id == command["id"]}} if ok else {"error": {"code": "replayed", "message": "used before"}})
            client.publish(f"{P}/cmd/result", json.dumps(reply), qos=1)

    terminal.client.on_message = respond
    broker = f"mqtt://127.0.0.1:{mosquitto.port}"
    code, out, err = run(capsys, "send", "--broker", broker, "--device", IMEI, "ping", "--json")
    assert code == 0, err
    assert json.loads(out)["result"] == {"pong": True}
    assert commands[0]["schema"] == "simagent/command/1" and commands[0]["args"] == {} and "token" not in commands[0]

    code, out, err = run(capsys, "send", "--broker", broker, "--device", IMEI, "unbind", "--token", "t.o.k")
    assert code == 1 and err == f"simagent-platform: {IMEI} refused unbind: replayed: used before\n"
    assert commands[1]["token"] == "t.o.k"


def retained(sub, topic: str, payload: bytes) -> None:
    sub.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)


def test_fleet_shows_hostile_documents_as_invalid_and_escapes_what_it_prints(mosquitto, subscriber, capsys):
    writer = subscriber(mosquitto, "nothing/here")
    status = {"schema": "simagent/status/1", "online": True, "ts": "2026-01-01T00:00:00.000Z\x1b[31m", "agent_version": "1"}
    retained(writer, "simagent/dev-ok/status", json.dumps({**status, "ts": "2026-01-01T00:00:00.000Z"}).encode())
    retained(writer, "simagent/dev-ok/state", json.dumps({"schema": "simagent/state/1", "binding": {"status": "ok"}}).encode())
    retained(writer, "simagent/dev-esc/status", json.dumps(status).encode())
    retained(writer, "simagent/dev-esc/state", b"{not json")
    retained(writer, "simagent/dev-big/status", b"x" * (MAX_PAYLOAD + 1))
    retained(writer, "simagent/dev-big/state", json.dumps({"schema": "simagent/state/1", "binding": "oops"}).encode())
    retained(writer, "simagent/dev-off/status", json.dumps({**status, "online": False, "ts": "2026-01-01T00:00:00.000Z"}).encode())

    code, out, err = run(capsys, "fleet", "--broker", f"mqtt://127.0.0.1:{mosquitto.port}", "--settle", "0.3")
    assert code == 1, err  # an invalid document is a problem
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["DEVICE", "dev-esc", "dev-big", "dev-off", "dev-ok"]
    assert "\x1b" not in out and "\\x1b[31m" in lines[1] and "(invalid state)" in lines[1]
    assert lines[2].split()[1:3] == ["?", "unknown"]  # the oversized status never reached us; "oops" is no table
    assert lines[3].split()[1] == "NO"


def test_fleet_falls_back_to_311_when_the_broker_refuses_mqtt5(mosquitto, mqtt311_only, subscriber, capsys, monkeypatch):
    front = mqtt311_only(mosquitto)
    writer = subscriber(mosquitto, "nothing/here")
    retained(writer, f"{P}/status", json.dumps({"schema": "simagent/status/1", "online": True, "ts": "2026-01-01T00:00:00.000Z",
                                                "agent_version": "1"}).encode())
    monkeypatch.setenv("SIMAGENT_BROKER", f"mqtt://127.0.0.1:{front.port}")  # as the README has it
    code, out, err = run(capsys, "fleet", "--json", "--settle", "0.3")
    assert code == 0 and [r["device"] for r in json.loads(out)] == [IMEI]
    assert f"127.0.0.1:{front.port} refuses MQTT 5" in err and "using MQTT 3.1.1" in err
    assert front.levels == [5, 4]


def test_the_parser_lists_every_command():
    text = build_parser().format_help()
    for command in ("keygen", "token", "send", "fleet", "watch", "evidence"):
        assert command in text
