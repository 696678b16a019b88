"""Readings of a fleet run: the agents' own logs, mosquitto's log, the observer's messages,
the machine's CPU and the processes' memory. Times are wall-clock epoch seconds (the logs
have nothing else); series are per-second bins.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# agent.service.reporter's lines, as `simagent run` logs them on stderr (asctime, level, logger).
_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ agent\.service\.reporter: MQTT "
RETRY = re.compile(_STAMP + r"\S+: (.*); retrying in ([\d.]+) s$")
CONNECTED = re.compile(_STAMP + r"connected to \S+ (?:again|\(.*\))$")
LOSS_PREFIX = "connection lost"  # a cause that ends a session: not an attempt
# mosquitto's log: epoch seconds, and one line per accepted MQTT session.
BROKER_CONNECTED = re.compile(r"^(\d+): New client connected from \S+ as (\S+) ")


def _epoch(stamp: str) -> float:
    # logging's asctime is local time, as is the machine's wall clock read by time.time().
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class AgentLog:
    """One agent's connection history from its own log."""

    losses: list[float] = field(default_factory=list)  # a session ended
    attempts: list[float] = field(default_factory=list)  # failed attempts and connects
    connects: list[float] = field(default_factory=list)
    # For each attempt that followed a logged delay: attempt time - (log time + delay).
    # Near 0 when the process ran when its timer fired; CPU saturation makes it grow.
    lateness: list[tuple[float, float]] = field(default_factory=list)  # (attempt time, lateness)


def parse_agent_log(text: str) -> AgentLog:
    parsed = AgentLog()
    due: float | None = None  # when the next attempt was scheduled
    for line in text.splitlines():
        if m := RETRY.match(line):
            t = _epoch(m[1])
            if m[2].startswith(LOSS_PREFIX):
                parsed.losses.append(t)
            else:
                parsed.attempts.append(t)
                if due is not None:
                    parsed.lateness.append((t, t - due))
            due = t + float(m[3])
        elif m := CONNECTED.match(line):
            t = _epoch(m[1])
            parsed.attempts.append(t)
            parsed.connects.append(t)
            if due is not None:
                parsed.lateness.append((t, t - due))
            due = None
    return parsed


def parse_broker_connects(text: str, client_prefix: str = "simagent-") -> list[float]:
    """The time of every MQTT session mosquitto accepted from an agent (1 s resolution)."""
    return [float(m[1]) for line in text.splitlines()
            if (m := BROKER_CONNECTED.match(line)) and m[2].startswith(client_prefix)]


def per_second(times: list[float], start: float, end: float) -> list[int]:
    """Counts in 1-second bins [start + i, start + i + 1) for start <= t < end."""
    counts = [0] * max(0, int(end - start) + 1)
    for t in times:
        if start <= t < end:
            counts[int(t - start)] += 1
    return counts


def mean_per_second(samples: list[tuple[float, float]], start: float, end: float) -> list[float | None]:
    """The mean of the samples in each second (None: no sample in it)."""
    groups: list[list[float]] = [[] for _ in range(max(0, int(end - start) + 1))]
    for t, value in samples:
        if start <= t < end:
            groups[int(t - start)].append(value)
    return [round(statistics.fmean(g), 1) if g else None for g in groups]


