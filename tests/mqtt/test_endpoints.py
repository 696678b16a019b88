"""Broker endpoints with failover (SPEC §6, issue 15 item 3): `[mqtt] endpoints` tried round
robin with the jittered backoff before every attempt, events never lost or reordered across
the move, and the MQTT 5 -> 3.1.1 fall back decided per endpoint. Two real mosquittos on
loopback; the clustered broker is tests/cluster/."""

from __future__ import annotations

import asyncio
import logging
import signal

from agent.service.reporter import Reporter


def endpoints(*brokers) -> list[str]:
    return [f"{b.host}:{b.port}" for b in brokers]


def first_arrivals(*subscribers) -> list[int]:
    """Seqs in the order they first arrived, the subscribers' lists read in turn (each
    subscriber's broker served the agent after the previous one's)."""
    seen: dict[str, int] = {}
    for sub in subscribers:
        for doc in sub.documents("/events"):
            assert seen.setdefault(doc["id"], doc["seq"]) == doc["seq"]  # an id always means the same event
    return list(seen.values())


def test_a_dead_first_endpoint_costs_one_backoff_and_the_agent_says_where_it_is(make_broker, store, mq, caplog):
    dead, alive = make_broker(), make_broker()
    dead.stop()
    backoff = mq.CountingBackoff()
    caplog.set_level(logging.INFO, logger="agent.service.reporter")

    async def scenario():
        reporter = Reporter(mq.reporter_settings(alive, host="localhost", endpoints=tuple(endpoints(dead, alive))), store,
                            device_id=mq.DEVICE_ID, backoff=backoff)
        assert reporter.link_status()["broker"] == f"127.0.0.1:{dead.port}"  # the first is tried first
        async with mq.running(reporter):
            status = reporter.link_status()
            assert status["broker"] == f"127.0.0.1:{alive.port}"
            assert status["endpoints"] == endpoints(dead, alive)
            assert status["protocol"] == "5"

    asyncio.run(scenario())
    assert backoff.delays == 1  # the move to the next endpoint waited for the jittered backoff
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"MQTT 127.0.0.1:{dead.port}: connection refused" in line and f"next endpoint 127.0.0.1:{alive.port}; retrying in" in line
               for line in lines), lines
    assert any(line.startswith(f"MQTT connected to 127.0.0.1:{alive.port}") for line in lines), lines


def test_a_lost_node_moves_the_session_on_and_unacked_events_follow_in_order(make_broker, subscriber, store, mq):
    """The node the agent is on freezes (SIGSTOP: no PUBACK comes back) while events are
    published, then dies: the events in flight on it are sent again on the next endpoint,
    oldest first, before anything newer."""
    a, b = make_broker(), make_broker()
    sub_a, sub_b = subscriber(a, f"{mq.PREFIX}/events"), subscriber(b, f"{mq.PREFIX}/events")

    async def scenario():
        reporter = Reporter(mq.reporter_settings(a, host="localhost", endpoints=tuple(endpoints(a, b))), store,
                            device_id=mq.DEVICE_ID, backoff=mq.quick_backoff())
        async with mq.running(reporter):
            for n in range(5):
                store.record("config_reloaded", {"n": n})
            await mq.wait_sub(sub_a, lambda s: len(s.documents("/events")) >= 5, what="5 events on node a")
            a.process.send_signal(signal.SIGSTOP)
            for n in range(5, 40):
                store.record("config_reloaded", {"n": n})
            await mq.until(lambda: reporter._inflight, what="events in flight on the frozen node")
            await asyncio.sleep(0.2)
            assert store.outbox_depth()["event"] == 35  # none acknowledged
            a.process.kill()
            await asyncio.to_thread(a.process.wait)
            await mq.until(lambda: reporter.connected and reporter.link_status()["broker"] == f"127.0.0.1:{b.port}",
                           what="the reporter on node b")
            for n in range(40, 45):
                store.record("config_reloaded", {"n": n})
            await mq.wait_sub(sub_b, lambda s: len({d["id"] for d in s.documents("/events")}) == 40, what="the rest on node b")
            await mq.until(lambda: store.outbox_depth()["event"] == 0, what="outbox drained")

    asyncio.run(scenario())
    assert [d["seq"] for d in sub_a.documents("/events")] == [1, 2, 3, 4, 5]
    assert [d["seq"] for d in sub_b.documents("/events")][:35] == list(range(6, 41))  # the unacked, in order, first
    assert first_arrivals(sub_a, sub_b) == list(range(1, 46))  # nothing lost, nothing out of order


