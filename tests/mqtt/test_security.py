"""TLS, password authentication, MQTT 5 refusals, and a broker that hangs: the reporter
connects where it should, refuses where it should, says why in one line, never blocks
the loop and never logs a secret."""

import asyncio
import dataclasses
import re
import logging
import socket
import threading
import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.service.reporter import Reporter, SettingsError, Topics, response_topic_problem
from agent.core.config import TlsConfig

PASSWORD = "correct horse battery staple"


def _tls(tls_material, **changes) -> TlsConfig:
    fields = {"ca_file": tls_material.ca_file, **changes}
    return TlsConfig(enabled=True, **{key: str(value) if value is not None else "" for key, value in fields.items()})


async def _refused(reporter: Reporter, mq, caplog, text: str) -> str:
    async with mq.running(reporter, connected=False):
        await mq.until(lambda: any(text in r.getMessage() for r in caplog.records), 10, f"log line with {text!r}")
        assert not reporter.connected
    return next(r.getMessage() for r in caplog.records if text in r.getMessage())


def test_tls_with_the_right_ca_connects(make_broker, subscriber, tls_material, store, mq):
    broker = make_broker(tls=tls_material)
    sub = subscriber(broker, f"{mq.PREFIX}/status")

    async def scenario():
        settings = mq.reporter_settings(broker, host="localhost", tls=_tls(tls_material))
        async with mq.running(Reporter(settings, store, device_id=mq.DEVICE_ID)) as reporter:
            assert reporter.link_status()["tls"] is True
            await mq.wait_sub(sub, lambda s: s.documents("/status"))

    asyncio.run(scenario())


def test_tls_with_a_wrong_ca_is_refused_with_a_clear_line(make_broker, tls_material, store, mq, caplog):
    broker = make_broker(tls=tls_material)
    settings = mq.reporter_settings(broker, tls=_tls(tls_material, ca_file=tls_material.other_ca_file))
    reporter = Reporter(settings, store, device_id=mq.DEVICE_ID, backoff=mq.quick_backoff())
    line = asyncio.run(_refused(reporter, mq, caplog, "TLS: broker certificate not accepted"))
    assert re.search(r"not accepted \(.*certificate.*\)", line), line
    assert ": TLS" in reporter.last_error


def test_client_certificate_required_by_the_broker(make_broker, tls_material, store, mq, caplog):
    broker = make_broker(tls=tls_material, require_certificate=True)
    with_cert = _tls(tls_material, cert_file=tls_material.client_cert, key_file=tls_material.client_key)

    async def connects():
        settings = mq.reporter_settings(broker, tls=with_cert)
        async with mq.running(Reporter(settings, store, device_id=mq.DEVICE_ID)):
            pass

    asyncio.run(connects())
    without = Reporter(mq.reporter_settings(broker, tls=_tls(tls_material)), store, device_id=mq.DEVICE_ID, backoff=mq.quick_backoff())
    asyncio.run(_refused(without, mq, caplog, "MQTT 127.0.0.1"))
    assert "certificate required" in without.last_error


def test_encrypted_client_key_needs_its_password_file_and_never_prompts(make_broker, tls_material, store, mq, tmp_path):
    broker = make_broker(tls=tls_material, require_certificate=True)
    encrypted = _tls(tls_material, cert_file=tls_material.client_cert, key_file=tls_material.encrypted_client_key)
    with pytest.raises(SettingsError, match="is encrypted and no key_password_file is set"):
        Reporter(mq.reporter_settings(broker, tls=encrypted), store, device_id=mq.DEVICE_ID)
    wrong = tmp_path / "wrong-pass"
    wrong.write_text("not the pass phrase\n")
    encrypted = dataclasses.replace(encrypted, key_password_file=str(wrong))
    with pytest.raises(SettingsError) as refused:
        Reporter(mq.reporter_settings(broker, tls=encrypted), store, device_id=mq.DEVICE_ID)
    assert "not the pass phrase" not in str(refused.value)
    right = tmp_path / "key-pass"
    right.write_text(tls_material.key_password + "\n")
    encrypted = dataclasses.replace(encrypted, key_password_file=str(right))

    async def connects():
        async with mq.running(Reporter(mq.reporter_settings(broker, tls=encrypted), store, device_id=mq.DEVICE_ID)):
            pass

    asyncio.run(connects())


def test_plaintext_only_when_tls_is_disabled_and_then_with_a_warning(mosquitto, store, mq, caplog, tls_material):
    Reporter(mq.reporter_settings(mosquitto), store, device_id=mq.DEVICE_ID)
    assert "traffic to 127.0.0.1" in caplog.text and "plaintext" in caplog.text
    caplog.clear()
    Reporter(mq.reporter_settings(mosquitto, tls=_tls(tls_material)), store, device_id=mq.DEVICE_ID)
    assert "plaintext" not in caplog.text


def test_password_auth_ok_and_wrong_password_refused_without_leaking_it(make_broker, subscriber, store, mq, caplog, tmp_path):
    acl = f"user agent\ntopic readwrite {mq.PREFIX}/#\nuser platform\ntopic read {mq.PREFIX}/#"
    broker = make_broker(users={"agent": PASSWORD, "platform": "platform-pass"}, acl=acl)
    sub = subscriber(broker, f"{mq.PREFIX}/#", username="platform", password="platform-pass")
    caplog.set_level(logging.DEBUG)
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(PASSWORD + "\n")

    async def connects():
        settings = mq.reporter_settings(broker, username="agent", password_file=str(password_file))
        async with mq.running(Reporter(settings, store, device_id=mq.DEVICE_ID)):
            store.record("agent_started", {})
            await mq.wait_sub(sub, lambda s: s.documents("/events"))

    asyncio.run(connects())
    password_file.write_text("guess\n")
    for protocol in ("3.1.1", "5"):
        wrong = Reporter(mq.reporter_settings(broker, username="agent", password_file=str(password_file), protocol=protocol),
                         store, device_id=mq.DEVICE_ID, backoff=mq.quick_backoff())
        line = asyncio.run(_refused(wrong, mq, caplog, "broker refused the connection"))
        assert "broker refused the connection: Not authorized;" in line  # mosquitto's answer to a bad password
    assert PASSWORD not in caplog.text and "guess" not in caplog.text