def counter_per_second(samples: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """Per-second increments of a cumulative counter from mosquitto's $SYS topics. mosquitto
    publishes a $SYS value each `sys_interval` (1 s) only when it changed, so an increment
    belongs to the second it was published in; a counter that went down (the broker
    restarted) starts over."""
    counts = [0.0] * max(0, int(end - start) + 1)
    for (_, v0), (t1, v1) in zip(samples, samples[1:]):
        if v1 >= v0 and start <= t1 < end:
            counts[int(t1 - start)] += v1 - v0
    return counts


def held_value_per_second(samples: list[tuple[float, float]], start: float, end: float) -> list[float | None]:
    """A $SYS gauge per second: the last value published (it is published only on change)."""
    values: list[float | None] = [None] * max(0, int(end - start) + 1)
    current = None
    samples = sorted(samples)
    index = 0
    for i in range(len(values)):
        while index < len(samples) and samples[index][0] < start + i + 1:
            current = samples[index][1]
            index += 1
        values[i] = current
    return values


class CpuSampler:
    """Twice a second: the busy share of all cores (/proc/stat), the share the fleet's own
    processes use (their utime + stime: the machine is shared) and the 1-minute load."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.5) -> None:
        self.samples: list[tuple[float, float, float, float]] = []  # (time, busy %, fleet %, loadavg)
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def start(self) -> "CpuSampler":
        self._thread.start()
        return self

    @staticmethod
    def _jiffies() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    def _fleet_jiffies(self) -> dict[int, int]:
        used = {}
        for pid in self._pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # ended since the list was made
                continue
            used[pid] = int(fields[11]) + int(fields[12])  # utime + stime, fields 14 and 15 of stat(5)
        return used

    def _run(self) -> None:
        busy0, total0 = self._jiffies()
        fleet0 = self._fleet_jiffies()
        while not self._stop.wait(self._interval):
            busy1, total1 = self._jiffies()
            fleet1 = self._fleet_jiffies()
            with open("/proc/loadavg") as f:
                load = float(f.read().split()[0])
            if total1 > total0:
                fleet_used = sum(used - fleet0.get(pid, used) for pid, used in fleet1.items())
                self.samples.append((time.time(), 100.0 * (busy1 - busy0) / (total1 - total0),
                                     100.0 * fleet_used / (total1 - total0), load))
            busy0, total0, fleet0 = busy1, total1, fleet1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB. PSS splits shared pages (the interpreter, libraries) among the
    processes that map them, so the PSS of all add up to what they take together."""
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def memory_figures(pids: dict[str, list[int]]) -> dict:
    figures: dict = {}
    for group, members in pids.items():
        readings = [memory_kb(pid) for pid in members]
        rss = [r / 1024 for r, _ in readings]
        figures[group] = {
            "count": len(readings),
            "rss_total_mb": round(sum(rss)),
            "pss_total_mb": round(sum(p for _, p in readings) / 1024),
            "rss_per_process_mb": {"mean": round(sum(rss) / len(rss), 1), "max": round(max(rss), 1)} if rss else None,
        }
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    figures["machine_available_gb"] = round(info["MemAvailable"] / 1024**2, 1)
    return figures


def observed_events(messages: list[tuple[float, str, bytes, bool]]) -> dict[str, dict[int, list[str]]]:
    """device id -> seq -> the event ids received for it (more than one receipt: a duplicate)."""
    events: dict[str, dict[int, list[str]]] = {}
    for _, topic, payload, _ in messages:
        parts = topic.split("/")
        if len(parts) == 3 and parts[0] == "simagent" and parts[2] == "events":
            event = json.loads(payload)
            events.setdefault(parts[1], {}).setdefault(event["seq"], []).append(event["id"])
    return events


def event_types(messages: list[tuple[float, str, bytes, bool]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, topic, payload, _ in messages:
        if topic.startswith("simagent/") and topic.endswith("/events"):
            kind = json.loads(payload)["type"]
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def delivery(committed: dict[str, tuple[int, set[int]]], received: dict[str, dict[int, list[str]]]) -> dict:
    """Every event an agent committed (seq 1..last: the store numbers them without gaps)
    against what the observer received. Lost = neither received nor still in the outbox."""
    totals = {"committed": 0, "received_unique": 0, "duplicates": 0, "pending_in_outbox": 0, "lost": 0,
              "seq_with_two_ids": 0}
    lost_examples = []
    for device, (last_seq, pending) in committed.items():
        got = received.get(device, {})
        lost = [seq for seq in range(1, last_seq + 1) if seq not in got and seq not in pending]
        totals["committed"] += last_seq
        totals["received_unique"] += sum(1 for seq in got if seq <= last_seq)
        totals["duplicates"] += sum(len(ids) - 1 for ids in got.values())
        totals["seq_with_two_ids"] += sum(1 for ids in got.values() if len(set(ids)) > 1)
        totals["pending_in_outbox"] += len(pending - set(got))
        totals["lost"] += len(lost)
        lost_examples += [f"{device}#{seq}" for seq in lost[:3]]
    totals["lost_examples"] = lost_examples[:10]
    return totals
