"""Hostile and valid platform commands: every refusal is an error reply plus a
`command_refused` event, and nothing else changes."""

import asyncio
import dataclasses
import json
import time
import uuid

import jsonschema
import jwt
import pytest

from agent.core.store import TIME_FLOOR_KEY
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings, strategies as st

from agent.core.operations import TELEMETRY_INTERVAL_RANGE
from agent.service.platform_commands import MAX_COMMAND_BYTES, CommandError, CommandProcessor
from agent.service.reporter import Reporter
from agent.core.store import Binding

SIGNING_KEY = Ed25519PrivateKey.generate()
IMEI = "490154203237518"
ICCID = "89860012345678901234"


class TokenRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def token(act: str = "rebind", *, exp_in: float = 3600, key=SIGNING_KEY, jti: str | None = None) -> str:
    claims = {"sub": IMEI, "iccid": ICCID, "act": act, "exp": int(time.time() + exp_in), "jti": jti or str(uuid.uuid4())}
    return jwt.encode(claims, key, algorithm="EdDSA")


def make_processor(store):
    """A processor with small real handlers and a real EdDSA verifier that burns jti."""
    calls: list[str] = []

    async def verify(encoded: str, action: str) -> dict:
        try:
            claims = jwt.decode(encoded, SIGNING_KEY.public_key(), algorithms=["EdDSA"],
                                options={"require": ["sub", "iccid", "act", "exp", "jti"]})
        except jwt.ExpiredSignatureError:
            raise TokenRefused("token_expired", "token expired") from None
        except jwt.InvalidTokenError as exc:
            raise TokenRefused("token_invalid", str(exc)) from None
        allowed = {"rebind": "rebind", "unbind": "unbind"}.get(action)
        if allowed is not None and claims["act"] != allowed:
            raise TokenRefused("token_wrong_action", f"token is for {claims['act']}, not {action}")
        with store.transaction() as tx:
            if not tx.use_token_id(claims["jti"], claims["exp"], store.clock.now()):
                raise TokenRefused("token_replayed", "token already used")
        return claims

    async def ping(command):
        calls.append("ping")
        return {"pong": True}

    async def set_interval(command):
        calls.append("set_telemetry_interval")
        with store.transaction() as tx:
            tx.set_meta("telemetry_interval", command.args["interval"])
        return {"interval": command.args["interval"]}

    async def rebind(command):
        calls.append("rebind")
        if command.claims["iccid"] != ICCID:
            raise CommandError("wrong_sim", "token is for another card")
        with store.transaction() as tx:
            tx.put_binding(Binding(command.claims["iccid"], command.claims["sub"], "2026-01-01T00:00:00.000Z", "token"))
            tx.record("bound", {"iccid": command.claims["iccid"], "imei": command.claims["sub"]})
        return {"bound": True}

    async def at(command):
        calls.append("at:" + command.args["command"])
        return {"response": ["OK"]}

    processor = CommandProcessor(
        store=store,
        handlers={"ping": ping, "set_telemetry_interval": set_interval, "rebind": rebind, "at": at},
        verify_token=verify,
    )
    return processor, calls


def snapshot(store) -> dict:
    read = store.read()
    # The event counter and the trusted-time floor move with every record, refusals included.
    meta = {k: v for k, v in read._conn.execute("SELECT key, value FROM meta") if k not in ("event_seq", TIME_FLOOR_KEY)}
    return {
        "bindings": read.bindings(),
        "tokens": read._conn.execute("SELECT jti FROM used_tokens ORDER BY jti").fetchall(),
        "meta": meta,
    }


def refused_events(store) -> list[dict]:
    return [json.loads(r.payload) for r in store.outbox_pending(10_000) if r.kind == "event" and '"command_refused"' in r.payload]