def test_unreadable_password_file_is_a_settings_error(mosquitto, store, mq, tmp_path):
    with pytest.raises(SettingsError, match=r"cannot read \[mqtt\] password_file .*missing"):
        Reporter(mq.reporter_settings(mosquitto, username="agent", password_file=str(tmp_path / "missing")), store, device_id=mq.DEVICE_ID)


def test_mqtt5_refused_publish_keeps_the_row_until_the_broker_accepts_it(make_broker, subscriber, store, mq, caplog):
    allow_status_only = f"user agent\ntopic write {mq.PREFIX}/status\ntopic read {mq.PREFIX}/cmd\nuser platform\ntopic read {mq.PREFIX}/#"
    broker = make_broker(users={"agent": PASSWORD, "platform": "p"}, acl=allow_status_only)
    sub = subscriber(broker, f"{mq.PREFIX}/events", username="platform", password="p")

    async def scenario(password_file):
        settings = mq.reporter_settings(broker, username="agent", password_file=password_file, protocol="5")
        reporter = Reporter(settings, store, device_id=mq.DEVICE_ID, backoff=mq.quick_backoff(), retry_refused_after=0.2)
        async with mq.running(reporter):
            store.record("sim_removed", {})
            await mq.until(lambda: any("refused outbox message" in r.getMessage() for r in caplog.records), what="refusal")
            assert store.outbox_depth()["event"] == 1  # a refused PUBACK deletes nothing
            broker.reload(acl=allow_status_only + f"\nuser agent\ntopic write {mq.PREFIX}/events")
            await mq.wait_sub(sub, lambda s: s.documents("/events"), what="the event after the ACL allowed it")
            await mq.until(lambda: store.outbox_depth()["event"] == 0, what="row deleted after PUBACK")

    password_file = broker.directory / "agent-password"
    password_file.write_text(PASSWORD)
    asyncio.run(scenario(str(password_file)))
    assert [d["type"] for d in sub.documents("/events")] == ["sim_removed"]
    assert "Not authorized" in caplog.text


def test_a_hanging_broker_never_blocks_the_loop(store, mq, caplog):
    """A listener that accepts TCP and never answers the TLS handshake: the connect waits
    out its timeout in a worker thread while the loop keeps running."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()

    class Hanging:
        host, port = listener.getsockname()

    settings = mq.reporter_settings(Hanging, tls=TlsConfig(enabled=True))
    reporter = Reporter(settings, store, device_id=mq.DEVICE_ID, backoff=mq.quick_backoff(), connect_timeout=1.0)

    async def scenario():
        lags = []
        async with mq.running(reporter, connected=False):
            start = time.monotonic()
            while time.monotonic() - start < 1.5:
                before = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - before)
            await mq.until(lambda: reporter.last_error, what="a logged cause")
        return max(lags)

    try:
        worst = asyncio.run(scenario())
    finally:
        listener.close()
    assert accepted, "the reporter never reached the listener"
    assert worst < 0.5
    assert "timed out" in reporter.last_error


def test_mqtt5_reply_goes_to_the_response_topic_with_correlation_data(mosquitto, subscriber, store, mq):
    sub = subscriber(mosquitto, "#")

    async def on_command(payload: bytes, *, retained: bool) -> dict:
        return {"schema": "simagent/cmd_result/1", "id": "c1", "ok": True, "result": {"echo": len(payload)}}

    async def scenario():
        settings = mq.reporter_settings(mosquitto, protocol="5")
        async with mq.running(Reporter(settings, store, device_id=mq.DEVICE_ID, on_command=on_command)):
            await mq.wait_sub(sub, lambda s: s.messages("/status"))
            await asyncio.sleep(0.1)  # the reporter's subscription follows its status
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = "platform/replies/42"
            properties.CorrelationData = b"\x00corr-7"
            sub.publish(f"{mq.PREFIX}/cmd", b'{"id":"c1","name":"ping","args":{}}', properties=properties)
            await mq.wait_sub(sub, lambda s: s.messages("/cmd/result") and s.messages("replies/42"))

    asyncio.run(scenario())
    reply = sub.messages("replies/42")[0]
    assert reply.properties.CorrelationData == b"\x00corr-7"
    assert reply.json() == sub.messages("/cmd/result")[0].json()


@pytest.mark.parametrize("topic, refused", [
    ("platform/replies/42", False),
    ("simagent/864505040000013/other", False),  # under the prefix, but no agent topic
    ("simagent/864505040000013/cmd", True),  # its own commands: the reply would come back as one
    ("simagent/864505040000013/events", True),  # its own streams: a reply would pass for an event...
    ("simagent/864505040000013/state", True),
    ("simagent/490154203237518/cmd", True),  # ...or for another device's command
    ("simagent/490154203237518/cmd/result", True),
    ("simagent/+/cmd", True), ("$SYS/x", True), ("", True), ("a" * 300, True),
])
def test_a_response_topic_is_never_an_agents_topic(topic, refused):
    topics = Topics.for_device("simagent/{device_id}", "864505040000013")
    assert (response_topic_problem(topic, topics) is not None) == refused
