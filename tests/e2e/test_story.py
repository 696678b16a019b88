"""The demo story, asserted through MQTT and the fake modem's own view of the radio."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import (FOREIGN_ICCID, HOME_ICCID, IMEI, TIMEOUT, assert_delivered_in_order, committed_event_seq, last_seq,
                       swap_to, wait_event, wait_modem)

P = f"simagent/{IMEI}"


def test_bind_foreign_sim_blocked_right_sim_restored_then_offline_on_sigterm(mosquitto, home_modem, agent_process, subscriber):
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)
    agent.wait_ready()

    bound = wait_event(platform, "bound")
    assert (bound["data"]["iccid"], bound["data"]["imei"]) == (HOME_ICCID, IMEI)
    wait_event(platform, "radio_restored")
    # The attach comes after the fake's register_delay, not with CFUN=1: wait for it (issue 13).
    wait_modem(home_modem, lambda s: s["cfun"] == 1 and s["attaches"], "CFUN=1 and the home card attached")
    platform.wait_for(lambda sub: any(d["online"] for d in sub.documents(f"{P}/status")), what="online status")

    mark = last_seq(platform)
    home_modem.sim_remove()
    wait_event(platform, "sim_removed", after=mark)
    home_modem.sim_insert(FOREIGN_ICCID)
    violation = wait_event(platform, "binding_violation", after=mark)
    assert violation["data"]["reason"] == "iccid_mismatch"
    wait_event(platform, "radio_blocked", after=mark)
    state = home_modem.state()
    assert state["cfun"] == 4
    assert not [a for a in state["attaches"] if a["iccid"] == FOREIGN_ICCID], "the foreign card attached"
    platform.wait_for(lambda sub: any(d["binding"]["status"] == "violation" and d["radio"]["cfun"] == 4
                                      for d in sub.documents(f"{P}/state")), what="a state document with the violation")

    mark = last_seq(platform)
    swap_to(home_modem, HOME_ICCID)
    wait_event(platform, "radio_restored", after=mark)
    wait_modem(home_modem, lambda s: s["cfun"] == 1, "CFUN=1 for the bound card")
    assert not [a for a in home_modem.state()["attaches"] if a["iccid"] == FOREIGN_ICCID]

    late = subscriber(mosquitto, f"{P}/status")  # retained: a platform that connects now still learns it
    late.wait_for(lambda sub: sub.documents("/status") and sub.documents("/status")[-1]["online"], what="retained online")

    mark = last_seq(platform)
    assert agent.stop() == 0
    wait_event(platform, "agent_stopping", after=mark)
    platform.wait_for(lambda sub: sub.documents(f"{P}/status")[-1]["online"] is False, what="offline status")
    after = subscriber(mosquitto, f"{P}/status")
    after.wait_for(lambda sub: sub.documents("/status") and sub.documents("/status")[-1]["online"] is False,
                   what="retained offline status")
    assert after.messages("/status")[-1].retain

    delivered = assert_delivered_in_order(platform, committed_event_seq(agent))
    assert delivered[-1]["type"] == "agent_stopping"  # the last word, flushed before the exit
    assert any(m.get("STOPPING") == "1" for m in agent.notify.messages)


def test_simagent_demo_exits_0_and_speaks_to_a_newcomer(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "agent", "demo"], capture_output=True, text=True, timeout=TIMEOUT * 3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "radio restored" in out
    # No jargon a newcomer cannot look up: contract clauses, bare systemd protocol words.
    assert "clause" not in out and "READY=1" not in out
    # The platform's view never says the binding is fine while the radio is off unexplained.
    states = [line for line in out.splitlines() if "platform <- state:" in line]
    assert states and not [line for line in states if re.search(r"binding ok, radio (off|CFUN=4)$", line)], states
    # One numbering per thing: events by seq, log entries by entry number, never both as "#N".
    assert not re.search(r"#\d", out), out
    assert out.rstrip().splitlines()[-6] == "What to try next:"