def run(processor, payload: bytes | str | dict) -> dict:
    if isinstance(payload, dict):
        payload = json.dumps(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return asyncio.run(processor.handle(payload))


HOSTILE = [
    ("malformed JSON", b'{"id": "1", "name": "ping"', "malformed", None),
    ("not UTF-8", b'\xff\xfe{"id":"1"}', "malformed", None),
    ("not an object", b'["ping"]', "malformed", None),
    ("absurd nesting", b"[" * 60_000, "malformed", None),
    ("oversized", json.dumps({"id": "big", "name": "ping", "args": {}, "pad": "x" * MAX_COMMAND_BYTES}).encode(), "too_large", None),
    ("no id", {"name": "ping", "args": {}}, "bad_request", None),
    ("id too long", {"id": "x" * 129, "name": "ping"}, "bad_request", None),
    ("unknown field", {"id": "c", "name": "ping", "args": {}, "sudo": True}, "bad_request", "c"),
    ("wrong schema", {"schema": "simagent/command/9", "id": "c", "name": "ping"}, "bad_request", "c"),
    ("name not a string", {"id": "c", "name": ["ping"]}, "bad_request", "c"),
    ("unknown name", {"id": "c", "name": "format_disk", "args": {}}, "unknown_command", "c"),
    ("args not an object", {"id": "c", "name": "ping", "args": [1]}, "bad_args", "c"),
    ("unknown argument", {"id": "c", "name": "ping", "args": {"x": 1}}, "bad_args", "c"),
    ("interval missing", {"id": "c", "name": "set_telemetry_interval", "args": {}}, "bad_args", "c"),
    ("interval too small", {"id": "c", "name": "set_telemetry_interval", "args": {"interval": 1}}, "bad_args", "c"),
    ("interval too large", {"id": "c", "name": "set_telemetry_interval", "args": {"interval": 10**9}}, "bad_args", "c"),
    ("interval a bool", {"id": "c", "name": "set_telemetry_interval", "args": {"interval": True}}, "bad_args", "c"),
    ("interval a string", {"id": "c", "name": "set_telemetry_interval", "args": {"interval": "60"}}, "bad_args", "c"),
    ("at with a line break", {"id": "c", "name": "at", "args": {"command": "AT+CGSN\r\nAT+CFUN=0"}}, "bad_args", "c"),
    # Joined commands are classified one by one (agent.core.at_rules, as for the control
    # socket): a write among them needs a token.
    ("at with two commands", {"id": "c", "name": "at", "args": {"command": "AT+CGSN;+CFUN=0"}}, "token_required", "c"),
    ("at not AT", {"id": "c", "name": "at", "args": {"command": "rm -rf /"}}, "bad_args", "c"),
    ("at write without token", {"id": "c", "name": "at", "args": {"command": "AT+CFUN=0"}}, "token_required", "c"),
    ("IMEI rewrite even with a token", {"id": "c", "name": "at", "args": {"command": "AT+EGMR=1,7,\"490154203237518\""},
                                        "token": token("at")}, "imei_rewrite_refused", "c"),
    ("rebind without token", {"id": "c", "name": "rebind", "args": {}}, "token_required", "c"),
    ("rebind with expired token", {"id": "c", "name": "rebind", "token": token(exp_in=-60)}, "token_expired", "c"),
    ("rebind with a foreign key", {"id": "c", "name": "rebind", "token": token(key=Ed25519PrivateKey.generate())}, "token_invalid", "c"),
    ("rebind with garbage token", {"id": "c", "name": "rebind", "token": "not.a.jwt"}, "token_invalid", "c"),
    ("rebind with an unbind token", {"id": "c", "name": "rebind", "token": token("unbind")}, "token_wrong_action", "c"),
    ("token not a string", {"id": "c", "name": "rebind", "token": 42}, "bad_request", "c"),
    ("command without a handler", {"id": "c", "name": "diag", "args": {}}, "unsupported", "c"),
]


@pytest.mark.parametrize("payload, code, reply_id", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_command_is_refused_recorded_and_changes_nothing(store, payload, code, reply_id, validate_message):
    processor, calls = make_processor(store)
    before = snapshot(store)
    reply = run(processor, payload)
    validate_message(reply, "cmd_result")
    assert reply["ok"] is False and reply["error"]["code"] == code and reply["id"] == reply_id
    [event] = refused_events(store)
    validate_message(event, "event")
    assert event["data"]["code"] == code and event["data"]["command_id"] == reply_id
    if isinstance(payload, dict) and isinstance(payload.get("token"), str):
        assert payload["token"] not in json.dumps(event)  # a credential never reaches MQTT
    assert snapshot(store) == before
    assert calls == []


def test_valid_commands_run_their_handlers(store, validate_message):
    processor, calls = make_processor(store)
    assert run(processor, {"schema": "simagent/command/1", "id": "1", "name": "ping"}) == \
        {"schema": "simagent/cmd_result/1", "id": "1", "ok": True, "result": {"pong": True}}
    reply = run(processor, {"id": "2", "name": "set_telemetry_interval", "args": {"interval": 60}})
    assert reply["ok"] and store.read().get_meta("telemetry_interval") == 60
    assert run(processor, {"id": "3", "name": "at", "args": {"command": "AT+CGSN"}})["ok"]  # a query needs no token
    assert run(processor, {"id": "4", "name": "at", "args": {"command": "AT+CFUN=4"}, "token": token("at")})["ok"]
    for payload in ({"id": "1", "name": "ping"}, {"id": "2", "name": "set_telemetry_interval", "args": {"interval": 60}}):
        validate_message(payload, "command")
    assert calls == ["ping", "set_telemetry_interval", "at:AT+CGSN", "at:AT+CFUN=4"]
    assert refused_events(store) == []


def test_the_telemetry_interval_the_configuration_accepts_is_accepted_by_the_agent_and_the_schema(
        store, validate_message):
    """The schema a platform validates with said at least 10 s while the configuration and
    the agent take 5 s: a platform could not send what a terminal's own config may hold."""
    low, high = TELEMETRY_INTERVAL_RANGE
    assert low == 5
    processor, _calls = make_processor(store)
    for interval in (low, high):
        command = {"id": f"i{interval}", "name": "set_telemetry_interval", "args": {"interval": interval}}
        validate_message(command, "command")
        assert run(processor, command)["ok"]
    for interval in (low - 1, high + 1):
        command = {"id": f"i{interval}", "name": "set_telemetry_interval", "args": {"interval": interval}}
        with pytest.raises(jsonschema.ValidationError):
            validate_message(command, "command")
        assert run(processor, command)["error"]["code"] == "bad_args"


def test_a_token_is_accepted_once(store, validate_message):
    processor, calls = make_processor(store)
    signed = token("rebind")
    first = run(processor, {"id": "r1", "name": "rebind", "token": signed})
    assert first["ok"] and [b.iccid for b in store.read().bindings()] == [ICCID]
    before = snapshot(store)
    replay = run(processor, {"id": "r2", "name": "rebind", "token": signed})
    validate_message(replay, "cmd_result")
    assert replay["error"]["code"] == "token_replayed"
    assert snapshot(store) == before and calls == ["rebind"]
    assert [e["data"]["code"] for e in refused_events(store)] == ["token_replayed"]


def test_a_handler_refusal_and_a_handler_bug_are_replies_not_crashes(store):
    processor, _ = make_processor(store)

    async def broken(command):
        raise ZeroDivisionError("bug")

    processor.handlers = {**processor.handlers, "ping": broken}
    assert run(processor, {"id": "b", "name": "ping"})["error"]["code"] == "internal_error"
    other_card = jwt.encode({"sub": IMEI, "iccid": "89860099999999999999", "act": "rebind", "exp": int(time.time()) + 60,
                             "jti": "j-other"}, SIGNING_KEY, algorithm="EdDSA")
    assert run(processor, {"id": "w", "name": "rebind", "token": other_card})["error"]["code"] == "wrong_sim"
    assert [e["data"]["code"] for e in refused_events(store)] == ["internal_error", "wrong_sim"]
    assert store.read().bindings() == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["id", "name", "args", "token", "schema", "x"]), inner, max_size=5),
                 max_leaves=12).map(lambda v: json.dumps(v).encode()),
))
def test_fuzzed_commands_always_get_a_valid_reply(store, payload, validate_message):
    processor, calls = make_processor(store)
    reply = run(processor, payload)
    validate_message(reply, "cmd_result")
    assert calls == [] or reply["ok"]


