"""The fleet run, step by step: all online, settle, SIM swaps on a share of the fleet, the
broker stopped (more swaps while it is down, so events wait in the outboxes), started again
on the same port after the outage, every agent back online, the swapped cards restored,
the outboxes drained, the agents stopped; then the figures (`figures`) from the readings.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.fleet import measure, model
from benchmarks.fleet.rig import Fleet, Terminal, retained_statuses
from simagent_lab.localbroker import MOSQUITTO

MODEL_RUNS = 200  # simulated fleets of the measured size, for the model's spread


@dataclass(frozen=True)
class Scenario:
    n: int = 100
    outage_s: float = 10.0
    settle_s: float = 15.0
    swap_share: float = 0.2  # of the fleet, before the outage; as many again during it
    recovery_timeout_s: float = 240.0  # the model's slowest of 100 in 200 runs: 110 s
    drain_timeout_s: float = 60.0


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)
    return time.time()


def online_since(observer, since: float, live_only: bool) -> dict[str, float]:
    """device id -> receipt time of its first `online: true` status at or after `since`."""
    first: dict[str, float] = {}
    for received, topic, payload, retain in observer.snapshot():
        parts = topic.split("/")
        if received < since or len(parts) != 3 or parts[2] != "status" or (live_only and retain):
            continue
        if json.loads(payload).get("online") is True:
            first.setdefault(parts[1], received)
    return first


def devices_with(observer, event_type: str) -> set[str]:
    """The devices the observer received an event of `event_type` from."""
    return {topic.split("/")[1] for _, topic, payload, _ in observer.snapshot()
            if topic.endswith("/events") and json.loads(payload)["type"] == event_type}


def run(scenario: Scenario, directory: Path, progress=print) -> dict:
    fleet = Fleet(directory, scenario.n)
    cpu = measure.CpuSampler(lambda: [pid for group in fleet.pids().values() for pid in group]).start()
    marks: dict[str, float] = {"begin": time.time()}
    devices = {term.device_id for term in fleet.terminals}
    share = max(1, round(scenario.swap_share * scenario.n))
    swapped_before, swapped_during = fleet.terminals[:share], fleet.terminals[share:2 * share]
    try:
        fleet.start(progress)
        marks["all_online"] = wait_until(lambda: devices <= online_since(fleet.observer, 0, False).keys(), 60,
                                         "every agent online:true")
        progress(f"all {scenario.n} online; settling {scenario.settle_s:.0f} s")
        time.sleep(scenario.settle_s)
        memory_settled = measure.memory_figures(fleet.pids())

        marks["swap_before"] = time.time()
        fleet.each(lambda term: swap(term, term.foreign_iccid), swapped_before)
        wait_until(lambda: {t.device_id for t in swapped_before} <= devices_with(fleet.observer, "binding_violation"),
                   30, "binding_violation of every card swapped before the outage")
        marks["broker_stop"] = time.time()
        fleet.broker.stop()
        progress(f"broker stopped; down for {scenario.outage_s:.0f} s")
        time.sleep(min(2.0, scenario.outage_s / 2))
        marks["swap_during"] = time.time()
        fleet.each(lambda term: swap(term, term.foreign_iccid), swapped_during)
        time.sleep(max(0.0, marks["broker_stop"] + scenario.outage_s - time.time()))
        fleet.broker.start()
        marks["broker_up"] = time.time()
        progress("broker started again; waiting for every agent")
        marks["all_back"] = wait_until(
            lambda: devices <= online_since(fleet.observer, marks["broker_up"], True).keys(),
            scenario.recovery_timeout_s, "every agent back online after the restart")
        progress(f"all back after {marks['all_back'] - marks['broker_up']:.1f} s; restoring the swapped cards")

        marks["restore"] = time.time()
        fleet.each(lambda term: swap(term, term.home_iccid), swapped_before + swapped_during)
        marks["drained"] = wait_until(lambda: all(not term.outbox()[1] for term in fleet.terminals),
                                      scenario.drain_timeout_s, "every outbox empty", poll=1.0)
        retained = retained_statuses(fleet.broker.port, len(devices))
        memory_after = measure.memory_figures(fleet.pids())
        marks["agents_stop"] = time.time()
        exit_codes = fleet.stop_agents()
        wait_until(lambda: devices <= devices_with(fleet.observer, "agent_stopping"), 10,
                   "agent_stopping of every agent")
        committed = {term.device_id: term.outbox() for term in fleet.terminals}
        marks["end"] = time.time()
    finally:
        cpu.stop()
        fleet.close()
    return figures(scenario, fleet, marks, cpu, committed, retained, exit_codes,
                   {"settled": memory_settled, "after_recovery": memory_after})


def swap(term: Terminal, iccid: str) -> None:
    term.modem.sim_remove()
    term.modem.sim_insert(iccid)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(scenario: Scenario, fleet: Fleet, marks: dict[str, float], cpu: measure.CpuSampler,
            committed: dict, retained: dict[str, bytes], exit_codes: list[int], memory: dict) -> dict:
    stop, up = marks["broker_stop"], marks["broker_up"]
    logs = {term.device_id: measure.parse_agent_log(term.agent.log) for term in fleet.terminals}
    messages = fleet.observer.snapshot()
    broker_connects = measure.parse_broker_connects(fleet.broker.log())

    # Series: 1-second bins from a little before the stop to the end, one bin edge at the
    # stop; x = seconds from the stop.
    start = stop - math.ceil(stop - max(marks["all_online"], stop - 20))
    end = marks["end"]

    def bins(times: list[float]) -> list[int]:
        return measure.per_second(times, start, end)

    def sys_samples(suffix: str) -> list[tuple[float, float]]:
        return [(t, float(payload)) for t, topic, payload, _ in messages if topic == f"$SYS/broker/{suffix}"]

    attempts = [t for log in logs.values() for t in log.attempts]
    agent_messages = [t for t, topic, _, _ in messages if topic.startswith("simagent/")]
    events = [t for t, topic, _, _ in messages if topic.endswith("/events")]
    series = {
        "t_from_broker_stop_s": [round(start - stop + i, 1) for i in range(len(bins([])))],
        "connect_attempts_per_s": bins(attempts),
        "agent_connects_per_s": bins([t for log in logs.values() for t in log.connects]),
        "broker_connects_per_s": bins(broker_connects),
        "observer_messages_per_s": bins(agent_messages),
        "observer_events_per_s": bins(events),
        "broker_publish_received_per_s": measure.counter_per_second(
            sys_samples("publish/messages/received"), start, end),
        "broker_clients_connected": [None if stop <= start + i < up else value for i, value in enumerate(
            measure.held_value_per_second(sys_samples("clients/connected"), start, end))],  # none while down
        "cpu_busy_pct": measure.mean_per_second([(t, busy) for t, busy, _, _ in cpu.samples], start, end),
        "fleet_cpu_pct": measure.mean_per_second([(t, own) for t, _, own, _ in cpu.samples], start, end),
    }

    # Recovery: per agent, the first connect after the restart (its log) and the observer's
    # first live online:true after it.
    back_agent_log = [min(t for t in log.connects if t >= up) - up for log in logs.values()
                      if any(t >= up for t in log.connects)]
    back_observer = [t - up for t in online_since(fleet.observer, up, True).values()]
    losses = [min(t for t in log.losses if t >= stop) for log in logs.values() if any(t >= stop for t in log.losses)]
    outage = up - statistics.median(losses) if losses else up - stop
    lateness = [late for log in logs.values() for t, late in log.lateness if t >= stop]
    recovery_cpu = [(busy, own) for t, busy, own, _ in cpu.samples if stop <= t <= marks["all_back"]]
    simulated = model.simulate(scenario.n, outage, MODEL_RUNS)
    prediction = model.summary(scenario.n, outage, simulated)
    measured_back = max(back_agent_log) if back_agent_log else None

    return {
        "scenario": asdict(scenario),
        "machine": machine(),
        "marks_from_broker_stop_s": {k: round(v - stop, 2) for k, v in marks.items()},
        "outage_s": round(outage, 2),
        "peak_connect_attempts_per_s": max(bins([t for t in attempts if t >= stop]), default=0),
        # While the broker was down: the count the model predicts for this outage, measured.
        "connect_attempts_during_outage": sum(1 for t in attempts if stop <= t < up),
        "peak_agent_connects_per_s_after_restart": max(bins([t for log in logs.values() for t in log.connects
                                                             if t >= up]), default=0),
        "peak_broker_connects_per_s_after_restart": max(bins([t for t in broker_connects if t >= int(up)]), default=0),
        "all_back_after_restart_s": {
            "agent_logs": round(measured_back, 2) if measured_back is not None else None,
            "observer_online_true": round(max(back_observer), 2) if back_observer else None,
            "agents_back": len(back_agent_log),
            "median_agent_logs": round(statistics.median(back_agent_log), 2) if back_agent_log else None,
        },
        # the broker's persistence at work: the observer reconnected to the session it had
        "observer_session_present_after_restart": fleet.observer.session_present[1:],
        "retained_online_true": sum(1 for p in retained.values() if json.loads(p).get("online") is True),
        "events": measure.delivery(committed, measure.observed_events(messages)),
        "events_received_by_type": measure.event_types(messages),
        "agent_exit_codes": {str(code): exit_codes.count(code) for code in sorted(set(exit_codes))},
        "memory": memory,
        "cpu": {
            "what": "% of all cores; machine: everything running on it, fleet: agents + fakes + broker",
            "machine_busy_pct_max_1s": max((b for b in series["cpu_busy_pct"] if b is not None), default=None),
            "fleet_pct_max_1s": max((b for b in series["fleet_cpu_pct"] if b is not None), default=None),
            "machine_busy_pct_mean_during_recovery": _round(statistics.fmean(b for b, _ in recovery_cpu))
            if recovery_cpu else None,
            "fleet_pct_mean_during_recovery": _round(statistics.fmean(o for _, o in recovery_cpu))
            if recovery_cpu else None,
            "loadavg_1min_max": max((load for _, _, _, load in cpu.samples), default=None),
        },
        "backoff_lateness_s": {
            "what": "attempt time minus (log time + the delay it logged), after the stop; 0.05 s is the log's rounding",
            "count": len(lateness),
            "median": _round(percentile(lateness, 0.5)), "p95": _round(percentile(lateness, 0.95)),
            "max": _round(max(lateness, default=None)),
        },
        "model": {
            **{k: v for k, v in prediction.items() if k != "mean_attempts_per_s"},
            # every simulated terminal's attempts but its last (the one that succeeded)
            "attempts_during_outage": round(statistics.fmean(sum(run.attempts_per_s) - scenario.n
                                                             for run in simulated)),
            # where the measured time sits among the simulated fleets' (50: the median)
            "measured_all_back_percentile": round(100 * sum(run.back_after_s <= measured_back for run in simulated)
                                                  / len(simulated)) if measured_back is not None else None,
            "mean_attempts_per_s_from_loss": prediction["mean_attempts_per_s"],
        },
        "series": series,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3 if abs(value) < 10 else 1)


def machine() -> dict:
    with open("/proc/meminfo") as f:
        total_kb = int(f.readline().split()[1])
    version = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True).stdout.splitlines()
    return {"cores": os.cpu_count(), "memory_gb": round(total_kb / 1024**2, 1), "kernel": platform.release(),
            "python": platform.python_version(), "mosquitto": version[0] if version else None}