def test_the_protocol_fall_back_is_per_endpoint(make_broker, mqtt311_only, store, mq, caplog):
    """The first endpoint closes an MQTT 5 CONNECT unanswered (RabbitMQ 3.x): 3.1.1 at once
    there. When it goes, the next endpoint still gets MQTT 5."""
    a, b = make_broker(), make_broker()
    front = mqtt311_only(a, "close")
    backoff = mq.CountingBackoff()
    caplog.set_level(logging.INFO, logger="agent.service.reporter")

    async def scenario():
        reporter = Reporter(mq.reporter_settings(a, host="localhost", endpoints=tuple(endpoints(front, b))), store,
                            device_id=mq.DEVICE_ID, backoff=backoff)
        async with mq.running(reporter):
            assert reporter.link_status()["protocol"] == "3.1.1"
            assert backoff.delays == 0  # a negotiation, not a failure
            front.close()
            await mq.until(lambda: reporter.connected and reporter.link_status()["broker"] == f"127.0.0.1:{b.port}",
                           what="the reporter on the second endpoint")
            assert reporter.link_status()["protocol"] == "5"

    asyncio.run(scenario())
    assert front.levels == [5, 4]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"127.0.0.1:{front.port} accepts MQTT 3.1.1" in w and "3.1.1 for this session" in w
               for w in warnings), warnings


def test_a_bare_close_earns_311_for_one_session_only(make_broker, mqtt311_only, store, mq):
    """A close before the CONNACK may have been a broker going down, not a protocol
    refusal: after that session the endpoint is asked for MQTT 5 again, so a transient
    close never pins it to 3.1.1 (where an ACL-denied publish is acknowledged and lost)."""
    broker = make_broker()
    front = mqtt311_only(broker, "close")

    async def scenario():
        reporter = Reporter(mq.reporter_settings(front), store, device_id=mq.DEVICE_ID, backoff=mq.quick_backoff())
        async with mq.running(reporter):
            assert reporter.link_status()["protocol"] == "3.1.1"
            await asyncio.to_thread(broker.stop)  # the session ends; the front then closes every CONNECT
            await mq.until(lambda: not reporter.connected, what="the session lost")
            await asyncio.to_thread(broker.start)
            await mq.until(lambda: reporter.connected, what="connected again")
            assert reporter.link_status()["protocol"] == "3.1.1"

    asyncio.run(scenario())
    assert front.levels[:2] == [5, 4] and front.levels[-2:] == [5, 4]
    assert all(first == 5 for first in front.levels[::2]), front.levels  # every session began by asking for MQTT 5


def test_a_close_that_311_does_not_cure_is_not_a_protocol_refusal(make_broker, mqtt311_only, store, mq):
    """A broker that closes every connection (here: its upstream is down) gets one 3.1.1 try
    after each MQTT 5 close, and MQTT 5 again after the backoff: never stuck on 3.1.1."""
    broker = make_broker()
    front = mqtt311_only(broker, "close")
    broker.stop()
    backoff = mq.CountingBackoff()

    async def scenario():
        reporter = Reporter(mq.reporter_settings(front), store, device_id=mq.DEVICE_ID, backoff=backoff)
        async with mq.running(reporter, connected=False):
            await mq.until(lambda: len(front.levels) >= 6, what="three rounds of attempts")
            assert reporter.link_status()["protocol"] == "5"
            assert not reporter.connected

    asyncio.run(scenario())
    assert front.levels[:6] == [5, 4, 5, 4, 5, 4]
    assert backoff.delays >= 2


def test_a_node_that_accepts_and_never_answers_costs_the_connect_timeout_not_keepalives(make_broker, store, mq):
    """A frozen node (SIGSTOPped, overloaded) still completes TCP handshakes from its listen
    backlog but never sends a CONNACK. The wait for the CONNACK is bounded by the connect
    timeout like the TCP connect is, and it is not taken for a protocol refusal: no 3.1.1
    retry against the same silent node, the next endpoint after one backoff."""
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepted by the kernel, never read: no CONNACK ever
    alive = make_broker()
    backoff = mq.CountingBackoff()

    async def scenario():
        reporter = Reporter(mq.reporter_settings(alive, host="localhost", keepalive=10,
                                                 endpoints=(f"127.0.0.1:{silent.getsockname()[1]}", f"{alive.host}:{alive.port}")),
                            store, device_id=mq.DEVICE_ID, backoff=backoff, connect_timeout=1.0)
        started = time.monotonic()
        async with mq.running(reporter, timeout=15):
            assert reporter.link_status()["broker"] == f"127.0.0.1:{alive.port}"
            assert reporter.link_status()["protocol"] == "5"
        return time.monotonic() - started

    try:
        took = asyncio.run(scenario())
    finally:
        silent.close()
    assert took < 5, f"{took:.1f} s to leave a node that never answers (keepalive 10 s, connect timeout 1 s)"
    assert backoff.delays == 1
