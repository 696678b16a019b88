"""Broker outage, modem unplug/replug, modem reboot and kill -9: enforcement never waits
for MQTT, and no committed event is lost."""

from __future__ import annotations

import json

import pytest

from .conftest import (FOREIGN_ICCID, HOME_ICCID, IMEI, TIMEOUT, assert_delivered_in_order, committed_event_seq, events,
                       last_seq, swap_to, wait_event, wait_modem)
from ..conftest import wait_until


@pytest.mark.faults
def test_broker_outage_during_a_violation_loses_nothing(make_broker, home_modem, agent_process, subscriber, fault):
    broker = make_broker(persistence=True)  # the platform's session and its queue survive the restart
    platform = subscriber(broker, "simagent/#", persistent=True)
    agent = agent_process(home_modem, broker)
    wait_event(platform, "radio_restored")

    broker.stop()
    before = committed_event_seq(agent)
    swap_to(home_modem, FOREIGN_ICCID)
    # The radio goes off while the platform is unreachable: enforcement never waits for MQTT.
    wait_modem(home_modem, lambda s: s["cfun"] == 4 and s["iccid"] == FOREIGN_ICCID, "CFUN=4 with the broker down")
    wait_until(lambda: committed_event_seq(agent) >= before + 3, TIMEOUT, what="violation events committed offline")
    assert not [a for a in home_modem.state()["attaches"] if a["iccid"] == FOREIGN_ICCID]

    broker.start()
    committed = committed_event_seq(agent)
    violation = wait_event(platform, "binding_violation", after=before)
    assert violation["data"]["reason"] == "iccid_mismatch"
    wait_event(platform, "radio_blocked", after=before)
    platform.wait_for(lambda sub: max((e["seq"] for e in events(sub)), default=0) >= committed, timeout=TIMEOUT,
                      what=f"every event up to seq {committed}")
    fault.record("broker_outage", trials=1, committed=range(1, committed + 1), received=[e["seq"] for e in events(platform)])
    assert_delivered_in_order(platform, committed)


def test_modem_unplug_and_replug(fake_modem_process, agent_process, subscriber, mosquitto):
    # The fake module registers 4 s after power-on with RF on (every profile boots so):
    # the agent must have the port open and the radio gated before that.
    modem = fake_modem_process(profile="quectel", imei=IMEI, iccid=HOME_ICCID, register_delay=4.0)
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(modem, mosquitto)
    wait_event(platform, "radio_restored")

    mark = last_seq(platform)
    modem.unplug()
    lost = wait_event(platform, "modem_lost", after=mark)
    assert lost["data"]["port"] == modem.port

    mark = last_seq(platform)
    modem.replug()  # the module comes back from power-on: boot URCs, radio at its boot default
    found = wait_event(platform, "modem_found", after=mark)
    assert found["data"]["port"] == modem.port
    wait_event(platform, "radio_restored", after=found["seq"])  # checked again, the bound card may attach
    wait_modem(modem, lambda s: s["cfun"] == 1, "CFUN=1 after replug")

    mark = last_seq(platform)
    modem.unplug()
    wait_event(platform, "modem_lost", after=mark)
    # A foreign card goes in while the port is away. The fake models a USB drop, not a
    # power cut: its radio stays on and may attach the card, out of anyone's reach; what
    # counts is that nothing attaches once the port is back.
    notified = agent.notify.mark()
    swap_to(modem, FOREIGN_ICCID)
    # The port stays away through several reopen attempts: a retry backoff grown to
    # seconds would leave the rebooted module registering before the agent gates it.
    agent.notify.wait_for(lambda m: "waiting for modem" in m.get("STATUS", ""), since=notified, count=4,
                          what="four failed reopens")
    mark = last_seq(platform)
    modem.replug()
    attaches_at_replug = len(modem.state()["attaches"])
    violation = wait_event(platform, "binding_violation", after=mark)
    assert violation["data"]["reason"] == "iccid_mismatch"
    wait_event(platform, "radio_blocked", after=mark)
    state = wait_modem(modem, lambda s: s["cfun"] == 4, "CFUN=4 for the foreign card after replug")
    assert len(state["attaches"]) == attaches_at_replug, "the foreign card attached after the replug"
    assert agent.running


def test_modem_reboot_regates_then_restores_the_right_card(home_modem, agent_process, subscriber, mosquitto):
    platform = subscriber(mosquitto, "simagent/#")
    agent_process(home_modem, mosquitto)
    wait_event(platform, "radio_restored")

    mark = last_seq(platform)
    home_modem.reboot()
    rebooted = wait_event(platform, "modem_rebooted", after=mark)
    blocked = wait_event(platform, "radio_blocked", after=rebooted["seq"])  # the module booted with RF on
    restored = wait_event(platform, "radio_restored", after=blocked["seq"])
    assert restored["seq"] > blocked["seq"] > rebooted["seq"]
    wait_modem(home_modem, lambda s: s["cfun"] == 1, "CFUN=1 after the reboot")
    assert not events(platform, ("binding_violation",))


@pytest.mark.faults
def test_kill_9_then_restart_loses_no_event_and_keeps_binding_and_evidence(home_modem, agent_process, subscriber, mosquitto,
                                                                           tmp_path, fault):
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)
    wait_event(platform, "radio_restored")

    before = committed_event_seq(agent)
    swap_to(home_modem, FOREIGN_ICCID)
    # Killed the moment the violation is committed, whether or not it left the outbox yet.
    wait_until(lambda: committed_event_seq(agent) >= before + 3, TIMEOUT, interval=0.005, what="violation committed")
    agent.kill9()
    committed = committed_event_seq(agent)

    ready = agent.restart()
    assert ready.get("STATUS", "").startswith("binding violation"), ready  # the modem again, not "waiting for modem"
    platform.wait_for(lambda sub: max((e["seq"] for e in events(sub)), default=0) >= committed, timeout=TIMEOUT,
                      what=f"every event up to seq {committed}")
    fault.record("kill9_after_violation", trials=1, committed=range(1, committed + 1),
                 received=[e["seq"] for e in events(platform)])
    assert_delivered_in_order(platform, committed)
    wait_event(platform, "modem_found", after=committed)
    wait_modem(home_modem, lambda s: s["cfun"] == 4, "the foreign card still held off after restart")

    show = agent.cli("bind", "show", "--json")
    assert show.returncode == 1, show.stderr  # 1: the last decision is a violation
    shown = json.loads(show.stdout)
    assert [(b["iccid"], b["imei"]) for b in shown["bindings"]] == [(HOME_ICCID, IMEI)]
    assert (shown["last_decision"]["reason"], shown["last_decision"]["iccid"]) == ("iccid_mismatch", FOREIGN_ICCID)

    bundle = tmp_path / "evidence.json"
    agent.cli("evidence", "export", "--out", str(bundle), check=True)
    verdict = agent.cli("evidence", "verify", str(bundle))
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    types = [entry["type"] for entry in json.loads(bundle.read_text())["entries"]]
    assert types.count("agent_started") == 2 and "binding_violation" in types
