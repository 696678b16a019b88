"""The daemon as a whole (`simagent run` against the fake modem and a local mosquitto):
start to READY=1, idle CPU and wake-ups, idle RSS and RSS growth under load (SPEC §11).

- start: fork of `simagent run` -> READY=1 on its NOTIFY_SOCKET, over START_RUNS starts on
  one state directory (the first is a first boot that binds, the others restarts). The
  baseline in the same run is the bare interpreter plus `import agent.service.daemon`.
- idle: the daemon with the modem present, the card bound, the broker connected and the
  default telemetry interval (60 s), watchdog armed as the shipped unit arms it; CPU from
  /proc/PID/stat, wake-ups = context switches of all its threads, over IDLE_S seconds.
- RSS: VmRSS when idle, then again after AT_COMMANDS `at` control operations (one
  persistent connection, as root) and EVENTS `command_refused` events (hostile MQTT
  commands: each one is refused, recorded in the outbox and published), both after a
  warm-up of the same work so caches and the allocator have settled.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.service.control import ControlClient
from benchmarks._daemon_rig import IMEI, Platform, Rig, context_switches, cpu_seconds, rss_mb

START_RUNS = 5
IDLE_S = 20.0
SETTLE_S = 3.0  # after READY=1: MQTT connect, first state and status publishes
AT_COMMANDS = 100_000
AT_WARMUP = 5_000
EVENTS = 10_000
EVENT_WARMUP = 1_000
EVENT_BATCH = 50  # below the reporter's command queue (64), so no command is dropped


def _python_import_s(runs: int = START_RUNS) -> float:
    """Median wall time of a fresh interpreter that imports agent.service.daemon and exits."""
    times = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "import agent.service.daemon"], check=True)
        times.append(time.monotonic() - started)
    return statistics.median(times)


def _start_to_ready(rig: Rig) -> list[float]:
    times = []
    for _ in range(START_RUNS):
        agent = rig.start_agent()
        times.append(agent.wait_ready().received_at - agent.spawned)
        agent.stop()
        agent.close()
    return times


def _idle(pid: int) -> tuple[float, float]:
    """(% of one core, wake-ups per second) over IDLE_S."""
    cpu0, switches0, t0 = cpu_seconds(pid), context_switches(pid), time.monotonic()
    time.sleep(IDLE_S)
    cpu1, switches1, t1 = cpu_seconds(pid), context_switches(pid), time.monotonic()
    return 100 * (cpu1 - cpu0) / (t1 - t0), (switches1 - switches0) / (t1 - t0)


async def _at_commands(socket_path: Path, count: int) -> float:
    """Sends `count` AT+CSQ through the control socket; returns commands per second."""
    client = await ControlClient.connect(socket_path)
    if client is None:
        raise RuntimeError(f"no daemon answers on {socket_path}")
    async with client:
        started = time.monotonic()
        for _ in range(count):
            await client.call("at", command="AT+CSQ")
        return count / (time.monotonic() - started)


def _hostile_commands(platform: Platform, count: int) -> float:
    """`count` malformed commands on P/cmd, in batches; waits for each batch's
    `command_refused` events at the platform. Returns events per second."""
    topic = f"simagent/{IMEI}/cmd"
    started = time.monotonic()
    sent = 0
    while sent < count:
        batch = min(EVENT_BATCH, count - sent)
        for i in range(batch):
            platform.publish(topic, b"{not json " + str(sent + i).encode())
        for _ in range(batch):
            platform.wait_event("command_refused", timeout=30)
        sent += batch
    return count / (time.monotonic() - started)


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="simagent-bench-daemon-") as name, Rig(Path(name)) as rig:
        python_import = _python_import_s()
        starts = _start_to_ready(rig)
        agent = rig.start_agent()
        platform = Platform(rig.broker.port)
        try:
            time.sleep(SETTLE_S)
            idle_cpu, wakeups = _idle(agent.pid)
            idle_rss = rss_mb(agent.pid)
            asyncio.run(_at_commands(rig.control_socket, AT_WARMUP))
            _hostile_commands(platform, EVENT_WARMUP)
            rss_before = rss_mb(agent.pid)
            at_rate = asyncio.run(_at_commands(rig.control_socket, AT_COMMANDS))
            event_rate = _hostile_commands(platform, EVENTS)
            rss_after = rss_mb(agent.pid)
        finally:
            platform.close()
            agent.stop()
            agent.close()
    return {
        "start_to_ready_s": round(statistics.median(starts), 3),
        "start_to_ready_max_s": round(max(starts), 3),
        "start_to_ready_runs": START_RUNS,
        "python_import_s": round(python_import, 3),
        "idle_cpu_pct": round(idle_cpu, 3),
        "idle_wakeups_per_s": round(wakeups, 2),
        "idle_window_s": IDLE_S,
        "rss_mb": round(idle_rss, 1),
        "rss_growth_mb": round(rss_after - rss_before, 2),
        "rss_load_at_commands": AT_COMMANDS,
        "rss_load_events": EVENTS,
        "daemon_at_per_s": round(at_rate),
        "daemon_events_per_s": round(event_rate),
    }
