"""Outbox figures (SPEC §11), measured in one run against one local mosquitto:

- `outbox_enqueue_per_s`: events committed durably (one transaction, fsync, each).
- `outbox_drain_ratio`: messages/s the Reporter drains from the outbox (publish, PUBACK,
  delete) divided by messages/s of a bare paho client publishing the same count and size
  at QoS 1 with the same in-flight window, to the same broker.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from simagent_lab.localbroker import Broker
from agent.service.reporter import Reporter
from agent.core.config import MqttConfig, TlsConfig
from agent.core.store import Caps, Store

ENQUEUES = 2000
MESSAGES = 5000
WINDOW = 20
ROUNDS = 3
SAMPLE_DATA = {"iccid": "89860012345678901234", "imei": "490154203237518", "reason": "benchmark", "cfun": 4}


def enqueue_rate(directory: Path) -> float:
    store = Store.open(directory / "enqueue", caps=Caps(max_events=ENQUEUES * 2))
    try:
        start = time.perf_counter()
        for n in range(ENQUEUES):
            with store.transaction() as tx:
                tx.enqueue_event("binding_violation", {**SAMPLE_DATA, "n": n}, store.clock.now())
        return ENQUEUES / (time.perf_counter() - start)
    finally:
        store.close()


def raw_paho_rate(port: int, payload: bytes) -> float:
    done = threading.Event()
    acked = 0

    def on_publish(client, userdata, mid, reason_code, properties):
        nonlocal acked
        acked += 1
        if acked == MESSAGES:
            done.set()

    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw")
    client.max_inflight_messages_set(WINDOW)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.on_connect = lambda *args: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    connected.wait(10)
    start = time.perf_counter()
    for _ in range(MESSAGES):
        client.publish("bench/raw", payload, qos=1)
    if not done.wait(120):
        raise RuntimeError("raw paho publish did not finish")
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return MESSAGES / elapsed


def reporter_rate(directory: Path, port: int) -> tuple[float, int]:
    store = Store.open(directory, caps=Caps(max_events=MESSAGES * 2))
    with store.transaction() as tx:
        for n in range(MESSAGES):
            tx.enqueue_event("binding_violation", {**SAMPLE_DATA, "n": n}, store.clock.now())
    size = len(store.outbox_pending(1)[0].payload)
    settings = MqttConfig(host="127.0.0.1", port=port, client_id="bench-reporter", tls=TlsConfig(enabled=False))

    async def drain() -> float:
        reporter = Reporter(settings, store, device_id="bench", window=WINDOW)
        reporter.start()
        while not reporter.connected:
            await asyncio.sleep(0.001)
        start = time.perf_counter()
        while store.outbox_depth()["event"]:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - start
        await reporter.stop()
        return elapsed

    try:
        return MESSAGES / asyncio.run(drain()), size
    finally:
        store.close()


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="simagent-bench-") as tmp:
        directory = Path(tmp)
        broker = Broker(directory / "broker").start()
        port = broker.port
        try:
            enqueue = enqueue_rate(directory)
            drains, raws = [], []
            for round_ in range(ROUNDS):
                drain, size = reporter_rate(directory / f"drain{round_}", port)
                drains.append(drain)
                raws.append(raw_paho_rate(port, b"x" * size))
        finally:
            broker.stop()
    return {
        "outbox_enqueue_per_s": round(enqueue),
        "outbox_drain_per_s": round(max(drains)),
        "outbox_raw_paho_qos1_per_s": round(max(raws)),
        "outbox_drain_ratio": round(max(drains) / max(raws), 3),
    }
