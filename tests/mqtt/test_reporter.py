import asyncio

from agent.service.reporter import Reporter


def test_status_state_telemetry_and_events_reach_the_platform(mosquitto, subscriber, store, mq):
    sub = subscriber(mosquitto, f"{mq.PREFIX}/#")

    async def scenario():
        reporter = Reporter(mq.reporter_settings(mosquitto), store, device_id=mq.DEVICE_ID, backoff=mq.quick_backoff())
        async with mq.running(reporter):
            reporter.publish_state(mq.state_document())
            reporter.publish_telemetry({"registration": "home", "operator": "CMCC", "access_tech": "lte", "signal_dbm": -85,
                                        "cell": {"mcc": "460", "mnc": "00", "tac": 4660, "cell_id": 123456},
                                        "data": {"rx_bytes": 100, "tx_bytes": 50}})
            with store.transaction() as tx:
                tx.record("agent_started", {"version": "0.1.0"})
                tx.record("sim_inserted", {"iccid": "89860012345678901234"})
            await mq.wait_sub(sub, lambda s: len(s.messages("/events")) == 2 and s.messages("/telemetry") and s.messages("/state"))
            reporter.publish_state(mq.state_document(radio={"cfun": 4, "gated": True}))
            reporter.publish_state(mq.state_document(radio={"cfun": 4, "gated": True}))  # unchanged: not sent again
            await mq.wait_sub(sub, lambda s: len(s.messages("/state")) == 2)
            await mq.until(lambda: store.outbox_depth()["event"] == 0, what="outbox drained")

    asyncio.run(scenario())
    # The graceful stop's offline status is on its way to the subscriber: wait for it.
    sub.wait_for(lambda s: s.messages("/status")[-1].json()["online"] is False, what="the offline status")
    status = sub.messages("/status")
    assert status[0].retain is False and status[0].json()["online"] is True  # live delivery of a retained publish
    assert [m.json()["radio"]["cfun"] for m in sub.messages("/state")] == [1, 4]
    # One JSON style on every topic (compact, as events are stored), and a `ts` on each
    # document: the state's is when it was published.
    assert all(", " not in m.payload.decode() and ": " not in m.payload.decode() for m in sub.messages())
    assert all("ts" in m.json() for m in sub.messages("/state"))
    telemetry = sub.messages("/telemetry")
    assert len(telemetry) == 1 and telemetry[0].qos == 0 and telemetry[0].json()["signal_dbm"] == -85
    events = sub.documents("/events")
    assert [e["type"] for e in events] == ["agent_started", "sim_inserted"]
    assert [e["seq"] for e in events] == [1, 2]
    assert all(m.qos == 1 for m in sub.messages("/events"))
    # A platform that subscribes later gets the retained status and state.
    late = subscriber(mosquitto, f"{mq.PREFIX}/+")
    late.wait_for(lambda s: s.messages("/status") and s.messages("/state"))
    assert all(m.retain for m in late.messages())
    assert late.documents("/status")[0]["online"] is False
    assert late.documents("/state")[0]["radio"]["cfun"] == 4


def test_telemetry_taken_offline_is_queued_and_replayed_at_qos1(mosquitto, subscriber, store, mq):
    sub = subscriber(mosquitto, f"{mq.PREFIX}/telemetry")

    async def scenario():
        reporter = Reporter(mq.reporter_settings(mosquitto), store, device_id=mq.DEVICE_ID, backoff=mq.quick_backoff())
        for dbm in (-101, -99, -97):
            reporter.publish_telemetry({"registration": "searching", "signal_dbm": dbm})
        assert store.outbox_depth()["telemetry"] == 3
        async with mq.running(reporter):
            await mq.wait_sub(sub, lambda s: len(s.messages()) == 3)
            await mq.until(lambda: store.outbox_depth()["telemetry"] == 0, what="telemetry drained")

    asyncio.run(scenario())
    assert [m.json()["signal_dbm"] for m in sub.messages()] == [-101, -99, -97]
    assert {m.qos for m in sub.messages()} == {1}


def test_stop_sends_what_is_queued_then_offline_status(mosquitto, subscriber, store, mq):
    sub = subscriber(mosquitto, f"{mq.PREFIX}/#")

    async def scenario():
        reporter = Reporter(mq.reporter_settings(mosquitto), store, device_id=mq.DEVICE_ID, backoff=mq.quick_backoff())
        async with mq.running(reporter):
            with store.transaction() as tx:
                for n in range(200):
                    tx.record("config_reloaded", {"n": n}, evidence=False)
        # stop() returned: everything was acknowledged and deleted.
        assert store.outbox_depth()["event"] == 0

    asyncio.run(scenario())
    sub.wait_for(lambda s: len(s.messages("/events")) == 200 and s.messages("/status")[-1].json()["online"] is False)
    assert mq.event_seqs(sub) == list(range(1, 201))


def test_a_reporter_stopped_mid_handshake_leaves_nothing_on_the_loop(store, mq):
    """Stopped while a broker has not answered its CONNECT (a reload of [mqtt] does this),
    the reporter closes its socket: nothing of it may stay registered with the loop, where
    the next socket given the same fd number (a new reporter's, a control connection's)
    would fail in add_reader."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts, never answers

    class Endpoint:
        host, port = "127.0.0.1", silent.getsockname()[1]

    async def scenario():
        loop = asyncio.get_running_loop()
        before = set(loop._selector.get_map())
        reporter = Reporter(mq.reporter_settings(Endpoint), store, device_id=mq.DEVICE_ID, backoff=mq.quick_backoff())
        reporter.start()
        await mq.until(lambda: reporter._attached, what="the CONNECT sent")
        await reporter.stop(timeout=0.2)
        return set(loop._selector.get_map()) - before

    try:
        left = asyncio.run(scenario())
    finally:
        silent.close()
    assert left == set(), f"file descriptors still registered with the loop: {left}"
