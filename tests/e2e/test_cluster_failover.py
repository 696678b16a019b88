"""The clustered-broker proof (issue 15, item 3): `simagent run` with both nodes of a real
two-node RabbitMQ cluster in `[mqtt] endpoints`, SIM swaps on the fake modem making events,
and the node the agent is on stopped while they flow. The agent must continue on the
other node; a platform subscriber with a persistent session on that node must receive
every committed event (seq without gaps, first arrivals in order; QoS 1 duplicates
allowed); the retained status and state there must be right afterwards; and a command
sent there must be answered (the agent's own session survived the move).

Marked `cluster` (not in the default run: RabbitMQ starts in ~20 s): `./dev.sh cluster`,
which installs Debian's rabbitmq-server when it is missing. Why RabbitMQ and what it
changes: simagent_lab/rabbitcluster.py and the README ("Broker endpoints and failover").
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.service.control import BlockingControlClient
from simagent_lab import rabbitcluster

from .conftest import (FOREIGN_ICCID, HOME_ICCID, IMEI, TIMEOUT, assert_delivered_in_order, committed_event_seq,
                       events, swap_to, wait_event)

pytestmark = pytest.mark.cluster

P = f"simagent/{IMEI}"
SWAP_PERIOD_S = 0.3  # a foreign card in, then the home card back, every 0.6 s


@pytest.fixture
def rabbit_cluster():
    if not rabbitcluster.available():
        pytest.skip("rabbitmq-server is not installed (./dev.sh cluster installs it)")
    directory = Path(tempfile.mkdtemp(prefix="sa-rmq-", dir="/tmp"))
    cluster = rabbitcluster.RabbitCluster(directory)
    try:
        yield cluster.start()
    finally:
        cluster.close()
        shutil.rmtree(directory, ignore_errors=True)


class Swapper(threading.Thread):
    """Swaps a foreign card in and the home card back until stopped (each swap makes
    sim_removed, sim_inserted, binding_violation/radio_blocked or radio_restored events)."""

    def __init__(self, modem) -> None:
        super().__init__(daemon=True)
        self.modem = modem
        self.halt = threading.Event()
        self.swaps = 0

    def run(self) -> None:
        while not self.halt.is_set():
            swap_to(self.modem, FOREIGN_ICCID)
            time.sleep(SWAP_PERIOD_S)
            swap_to(self.modem, HOME_ICCID)
            time.sleep(SWAP_PERIOD_S)
            self.swaps += 2

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(10)


def link(control: BlockingControlClient) -> dict:
    return control.call("status")["mqtt"]


def wait_link(control: BlockingControlClient, predicate, what: str, timeout: float = 60.0) -> float:
    """Polls the daemon's link status every 20 ms; returns the monotonic time it held."""
    deadline = time.monotonic() + timeout
    while True:
        status = link(control)
        if predicate(status):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"the agent's MQTT link never reached {what}: {status}")
        time.sleep(0.02)


def retained(subscriber, node, topic: str) -> dict:
    """The retained message a fresh 3.1.1 client gets on `node` for the exact `topic`
    (RabbitMQ 3.x gives none to a wildcard subscription)."""
    fresh = subscriber(node, topic, protocol=mqtt.MQTTv311)
    return fresh.wait_for(lambda s: next((m.json() for m in s.messages(topic) if m.retain), None),
                          timeout=TIMEOUT, what=f"the retained {topic} on node {node.name}")


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_stopping_the_node_the_agent_is_on_loses_no_event(how, rabbit_cluster, home_modem, agent_process, subscriber):
    a, b = rabbit_cluster.nodes
    platform = subscriber(b, f"{P}/events", persistent=True)  # a 3.1.1 session on the node that survives
    agent = agent_process(home_modem, [a, b])
    agent.wait_ready()
    wait_event(platform, "bound")
    control = BlockingControlClient.connect(agent.control_socket)
    swapper = Swapper(home_modem)
    try:
        wait_link(control, lambda s: s["connected"] and s["broker"] == a.endpoint, "node a")
        assert link(control)["protocol"] == "3.1.1"  # RabbitMQ 3.10 closes an MQTT 5 CONNECT: fall back

        swapper.start()
        time.sleep(2.0)
        seq_at_stop = committed_event_seq(agent)
        stopping = time.monotonic()
        stopper = threading.Thread(target=getattr(a, how))
        stopper.start()
        lost = wait_link(control, lambda s: not s["connected"], "the loss of node a")
        moved = wait_link(control, lambda s: s["connected"] and s["broker"] == b.endpoint, "node b")
        stopper.join()
        time.sleep(3.0)  # events keep flowing, now through node b
        swapper.stop()
        swap_to(home_modem, HOME_ICCID)  # whatever card the swapper left in: home, radio back
        wait_link(control, lambda s: s["connected"], "connected")
        final = link(control)
    finally:
        swapper.stop()
        control.close()

    # Everything the agent committed reaches the subscriber, once settled.
    deadline = time.monotonic() + TIMEOUT
    while True:
        committed = committed_event_seq(agent)
        received = {e["seq"] for e in events(platform)}
        if set(range(1, committed + 1)) <= received and committed == committed_event_seq(agent):
            break
        assert time.monotonic() < deadline, f"missing seqs {sorted(set(range(1, committed + 1)) - received)}"
        time.sleep(0.2)
    delivered = assert_delivered_in_order(platform, committed)
    duplicates = len(events(platform)) - len({e["id"] for e in events(platform)})
    assert final["broker"] == b.endpoint and final["protocol"] == "3.1.1"
    assert seq_at_stop < committed  # events flowed across the move, not only before it

    # The retained documents on the surviving node describe the agent as it is now.
    status = retained(subscriber, b, f"{P}/status")
    assert status["online"] is True
    state = retained(subscriber, b, f"{P}/state")
    now = json.loads(agent.cli("status", "--json", check=True).stdout)
    assert state["sim"]["iccid"] == HOME_ICCID == now["sim"]["iccid"]
    assert state["binding"]["status"] == "ok" == now["binding"]["status"]
    assert state["radio"] == now["radio"] and state["radio"]["cfun"] == 1

    # The agent's command subscription moved with it (its session queue is mirrored).
    commander = subscriber(b, f"{P}/cmd/result", protocol=mqtt.MQTTv311)
    commander.publish(f"{P}/cmd", json.dumps({"id": "c-after-failover", "name": "ping", "args": {}}))
    commander.wait_for(lambda s: any(r["id"] == "c-after-failover" and r["ok"] for r in s.documents("/cmd/result")),
                       timeout=TIMEOUT, what="the ping reply through node b")

    print(f"\ncluster failover ({how}): the agent lost node a {lost - stopping:.2f} s after the {how} began and was "
          f"connected to node b {moved - lost:.2f} s later; {committed} events committed "
          f"({committed - seq_at_stop} after the stop began), {len(delivered)} delivered, 0 lost, "
          f"{duplicates} duplicates; {swapper.swaps} SIM swaps")
