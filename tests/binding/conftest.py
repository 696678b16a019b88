import json

import pytest

from agent.core.clock import Clock, Stamp
from agent.core.store import Store

class ManualClock(Clock):
    """The one seam nothing real reaches: wall time and whether it is trusted."""

    def __init__(self, wall: float = 1_767_225_600.0, trusted: bool = True, boot_id: str = "boot-1"):
        super().__init__(kernel_synchronised=lambda: trusted)
        self.wall = wall
        self.trusted = trusted
        self.boot_id = boot_id

    def now(self) -> Stamp:
        # A trusted test clock counts as two sources agreeing (NTP and network time).
        return Stamp(self.wall, self.trusted, self.monotonic(), self.boot_id, agreed=self.trusted)


@pytest.fixture
def make_clock():
    return ManualClock


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def store(tmp_path, clock):
    s = Store.open(tmp_path / "state", clock=clock)
    yield s
    s.close()


def _events(store):
    return [json.loads(r.payload) for r in store.outbox_pending(100_000) if r.kind == "event"]


def _evidence_types(store):
    return [e["type"] for e, _ in store.evidence_entries()]


@pytest.fixture
def events():
    """events(store) -> the queued MQTT events, oldest first."""
    return _events


@pytest.fixture
def evidence_types():
    """evidence_types(store) -> the evidence entry types, in chain order."""
    return _evidence_types
