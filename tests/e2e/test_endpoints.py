"""`[mqtt] endpoints` in the real daemon: it moves past a dead first broker and `simagent
status` says which endpoint it is on (the failover itself: tests/mqtt/test_endpoints.py,
and on a clustered broker tests/cluster/)."""

from __future__ import annotations

import json

from .conftest import wait_event


def test_status_names_the_endpoint_the_daemon_is_on(make_broker, home_modem, agent_process, subscriber):
    dead, alive = make_broker(), make_broker()
    dead.stop()
    platform = subscriber(alive, "simagent/#")
    agent = agent_process(home_modem, [dead, alive])
    agent.wait_ready()
    wait_event(platform, "bound")

    link = json.loads(agent.cli("status", "--json", check=True).stdout)["mqtt"]
    assert link["connected"] is True
    assert link["broker"] == f"127.0.0.1:{alive.port}" and link["protocol"] == "5"
    assert link["endpoints"] == [f"127.0.0.1:{dead.port}", f"127.0.0.1:{alive.port}"]
    human = agent.cli("status", check=True).stdout
    assert f"connected to 127.0.0.1:{alive.port} (MQTT 5)" in human, human
    assert f"MQTT 127.0.0.1:{dead.port}: connection refused" in agent.log
