"""The daemon as a whole (`simagent run` against the fake modem and a local mosquitto):
start to READY=1, idle CPU and wake-ups, idle RSS and RSS growth under load (SPEC §11).

- start: fork of `simagent run` -> READY=1 on its NOTIFY_SOCKET, over START_RUNS starts on
  one state directory (the first is a first boot that binds, the others restarts). The
  baseline in the same run is the bare interpreter plus `import agent.service.daemon`.
- idle: the daemon with the modem present, the card bound, the broker connected and the
  default telemetry interval (60 s), watchdog armed as the shipped unit arms it; CPU from
  /proc/PID/stat, wake-ups = context switches of all its threads, over IDLE_S seconds.
- RSS: VmRSS when idle (`rss_mb`); beside it, in the same run, the baseline: a bare
  interpreter that imports what the daemon cannot do without (asyncio, sqlite3, ssl,
  paho, pyudev, pyserial). Then after one token check (`bind accept` of a signed rebind
  token on the control socket) and one evidence export (`rss_after_crypto_mb`: both are
  done in helper processes, so cryptography never loads into the daemon). Then again
  after AT_COMMANDS `at` control operations (one persistent connection, as root) and
  EVENTS `token_refused` events (malformed tokens given to `bind accept`: each one is
  refused, recorded in the outbox and published), both after a warm-up of the same work
  so caches and the allocator have settled. (Hostile MQTT commands were the event load
  until refusals were rate-limited: 20 recorded per 10 s, the rest counted in a summary.)
- The agent's modules are byte-compiled first, as the Debian package's postinst does:
  modules compiled at every start (PYTHONDONTWRITEBYTECODE) cost about 0.3 MB more.
"""

from __future__ import annotations

import asyncio
import compileall
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.platform import keys
from agent.service.control import ControlClient
from benchmarks._daemon_rig import HOME_ICCID, IMEI, Platform, Rig, context_switches, cpu_seconds, rss_mb

START_RUNS = 5
IDLE_S = 20.0
SETTLE_S = 3.0  # after READY=1: MQTT connect, first state and status publishes
AT_COMMANDS = 100_000
AT_WARMUP = 5_000
EVENTS = 10_000
EVENT_WARMUP = 1_000
EVENT_BATCH = 50  # refusals sent before their events are awaited
BASELINE_RUNS = 3
BASELINE_IMPORTS = "import asyncio, sqlite3, ssl, paho.mqtt.client, pyudev, serial"
AGENT_PACKAGES = ("agent", "at_commands")


def _python_import_s(runs: int = START_RUNS) -> float:
    """Median wall time of a fresh interpreter that imports agent.service.daemon and exits."""
    times = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "import agent.service.daemon"], check=True)
        times.append(time.monotonic() - started)
    return statistics.median(times)


def _baseline_rss_mb(runs: int = BASELINE_RUNS) -> float:
    """Median VmRSS of a fresh interpreter that imports BASELINE_IMPORTS."""
    script = BASELINE_IMPORTS + "\nprint(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"
    return statistics.median(
        int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout) / 1024
        for _ in range(runs))


def _byte_compile() -> None:
    root = Path(__file__).resolve().parent.parent
    for package in AGENT_PACKAGES:
        compileall.compile_dir(root / package, quiet=1)


async def _token_check_and_export(socket_path: Path, token: str) -> None:
    """One `bind accept` of `token` and one evidence export, as root on the control socket."""
    client = await ControlClient.connect(socket_path)
    if client is None:
        raise RuntimeError(f"no daemon answers on {socket_path}")
    async with client:
        answer = await client.call("bind_accept", token=token)
        if not answer.get("accepted"):
            raise RuntimeError(f"the token was refused: {answer}")
        await client.call("export_evidence")


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


async def _refused_tokens(socket_path: Path, platform: Platform, count: int) -> float:
    """`count` malformed tokens to `bind_accept` in batches; waits for each batch's
    `token_refused` events at the platform. Returns events per second."""
    client = await ControlClient.connect(socket_path)
    if client is None:
        raise RuntimeError(f"no daemon answers on {socket_path}")
    async with client:
        started = time.monotonic()
        sent = 0
        while sent < count:
            batch = min(EVENT_BATCH, count - sent)
            for i in range(batch):
                await client.call("bind_accept", token=f"not-a-token-{sent + i}")
            for _ in range(batch):
                await asyncio.to_thread(platform.wait_event, "token_refused", 30)
            sent += batch
        return count / (time.monotonic() - started)


def run() -> dict:
    _byte_compile()
    with tempfile.TemporaryDirectory(prefix="simagent-bench-daemon-") as name, Rig(Path(name)) as rig:
        python_import = _python_import_s()
        baseline_rss = _baseline_rss_mb()
        starts = _start_to_ready(rig)
        operator = keys.generate(Path(name) / "operator.key")
        agent = rig.start_agent(binding={"trusted_keys": [operator.trusted_keys_value]})
        platform = Platform(rig.broker.port)
        try:
            time.sleep(SETTLE_S)
            idle_cpu, wakeups = _idle(agent.pid)
            idle_rss = rss_mb(agent.pid)
            token = keys.mint(keys.load_private_key(operator.private_path), "rebind", IMEI, iccid=HOME_ICCID, ttl_s=600)
            asyncio.run(_token_check_and_export(rig.control_socket, token))
            time.sleep(1.0)  # the re-check the accepted token started
            crypto_rss = rss_mb(agent.pid)
            asyncio.run(_at_commands(rig.control_socket, AT_WARMUP))
            asyncio.run(_refused_tokens(rig.control_socket, platform, EVENT_WARMUP))
            rss_before = rss_mb(agent.pid)
            at_rate = asyncio.run(_at_commands(rig.control_socket, AT_COMMANDS))
            event_rate = asyncio.run(_refused_tokens(rig.control_socket, platform, EVENTS))
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
        "rss_after_crypto_mb": round(crypto_rss, 1),
        "rss_baseline_mb": round(baseline_rss, 1),
        "rss_over_baseline_mb": round(idle_rss - baseline_rss, 1),
        "rss_ratio_to_baseline": round(idle_rss / baseline_rss, 3),
        "rss_growth_mb": round(rss_after - rss_before, 2),
        "rss_load_at_commands": AT_COMMANDS,
        "rss_load_events": EVENTS,
        "daemon_at_per_s": round(at_rate),
        "daemon_events_per_s": round(event_rate),
    }
