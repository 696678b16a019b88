"""Helpers for the MQTT tests: reporter settings for a test broker, a store, and a way
to run a reporter on an asyncio loop while a subscriber thread watches."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable

import pytest

from agent.core.backoff import Backoff
from agent.core.clock import Clock
from agent.service.reporter import Reporter
from agent.core.config import MqttConfig, TlsConfig
from agent.core.store import Store

DEVICE_ID = "490154203237518"
PREFIX = f"simagent/{DEVICE_ID}"


def reporter_settings(broker, **overrides: Any) -> MqttConfig:
    tls = overrides.pop("tls", None)
    if tls is None:
        tls = TlsConfig(enabled=False)
    fields = {"host": broker.host, "port": broker.port, "keepalive": 10, **overrides}
    return MqttConfig(tls=tls, **fields)


def quick_backoff() -> Backoff:
    """Retries within a fraction of a second, so outage tests stay fast."""
    return Backoff(base=0.05, cap=0.4, stable_after=30.0)


class CountingBackoff(Backoff):
    """quick_backoff() that counts the delays drawn (each one a backed-off attempt)."""

    def __init__(self) -> None:
        super().__init__(base=0.05, cap=0.4, stable_after=30.0)
        self.delays = 0

    def next_delay(self) -> float:
        self.delays += 1
        return super().next_delay()


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "state", clock=Clock(kernel_synchronised=lambda: True))
    yield s
    s.close()


def state_document(**changes: Any) -> dict:
    doc = {
        "device_id": DEVICE_ID,
        "agent_version": "0.1.0",
        "modem": {"vendor": "Quectel", "model": "EC25", "revision": "EC25EFAR06A06M4G", "imei": DEVICE_ID, "imei_luhn_ok": True},
        "sim": {"state": "ready", "iccid": "89860012345678901234", "imsi": "460001234567890"},
        "network": {"registration": "home", "operator": "CHINA MOBILE", "access_tech": "lte", "signal_dbm": -85,
                    "signal_measure": "rsrp"},
        "binding": {"mode": "first-use", "status": "ok", "bound_iccid": "89860012345678901234", "bound_imei": DEVICE_ID,
                    "since": "2026-01-01T00:00:00.000Z"},
        "radio": {"cfun": 1, "gated": True},
        "device_pubkey": "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=",
    }
    doc.update(changes)
    return doc


@contextlib.asynccontextmanager
async def running(reporter: Reporter, *, connected: bool = True, timeout: float = 10.0):
    reporter.start()
    try:
        if connected:
            await until(lambda: reporter.connected, timeout, "reporter connected")
        yield reporter
    finally:
        await reporter.stop()


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return value


async def wait_sub(sub, predicate, timeout: float = 10.0, what: str = "messages"):
    """Waits for a subscriber condition without blocking the reporter's loop."""
    return await asyncio.to_thread(sub.wait_for, predicate, timeout, what)


def event_seqs(sub) -> list[int]:
    return [doc["seq"] for doc in sub.documents("/events")]


@pytest.fixture
def mq():
    """These helpers, for the test modules (importlib mode cannot import a conftest)."""
    import sys

    return sys.modules[__name__]