def test_hostile_commands_over_mqtt(mosquitto, subscriber, store, mq):
    sub = subscriber(mosquitto, f"{mq.PREFIX}/#")
    processor, calls = make_processor(store)
    hostile = [b"{nope", b"x" * (MAX_COMMAND_BYTES + 1), b'{"id":"u","name":"self_destruct","args":{}}',
               b'{"id":"t","name":"unbind","args":{},"token":"forged"}']

    async def scenario():
        reporter = Reporter(mq.reporter_settings(mosquitto), store, device_id=mq.DEVICE_ID, on_command=processor.handle)
        async with mq.running(reporter):
            await mq.wait_sub(sub, lambda s: s.messages("/status"))
            await asyncio.sleep(0.1)  # the reporter's subscription follows its status
            before = snapshot(store)
            for payload in hostile:
                sub.publish(f"{mq.PREFIX}/cmd", payload)
            await mq.wait_sub(sub, lambda s: len(s.messages("/cmd/result")) == 4 and len(s.messages("/events")) == 4)
            sub.publish(f"{mq.PREFIX}/cmd", b'{"id":"p","name":"ping"}')
            await mq.wait_sub(sub, lambda s: len(s.messages("/cmd/result")) == 5)
            assert snapshot(store) == before

    asyncio.run(scenario())
    replies = sub.documents("/cmd/result")
    assert [r["error"]["code"] for r in replies[:4]] == ["malformed", "too_large", "unknown_command", "token_invalid"]
    assert replies[4] == {"schema": "simagent/cmd_result/1", "id": "p", "ok": True, "result": {"pong": True}}
    assert [e["type"] for e in sub.documents("/events")] == ["command_refused"] * 4
    assert calls == ["ping"]


