"""The fleet simulation end to end at N = 3 (`python -m benchmarks.fleet`, README "Fleet
simulation"): real agents, fake modems and mosquitto, a broker restart with events committed
while it is down; every committed event reaches the observer and the JSON keeps its shape."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.fleet.__main__ import main

pytestmark = pytest.mark.slow


def test_three_agents_survive_a_broker_restart_without_losing_an_event(tmp_path, capsys):
    out = tmp_path / "fleet.json"
    before = set(children())  # other tests' children (a session broker...) are not the fleet's
    # swap share 0.34: one terminal swapped before the outage, one while the broker is down
    assert main(["--n", "3", "--outage", "2", "--settle", "1", "--swap-share", "0.34", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out)["events"] == result["events"]

    events = result["events"]
    assert events["lost"] == 0 and events["pending_in_outbox"] == 0 and events["seq_with_two_ids"] == 0
    assert events["received_unique"] == events["committed"]
    # start, bind, stop per agent, plus the swaps: two foreign cards held off and restored
    kinds = result["events_received_by_type"]
    assert kinds["agent_started"] == kinds["agent_stopping"] == 3
    assert kinds["binding_violation"] == 2 and kinds["radio_restored"] >= 2
    assert result["retained_online_true"] == 3
    assert result["observer_session_present_after_restart"] == [True]
    assert result["all_back_after_restart_s"]["agents_back"] == 3
    assert result["agent_exit_codes"] == {"0": 3}

    # every agent lost its session and connected again: the logs and the broker saw it
    series = result["series"]
    assert sum(series["connect_attempts_per_s"]) >= 3
    assert result["peak_broker_connects_per_s_after_restart"] >= 1
    assert result["backoff_lateness_s"]["count"] >= 3
    assert {len(values) for values in series.values()} == {len(series["t_from_broker_stop_s"])}
    assert 1.5 < result["outage_s"] < 3
    assert result["memory"]["settled"]["agents"]["count"] == 3
    assert result["memory"]["settled"]["fakes"]["count"] == 3
    assert result["model"]["n"] == 3 and result["model"]["peak_attempts_per_s"] >= 1

    assert set(children()) - before == set()  # no agent, fake or broker left behind


def children() -> list[int]:
    """Processes whose parent is this one (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found
