"""SIM swap -> `binding_violation` at an MQTT subscriber on loopback, through the whole
daemon (SPEC §11: p99 ≤ 250 ms).

`simagent run` with the real fake-modem process (Quectel, hot-swap URCs) and a local
mosquitto. Each round swaps in a foreign card (the fake's `sim-insert` control operation;
the clock starts when the benchmark sends it) and stops the clock when a platform-side
paho subscriber receives the `binding_violation` event; then the bound card goes back in
and the clock runs again until `radio_restored` arrives. Both clocks are this process's
time.monotonic(), so the figure includes the fake, the pty, the daemon's reaction, the
outbox transaction, the QoS 1 publish and the broker's delivery.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._daemon_rig import FOREIGN_ICCID, HOME_ICCID, Platform, Rig

SWAPS = 150
SETTLE_S = 2.0  # after READY=1: MQTT connect, the first state and events published


def _p99_ms(values: list[float]) -> float:
    return round(statistics.quantiles(values, n=100, method="inclusive")[98] * 1000, 1)


def _timed_insert(rig: Rig, platform: Platform, iccid: str, event: str) -> float:
    platform.drain()
    sent = time.monotonic()
    rig.modem.sim_insert(iccid)
    received, _ = platform.wait_event(event)
    return received - sent


def run() -> dict:
    violations, restores = [], []
    with tempfile.TemporaryDirectory(prefix="simagent-bench-daemon-swap-") as name, Rig(Path(name)) as rig:
        agent = rig.start_agent()
        platform = Platform(rig.broker.port)
        try:
            time.sleep(SETTLE_S)
            for _ in range(SWAPS):
                violations.append(_timed_insert(rig, platform, FOREIGN_ICCID, "binding_violation"))
                restores.append(_timed_insert(rig, platform, HOME_ICCID, "radio_restored"))
        finally:
            platform.close()
            agent.stop()
            agent.close()
    return {
        "swap_to_mqtt_event_p99_ms": _p99_ms(violations),
        "swap_to_mqtt_event_median_ms": round(statistics.median(violations) * 1000, 1),
        "swap_to_mqtt_restore_p99_ms": _p99_ms(restores),
        "swap_to_mqtt_count": SWAPS,
    }
