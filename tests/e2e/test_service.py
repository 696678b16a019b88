"""What systemd sees: READY/STATUS/WATCHDOG on $NOTIFY_SOCKET, SIGHUP reloads, exit 78."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest

from .conftest import EX_CONFIG, FOREIGN_ICCID, HOME_ICCID, IMEI, events, last_seq, sign_token, swap_to, wait_event, wait_modem

P = f"simagent/{IMEI}"


def test_ready_after_the_first_binding_decision_and_watchdog_pings(home_modem, agent_process, subscriber, mosquitto):
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto, env={"WATCHDOG_USEC": "2000000"})
    ready = agent.wait_ready()
    assert ready["STATUS"] == "binding bound"  # READY=1 waits for the decision, and says it
    bound = wait_event(platform, "bound")
    assert bound["data"]["iccid"] == HOME_ICCID
    # Pings every WATCHDOG_USEC / 2 while the loop is healthy.
    agent.notify.wait_for(lambda m: m.get("WATCHDOG") == "1", count=3, what="three WATCHDOG=1 pings")
    assert agent.stop() == 0
    assert any(m.get("STOPPING") == "1" for m in agent.notify.messages)


def test_ready_without_a_modem_says_it_waits_for_it(agent_process, mosquitto, tmp_path):
    agent = agent_process(str(tmp_path / "no-such-tty"), mosquitto)
    ready = agent.wait_ready()
    assert ready["STATUS"].startswith("waiting for modem"), ready
    assert "no-such-tty" in ready["STATUS"]
    assert not any(m.get("WATCHDOG") for m in agent.notify.messages)  # no WATCHDOG_USEC, no pings
    assert agent.stop() == 0


def test_sighup_applies_a_valid_config_and_keeps_the_old_one_on_error(home_modem, agent_process, subscriber, mosquitto):
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)
    wait_event(platform, "radio_restored")

    mark = last_seq(platform)
    notified = agent.notify.mark()
    agent.reconfigure(binding={"on_violation": "report", "radio_gate": False})  # observe and tell, never act
    agent.hup()
    reloaded = wait_event(platform, "config_reloaded", after=mark)
    assert reloaded["data"]["ok"] is True and reloaded["data"]["changed"] == ["binding"]
    assert agent.notify.wait_for(lambda m: m.get("RELOADING") == "1", since=notified)["MONOTONIC_USEC"].isdigit()
    agent.notify.wait_for(lambda m: m.get("READY") == "1", since=notified, what="READY=1 after the reload")

    agent.reconfigure(binding={"on_violation": "radiooff"}, telemetry={"interval": 10.0})
    mark = last_seq(platform)
    agent.hup()
    refused = wait_event(platform, "config_reloaded", after=mark)
    assert refused["data"]["ok"] is False
    assert str(agent.config_path) in refused["data"]["error"]
    assert "[binding] on_violation" in refused["data"]["error"] and "radiooff" in refused["data"]["error"]

    # Still running, and on the configuration it had: a violation is now only reported.
    mark = last_seq(platform)
    swap_to(home_modem, FOREIGN_ICCID)
    violation = wait_event(platform, "binding_violation", after=mark)
    assert violation["data"]["reason"] == "iccid_mismatch"
    assert wait_modem(home_modem, lambda s: s["iccid"] == FOREIGN_ICCID, "the foreign card")["cfun"] == 1
    assert not [e for e in platform.documents("/events") if e["type"] == "radio_blocked" and e["seq"] > mark]
    assert agent.stop() == 0


def test_config_error_at_start_exits_78_naming_file_and_key(agent_process, mosquitto, tmp_path):
    agent = agent_process(str(tmp_path / "tty"), mosquitto, binding={"on_violation": "radiooff"})
    assert agent.wait_exit() == EX_CONFIG
    log = agent.log
    assert str(agent.config_path) in log and "[binding] on_violation" in log and '"radiooff"' in log
    assert not agent.notify.messages  # never READY
    assert not agent.state_dir.exists()  # nothing was started


def test_a_terminal_that_boots_without_its_modem_still_reports(home_modem, agent_process, subscriber, mosquitto, tmp_path):
    """SPEC §2: with [device] id = "imei" the IMEI last read is kept, so a terminal whose
    modem is missing at boot still connects under its id and says so (`modem_lost`)."""
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)
    wait_event(platform, "radio_restored")
    assert agent.stop() == 0

    mark = last_seq(platform)
    agent.reconfigure(modem={"port": str(tmp_path / "gone")})
    ready = agent.restart()
    assert ready["STATUS"].startswith("waiting for modem"), ready
    lost = wait_event(platform, "modem_lost", after=mark)
    assert "gone" in lost["data"]["reason"]
    platform.wait_for(lambda sub: [m for m in sub.messages("/state") if m.topic == f"simagent/{IMEI}/state"
                                   and m.json()["modem_present"] is False],
                      what="the state document of the remembered IMEI, modem absent")
    assert agent.stop() == 0


def test_provision_file_binds_before_the_first_decision(home_modem, agent_process, subscriber, mosquitto, tmp_path):
    """`provisioned` mode: a token written at manufacturing is read at start, so the very
    first decision is ok and no violation is ever recorded."""
    provision = tmp_path / "provision.jwt"
    provision.write_text("# written at the factory\n" + sign_token("rebind", HOME_ICCID) + "\n")
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto, binding={"mode": "provisioned", "provision_file": str(provision)})
    ready = agent.wait_ready()
    assert ready["STATUS"] == "binding ok", ready
    wait_event(platform, "radio_restored")
    types = [e["type"] for e in events(platform)]
    assert "token_accepted" in types and "bound" in types and "binding_violation" not in types
    wait_modem(home_modem, lambda s: s["cfun"] == 1, "the radio on for the provisioned card")
    assert agent.stop() == 0


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_provision_file_that_is_not_a_file_stalls_nothing(home_modem, agent_process, subscriber, mosquitto, tmp_path, kind):
    """A FIFO there froze the whole loop (read on it, waiting for a writer); /dev/zero
    filled the memory. It is refused unread and logged; the gate and the socket go on."""
    provision = tmp_path / "provision.jwt"
    os.mkfifo(provision) if kind == "fifo" else provision.symlink_to("/dev/zero")
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto, binding={"provision_file": str(provision)})
    wait_event(platform, "radio_restored", timeout=15)
    assert agent.cli("status", "--json", timeout=20).returncode == 0
    assert "not a regular file" in agent.log
    assert agent.stop() == 0


def test_telemetry_samples_reach_the_platform(home_modem, agent_process, subscriber, mosquitto):
    platform = subscriber(mosquitto, "simagent/#")  # validates every message against its schema
    agent_process(home_modem, mosquitto, telemetry={"interval": 5.0})
    wait_event(platform, "radio_restored")
    sample = platform.wait_for(lambda sub: next(iter(sub.documents("/telemetry")), None), timeout=15,
                               what="a telemetry sample")
    assert sample["registration"] in ("home", "searching", "idle") and isinstance(sample["signal_dbm"], int)
    assert sample["data"] is None  # a pty: no USB network interface to count


def test_reload_with_unreadable_mqtt_password_file_keeps_the_running_session(home_modem, agent_process, subscriber,
                                                                             mosquitto, tmp_path):
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto, env={"WATCHDOG_USEC": "4000000"})
    wait_event(platform, "radio_restored")
    mark, notified = last_seq(platform), agent.notify.mark()
    missing = tmp_path / "not-there-yet"
    agent.reconfigure(mqtt={"username": "dev", "password_file": str(missing)})
    agent.hup()
    reloaded = wait_event(platform, "config_reloaded", after=mark)
    assert reloaded["data"]["ok"] is False, reloaded["data"]
    assert "[mqtt] password_file" in reloaded["data"]["error"] and str(missing) in reloaded["data"]["error"]
    # The running session goes on (a torn down one failed five times within seconds) and
    # the daemon stays healthy: watchdog pings go on.
    agent.notify.wait_for(lambda m: m.get("WATCHDOG") == "1", since=notified, count=3, what="pings after the reload")
    mqtt = json.loads(agent.cli("status", "--json").stdout)["mqtt"]
    assert mqtt["connected"] is True, mqtt
    assert "task reporting ended" not in agent.log


def test_an_mqtt_file_missing_at_start_holds_back_mqtt_not_the_gate(home_modem, agent_process, subscriber, mosquitto,
                                                                     tmp_path):
    """A password file put in place after the agent starts (enrolment, a late mount): the
    daemon starts and gates the radio, status says why MQTT waits, and MQTT comes once the
    file is there. (Refusing the start, exit 78, stopped the gate itself: systemd does
    not restart a unit on 78.)"""
    later = tmp_path / "password-later"
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto, mqtt={"username": "dev", "password_file": str(later)})
    agent.wait_ready()
    wait_modem(home_modem, lambda s: s["cfun"] == 1, "the home card decided and on")
    mqtt = json.loads(agent.cli("status", "--json", check=True).stdout)["mqtt"]
    assert not mqtt["connected"] and "MQTT not started" in mqtt["last_error"] and str(later) in mqtt["last_error"], mqtt
    later.write_text("secret\n")
    platform.wait_for(lambda sub: any(d["online"] for d in sub.documents("/status")), timeout=20, what="online")
    assert "task reporting ended" not in agent.log


def test_reload_of_state_dir_is_kept_until_a_restart(home_modem, agent_process, subscriber, mosquitto, tmp_path):
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)
    wait_event(platform, "radio_restored")
    mark = last_seq(platform)
    agent.reconfigure(device={"state_dir": str(tmp_path / "moved-state")}, telemetry={"interval": 30.0})
    agent.hup()
    reloaded = wait_event(platform, "config_reloaded", after=mark)
    assert reloaded["data"] == {"ok": True, "changed": ["telemetry"], "restart_required": ["device.state_dir"]}
    assert "device.state_dir needs a restart" in agent.log
    status = agent.cli("status", "--json")
    assert status.returncode == 0, (reloaded["data"], status.stdout, status.stderr)
    doc = json.loads(status.stdout)
    assert "outbox" in doc and doc["mqtt"]["connected"], doc


def test_two_quick_reloads_leave_no_reporter_on_the_old_endpoint(make_broker, home_modem, agent_process, subscriber):
    old, new = make_broker(), make_broker()
    on_old = subscriber(old, "simagent/#")
    on_new = subscriber(new, "simagent/#")
    agent = agent_process(home_modem, old)
    wait_event(on_old, "radio_restored")
    os.kill(old.process.pid, signal.SIGSTOP)  # the old broker is slow to answer for a moment
    try:
        agent.reconfigure(mqtt={"port": new.port})
        agent.hup()
        time.sleep(0.5)
        agent.reconfigure(mqtt={"port": new.port, "keepalive": 12})
        agent.hup()  # while the first reload's reporter is still saying goodbye
        time.sleep(0.5)
    finally:
        os.kill(old.process.pid, signal.SIGCONT)
    on_new.wait_for(lambda sub: any(d["online"] for d in sub.documents("/status")), what="online on the new broker")
    before = len(on_old.documents(f"{P}/cmd/result"))
    on_old.publish(f"{P}/cmd", json.dumps({"id": uuid.uuid4().hex, "name": "ping", "args": {}}))
    # A ping on the new broker is answered: had a reporter on the old one been left, it would have answered by then too.
    on_new.publish(f"{P}/cmd", json.dumps({"id": uuid.uuid4().hex, "name": "ping", "args": {}}))
    on_new.wait_for(lambda sub: sub.documents(f"{P}/cmd/result"), what="the ping answered on the new broker")
    time.sleep(1)
    answered = on_old.documents(f"{P}/cmd/result")[before:]
    assert not answered, f"a reporter still serves commands on the old endpoint: {answered}"
