"""Delivery guarantees (SPEC §7): broker outages and kill -9 lose no committed event."""

import asyncio
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.service.reporter import Reporter

SCRIPT = Path(__file__).with_name("reporting_process.py")


@pytest.mark.faults
def test_broker_outage_loses_nothing_and_keeps_order_and_ids(make_broker, subscriber, store, mq, caplog, fault):
    broker = make_broker(persistence=True)
    sub = subscriber(broker, f"{mq.PREFIX}/events", persistent=True)
    caplog.set_level(logging.INFO, logger="agent.service.reporter")

    async def scenario():
        reporter = Reporter(mq.reporter_settings(broker), store, device_id=mq.DEVICE_ID, backoff=mq.quick_backoff())
        async with mq.running(reporter):
            for n in range(5):
                store.record("config_reloaded", {"n": n})
            await mq.wait_sub(sub, lambda s: len(s.messages()) >= 5)
            with store.transaction() as tx:  # some of these are in flight when the broker goes
                for n in range(5, 50):
                    tx.record("config_reloaded", {"n": n}, evidence=False)
            await asyncio.to_thread(broker.stop)
            await mq.until(lambda: not reporter.connected, what="reporter noticed the outage")
            for n in range(50, 60):
                store.record("config_reloaded", {"n": n})
            queued = {row.id for row in store.outbox_pending(1000)}
            assert len(queued) >= 10
            await asyncio.sleep(0.3)  # a few refused reconnects
            await asyncio.to_thread(broker.start)
            await mq.until(lambda: reporter.connected, what="reporter reconnected")
            await mq.wait_sub(sub, lambda s: len({d["id"] for d in s.documents("/events")}) == 60, what="all 60 events")
            await mq.until(lambda: store.outbox_depth()["event"] == 0, what="outbox drained")
            return queued

    queued = asyncio.run(scenario())
    fault.record("broker_outage (reporter)", trials=1, committed=range(1, 61), received=[d["seq"] for d in sub.documents("/events")])
    first_seen: dict[str, int] = {}
    for doc in sub.documents("/events"):
        assert first_seen.setdefault(doc["id"], doc["seq"]) == doc["seq"]  # an id always means the same event
    assert list(first_seen.values()) == list(range(1, 61))  # in seq order, nothing missing
    assert queued <= set(first_seen)  # the ids queued during the outage are the ids delivered
    refusals = [r.getMessage() for r in caplog.records if "connection refused" in r.getMessage()]
    assert len(refusals) == 1, refusals  # one line per cause, not one per retry


def _collect(process: subprocess.Popen, lines: list[str], started: threading.Event) -> None:
    for line in process.stdout:
        if line.startswith("started"):
            started.set()
        lines.append(line.rstrip("\n"))


def _run_reporting_process(state: Path, port: int, *args: str) -> tuple[subprocess.Popen, list[str], threading.Event]:
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--state", str(state), "--port", str(port), *args],
                               stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    started = threading.Event()
    reader = threading.Thread(target=_collect, args=(process, lines, started), daemon=True)
    reader.start()
    process.reader = reader
    return process, lines, started


@pytest.mark.faults
def test_kill_9_at_random_moments_loses_no_committed_event(mosquitto, subscriber, tmp_path, mq, fault):
    sub = subscriber(mosquitto, f"{mq.PREFIX}/events")
    state = tmp_path / "state"
    rng = fault.rng
    committed: dict[str, int] = {}
    trials = fault.trials(20)
    for _ in range(trials):
        process, lines, started = _run_reporting_process(state, mosquitto.port)
        assert started.wait(10), "reporting process did not start"
        time.sleep(rng.uniform(0.0, 0.25))
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.reader.join(5)
        for line in lines[1:]:
            event_id, seq = line.split()
            committed[event_id] = int(seq)
    assert len(committed) > 200, "the bursts were too small to test anything"
    # A last, clean run sends whatever the killed ones left in the outbox.
    process, lines, _ = _run_reporting_process(state, mosquitto.port, "--events", "0")
    assert process.wait(20) == 0
    process.reader.join(5)
    assert lines[-1] == "stopped 0"
    sub.wait_for(lambda s: set(committed) <= {d["id"] for d in s.documents("/events")}, timeout=10, what="every committed event")
    fault.record("kill9 (reporter)", trials=trials, committed=committed, received=[d["id"] for d in sub.documents("/events")])
    first_seen: dict[str, int] = {}
    for doc in sub.documents("/events"):
        assert first_seen.setdefault(doc["id"], doc["seq"]) == doc["seq"]
    assert all(first_seen[event_id] == seq for event_id, seq in committed.items())
    seqs = list(first_seen.values())
    assert seqs == list(range(1, len(seqs) + 1))  # in order, no gap (killed transactions never took a seq)


def test_last_will_marks_the_device_offline_after_a_crash(mosquitto, subscriber, tmp_path, mq):
    sub = subscriber(mosquitto, f"{mq.PREFIX}/status")
    process, lines, started = _run_reporting_process(tmp_path / "state", mosquitto.port, "--events", "0", "--then", "idle")
    sub.wait_for(lambda s: any(d["online"] for d in s.documents("/status")), what="online status")
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.reader.join(5)
    sub.wait_for(lambda s: s.documents("/status")[-1]["online"] is False, what="the Last Will")
    retained = subscriber(mosquitto, f"{mq.PREFIX}/status")
    retained.wait_for(lambda s: s.messages())
    message = retained.messages()[0]
    assert message.retain and message.json()["online"] is False
    # The broker published it at a time the agent could not know: no `ts`, but when the
    # session it ends began (issue 13: the Will's `ts` was the connect time).
    will = message.json()
    online = next(d for d in sub.documents("/status") if d["online"])
    assert "ts" not in will and will["session_started"] <= online["ts"]
