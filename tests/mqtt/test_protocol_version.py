"""MQTT 5 by default (SPEC §6): a broker's ACL refusal keeps the event, and a broker that
refuses MQTT 5 gets 3.1.1 at once, with a warning in the log."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agent.service.reporter import Reporter
from agent.core.config import MqttConfig

PASSWORD = "agent-pass"


def test_the_shipped_default_is_mqtt5():
    assert MqttConfig().protocol == "5"


@pytest.mark.parametrize("answer", ["3.1.1", "5"])
def test_a_broker_that_refuses_mqtt5_gets_311_at_once_and_the_events(answer, mosquitto, mqtt311_only, subscriber, store, mq, caplog):
    front = mqtt311_only(mosquitto, answer)
    sub = subscriber(mosquitto, f"{mq.PREFIX}/#")
    backoff = mq.CountingBackoff()
    caplog.set_level(logging.INFO)

    async def scenario():
        reporter = Reporter(mq.reporter_settings(front), store, device_id=mq.DEVICE_ID, backoff=backoff)
        async with mq.running(reporter):
            assert reporter.link_status()["protocol"] == "3.1.1"
            store.record("sim_removed", {})
            await mq.wait_sub(sub, lambda s: s.documents("/events"), what="the event over 3.1.1")
            await mq.until(lambda: store.outbox_depth()["event"] == 0, what="row deleted after PUBACK")

    asyncio.run(scenario())
    assert front.levels == [5, 4]  # one MQTT 5 CONNECT, then 3.1.1 (protocol level 4) for good
    assert backoff.delays == 0  # the fall back is a negotiation, not a failure to back off from
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("refuses MQTT 5" in w and "falling back to MQTT 3.1.1" in w for w in warnings), warnings
    assert [d["type"] for d in sub.documents("/events")] == ["sim_removed"]


def test_protocol_311_never_asks_for_mqtt5(mosquitto, mqtt311_only, store, mq):
    front = mqtt311_only(mosquitto)

    async def scenario():
        async with mq.running(Reporter(mq.reporter_settings(front, protocol="3.1.1"), store, device_id=mq.DEVICE_ID)):
            pass

    asyncio.run(scenario())
    assert front.levels == [4]


def test_by_default_an_event_the_acl_refuses_stays_in_the_outbox_and_is_reported(make_broker, subscriber, store, mq):
    """Under 3.1.1 mosquitto would PUBACK the denied publish and drop it; the default
    (MQTT 5) gets a refusal, keeps the row, says so in the link status and delivers the
    event once the ACL allows it."""
    status_only = f"user agent\ntopic write {mq.PREFIX}/status\ntopic read {mq.PREFIX}/cmd\nuser platform\ntopic read {mq.PREFIX}/#"
    broker = make_broker(users={"agent": PASSWORD, "platform": "p"}, acl=status_only)
    sub = subscriber(broker, f"{mq.PREFIX}/events", username="platform", password="p")
    password_file = broker.directory / "agent-password"
    password_file.write_text(PASSWORD)

    async def scenario():
        settings = mq.reporter_settings(broker, username="agent", password_file=str(password_file))
        assert settings.protocol == "5"  # the default, not asked for
        reporter = Reporter(settings, store, device_id=mq.DEVICE_ID, backoff=mq.quick_backoff(), retry_refused_after=0.2)
        async with mq.running(reporter):
            store.record("sim_removed", {})
            refused = await mq.until(lambda: reporter.link_status()["refused"], what="the refusal reported")
            assert "Not authorized" in refused
            await asyncio.sleep(0.5)  # retried, refused again: still there
            assert store.outbox_depth()["event"] == 1
            broker.reload(acl=status_only + f"\nuser agent\ntopic write {mq.PREFIX}/events")
            await mq.wait_sub(sub, lambda s: s.documents("/events"), what="the event after the ACL allowed it")
            await mq.until(lambda: store.outbox_depth()["event"] == 0, what="row deleted after PUBACK")
            assert reporter.link_status()["refused"] is None

    asyncio.run(scenario())
    assert [d["type"] for d in sub.documents("/events")] == ["sim_removed"]