def test_a_flood_is_summarised_and_no_genuine_command_is_lost(mosquitto, subscriber, store, mq):
    """900 hostile commands with 30 pings among them, as fast as a client can publish:
    every ping gets its reply (commands are PUBACKed only once handled, so none is dropped
    after its PUBACK), and the refusals cost a bounded number of durable records. (The
    backlog waits in the broker, whose per-client queue is bounded too: mosquitto's
    max_queued_messages, 1,000 by default.)"""
    from agent.service.platform_commands import REFUSALS_RECORDED

    sub = subscriber(mosquitto, f"{mq.PREFIX}/#")
    processor, calls = make_processor(store)
    processor.refusal_window = 0.5
    flood, pings = 900, 30

    async def scenario():
        reporter = Reporter(mq.reporter_settings(mosquitto), store, device_id=mq.DEVICE_ID, on_command=processor.handle)
        async with mq.running(reporter):
            await mq.wait_sub(sub, lambda s: s.messages("/status"))
            await asyncio.sleep(0.1)
            for n in range(flood):
                sub.publish(f"{mq.PREFIX}/cmd", b'{"id":"x%d","name":"self_destruct"}' % n)
                if n % (flood // pings) == 0:
                    sub.publish(f"{mq.PREFIX}/cmd", b'{"id":"p%d","name":"ping"}' % n)
            await mq.wait_sub(sub, lambda s: len(s.messages("/cmd/result")) == flood + pings, timeout=60)
            await mq.wait_sub(sub, lambda s: any(b'"burst":true' in m.payload for m in s.messages("/events")))

    asyncio.run(scenario())
    replies = sub.documents("/cmd/result")
    assert sum(1 for r in replies if r["ok"]) == pings and calls == ["ping"] * pings
    records = [e for e, _ in store.evidence_entries() if e["type"] == "command_refused"]
    assert REFUSALS_RECORDED <= len(records) <= REFUSALS_RECORDED * 4, len(records)
    summarised = sum(e["data"].get("count", 0) for e in records if e["data"].get("burst"))
    assert summarised + sum(1 for e in records if not e["data"].get("burst")) == flood


def test_the_platform_may_set_every_telemetry_interval_the_configuration_accepts():
    """Issue 13: `[telemetry] interval = 5` was valid while `set_telemetry_interval` refused 5 s."""
    from agent.core.config import TelemetryConfig
    from agent.core.operations import OPERATIONS, OperationRefused

    low, high = next(f for f in dataclasses.fields(TelemetryConfig) if f.name == "interval").metadata["setting"]["range"]
    check = OPERATIONS["set_telemetry_interval"].check_args
    check({"interval": int(low)})
    check({"interval": int(high)})
    with pytest.raises(OperationRefused):
        check({"interval": int(low) - 1})


def test_a_retained_command_is_refused_not_carried_out_at_every_connect(mosquitto, subscriber, store, mq, validate_message,
                                                                       request):
    """SPEC §6: P/cmd is not retained. A retained command (left there by anyone who may
    publish, days ago) comes again at every subscribe: carried out, it would run at every
    reconnect and restart, undoing whatever was set since. It is refused, each time."""
    sub = subscriber(mosquitto, f"{mq.PREFIX}/cmd/result")
    sub.client.publish(f"{mq.PREFIX}/cmd", b'{"id":"old-1","name":"set_telemetry_interval","args":{"interval":5}}',
                       qos=1, retain=True).wait_for_publish(10)
    processor, calls = make_processor(store)
    request.addfinalizer(lambda: sub.client.publish(f"{mq.PREFIX}/cmd", b"", qos=1, retain=True).wait_for_publish(10))

    async def scenario():
        for _session in range(2):  # a restart; a reconnect subscribes again too
            reporter = Reporter(mq.reporter_settings(mosquitto), store, device_id=mq.DEVICE_ID, on_command=processor.handle)
            async with mq.running(reporter):
                await mq.wait_sub(sub, lambda s: sum(d["id"] == "old-1" for d in s.documents("/cmd/result")) == _session + 1)
                if _session:
                    await mq.wait_sub(sub, lambda s: any(d["id"] == "queued" for d in s.documents("/cmd/result")))
            # Sent while the agent is away: its session keeps it (not retained), so it is carried out.
            sub.publish(f"{mq.PREFIX}/cmd", b'{"id":"queued","name":"ping"}')

    asyncio.run(scenario())
    replies = sub.documents("/cmd/result")
    for reply in replies:
        validate_message(reply, "cmd_result")
    assert [(r["ok"], r["error"]["code"]) for r in replies if r["id"] == "old-1"] == [(False, "retained")] * 2
    assert [r["ok"] for r in replies if r["id"] == "queued"] == [True]
    assert calls == ["ping"] and store.read().get_meta("telemetry_interval") is None
    refused = [e["data"] for e, _ in store.evidence_entries() if e["type"] == "command_refused"]
    assert [(r["command_id"], r["code"]) for r in refused] == [("old-1", "retained")] * 2


def test_a_refusal_copies_no_unbounded_attacker_text(store):
    """An unknown command name or field names were copied whole into the reply, the evidence
    entry and the event: up to 64 KiB of anybody's text per refusal, kept for good."""
    processor, _ = make_processor(store)
    big = "A" * 60_000
    sizes = {}
    for label, document in (("name", {"id": "n", "name": big}), ("field", {"id": "f", "name": "ping", big: 1}),
                            ("arg", {"id": "a", "name": "ping", "args": {big: 1}})):
        reply = asyncio.run(processor.handle(json.dumps(document).encode()))
        assert reply["ok"] is False
        sizes[f"{label} reply"] = len(json.dumps(reply))
    for i, (entry, _) in enumerate(e for e in store.evidence_entries() if e[0]["type"] == "command_refused"):
        sizes[f"record {i}"] = len(json.dumps(entry))
    assert len(sizes) == 6 and max(sizes.values()) < 2_000, sizes
