"""The fault suite's end-to-end part (marker `faults`, `./dev.sh faults [--long]`): the
real `simagent run`, the real fake modem process and a real mosquitto, with SIM swaps
driving events while something breaks - kill -9 at seeded random moments, the broker
going away, the state database locked or on a file system gone read-only, the disk
filling up, a forged network time. After each: every event the agent committed reached an independent MQTT
subscriber, the binding is intact (no `state_reset`, the home card has its radio), and
the evidence chain verifies. The figures go to the `fault` fixture's table.

Damaged or lost state (truncated, zeroed, emptied, deleted) fails closed instead:
tests/e2e/test_lost_state.py; a clock at 1970 then stepped (the system clock cannot be
set on a shared machine): tests/enforcement/test_network_time.py."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time

import pytest

from agent import exitcodes

from .conftest import (FOREIGN_ICCID, HOME_ICCID, IMEI, TIMEOUT, assert_delivered_in_order, committed_event_seq, events,
                       last_seq, sign_token, swap_to, wait_event, wait_modem)
from .gate_rig import evidence_entries
from ..conftest import wait_until

pytestmark = pytest.mark.faults


@contextlib.contextmanager
def swap_load(modem, rng):
    """Events flowing: a thread swaps the foreign and the home card at a seeded random pace
    (each swap: sim_removed, sim_inserted, a decision, a radio switch); at the end the
    home card is back in the tray."""
    stop = threading.Event()
    swaps = [0]

    def swapping() -> None:
        while not stop.is_set():
            swap_to(modem, FOREIGN_ICCID if swaps[0] % 2 == 0 else HOME_ICCID)
            swaps[0] += 1
            stop.wait(rng.uniform(0.1, 0.4))

    thread = threading.Thread(target=swapping, name="swap-load", daemon=True)
    thread.start()
    try:
        yield swaps
    finally:
        stop.set()
        thread.join(10)
        if modem.state()["iccid"] != HOME_ICCID:
            swap_to(modem, HOME_ICCID)


def assert_nothing_lost_binding_intact_chain_verifies(agent, modem, platform, fault, kind: str, trials: int,
                                                      tmp_path) -> dict:
    """The three promises after a fault, and the figures row."""
    wait_modem(modem, lambda s: s["cfun"] == 1 and s["iccid"] == HOME_ICCID, "the home card's radio back", timeout=TIMEOUT)
    committed = platform.wait_for(lambda sub: (seq := committed_event_seq(agent)) <= last_seq(sub) and seq,
                                  timeout=TIMEOUT, what="every committed event at the subscriber")
    row = fault.record(kind, trials=trials, committed=range(1, committed + 1), received=[e["seq"] for e in events(platform)])
    assert row["lost"] == 0, row
    assert_delivered_in_order(platform, committed)
    assert not events(platform, ("state_reset",)), "a fault that damages nothing reset the state"

    shown = json.loads(agent.cli("bind", "show", "--json").stdout)
    assert [(b["iccid"], b["imei"]) for b in shown["bindings"]] == [(HOME_ICCID, IMEI)]

    bundle = tmp_path / f"evidence-{kind}.json"
    agent.cli("evidence", "export", "--out", str(bundle), check=True)
    verdict = agent.cli("evidence", "verify", str(bundle))
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    return row


@pytest.mark.parametrize("kind", ["kill9", "broker_restart"])
def test_kill_9_or_a_broker_restart_under_load_loses_nothing(kind, make_broker, home_modem, agent_process, subscriber,
                                                             fault, tmp_path):
    broker = make_broker(persistence=True)  # the platform's session and its queue survive a restart
    platform = subscriber(broker, "simagent/#", persistent=True)
    agent = agent_process(home_modem, broker)
    wait_event(platform, "radio_restored")
    trials = fault.trials(4 if kind == "kill9" else 2)
    with swap_load(home_modem, fault.rng) as swaps:
        for _ in range(trials):
            time.sleep(fault.rng.uniform(0.2, 1.5))  # a random moment, events flowing
            if kind == "kill9":
                agent.kill9()
                agent.restart()
            else:
                broker.stop()
                time.sleep(fault.rng.uniform(0.5, 3.0))
                broker.start()
        time.sleep(0.5)
    assert swaps[0] >= trials, "the load never ran"
    assert_nothing_lost_binding_intact_chain_verifies(agent, home_modem, platform, fault, kind, trials, tmp_path)


def agent_on_small_disk(make_small_disk, modem, agent_process, subscriber, broker):
    """A running agent, bound, its state directory on a tmpfs of its own: (disk, platform, agent)."""
    disk = make_small_disk("16m")
    platform = subscriber(broker, "simagent/#")
    agent = agent_process(modem, broker, device={"state_dir": str(disk.path / "state")})
    wait_event(platform, "radio_restored")
    return disk, platform, agent


@pytest.mark.parametrize("how", ["locked", "read_only"])
def test_a_store_unavailable_at_start_is_waited_for_or_left_alone(how, make_small_disk, home_modem, agent_process,
                                                                  subscriber, mosquitto, fault, tmp_path):
    """A lock held by another program is waited for (a restart in the middle of it
    finds the bindings); a read-only file system makes the daemon exit 75 and touch
    nothing. Neither is damage: no reset, no file moved."""
    disk, platform, agent = agent_on_small_disk(make_small_disk, home_modem, agent_process, subscriber, mosquitto)
    trials = fault.trials(1)
    for _ in range(trials):
        assert agent.stop() == 0
        before = {p.name: p.read_bytes() for p in agent.state_dir.iterdir() if not p.name.startswith("state.db-")}
        if how == "locked":
            holder = sqlite3.connect(agent.state_dir / "state.db", isolation_level=None)
            holder.execute("PRAGMA locking_mode=EXCLUSIVE")  # as a careless sqlite3 shell can
            holder.execute("BEGIN EXCLUSIVE")
            agent.start()
            time.sleep(fault.rng.uniform(0.5, 3.0))  # within the store's busy timeout
            assert agent.running, agent.log
            holder.execute("ROLLBACK")
            holder.close()
            agent.wait_ready(timeout=TIMEOUT)
        else:
            disk.read_only(True)
            try:
                agent.start()
                assert agent.wait_exit() == exitcodes.TEMPFAIL, agent.log
                after = {p.name: p.read_bytes() for p in agent.state_dir.iterdir() if not p.name.startswith("state.db-")}
                assert after == before, "a read-only store was changed"
            finally:
                disk.read_only(False)
            agent.restart()
        assert not list(agent.state_dir.glob("state.db.corrupt-*"))
    assert_nothing_lost_binding_intact_chain_verifies(agent, home_modem, platform, fault, how, trials, tmp_path)


def test_a_full_disk_holds_the_radio_off_and_loses_nothing(make_small_disk, home_modem, agent_process, subscriber,
                                                           mosquitto, fault, tmp_path):
    """The state directory on a small tmpfs filled up while the daemon runs: a card
    swapped meanwhile gets no radio (a decision that cannot be recorded is no decision),
    the daemon stays up, and once there is room again every committed event is sent."""
    disk, platform, agent = agent_on_small_disk(make_small_disk, home_modem, agent_process, subscriber, mosquitto)
    trials = fault.trials(1)
    for _ in range(trials):
        mark = last_seq(platform)
        disk.fill()
        swap_to(home_modem, FOREIGN_ICCID)
        wait_modem(home_modem, lambda s: s["cfun"] == 4, "the foreign card held off on a full disk")
        swap_to(home_modem, HOME_ICCID)
        time.sleep(fault.rng.uniform(0.5, 2.0))
        assert home_modem.state()["cfun"] == 4, "the home card came back, but nothing could be recorded"
        status = json.loads(agent.cli("status", "--json").stdout)
        assert status["binding"]["status"] == "store_unwritable", status["binding"]
        assert agent.running
        disk.free()
        wait_event(platform, "radio_restored", after=mark)
    assert_nothing_lost_binding_intact_chain_verifies(agent, home_modem, platform, fault, "disk_full", trials, tmp_path)


def test_a_forged_network_time_neither_stamps_events_nor_expires_tokens(home_modem, agent_process, subscriber,
                                                                        mosquitto, fault, tmp_path):
    """A rogue cell's NITZ for 2099 (issue 10: events were stamped 2098 as trusted, the
    floor ratcheted and every valid token was refused as `expired`, also after a
    restart): rejected, recorded, and a token signed now is still accepted."""
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)
    wait_event(platform, "radio_restored")
    trials = fault.trials(1)

    def rejected() -> int:
        return sum(e["type"] == "network_time_rejected" for e in evidence_entries(agent.state_dir))

    for trial in range(trials):
        home_modem.urc(f'+CTZE: "+32",0,"{fault.rng.randint(2030, 2099)}/01/01,00:00:00"')
        wait_until(lambda: rejected() > trial, TIMEOUT, what="the forged time rejected and recorded")
        for restart in (False, True):  # events and a token after the forged time, then after a restart
            if restart:
                agent.kill9() if fault.rng.random() < 0.5 else agent.stop()
                agent.restart()
            mark = last_seq(platform)
            swap_to(home_modem, FOREIGN_ICCID)
            wait_event(platform, "radio_blocked", after=mark)
            swap_to(home_modem, HOME_ICCID)
            wait_event(platform, "radio_restored", after=mark)
            accepted = agent.cli("bind", "accept", sign_token("rebind", HOME_ICCID))
            assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    year = time.strftime("%Y", time.gmtime())
    assert all(e["ts"].startswith(year) for e in events(platform)), sorted({e["ts"][:4] for e in events(platform)})
    assert_nothing_lost_binding_intact_chain_verifies(agent, home_modem, platform, fault, "forged_network_time", trials,
                                                      tmp_path)
