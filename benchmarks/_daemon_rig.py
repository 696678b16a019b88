"""The whole daemon as it runs on a device, for the daemon benchmarks: a local mosquitto,
the real `simagent-fakemodem` in its own process, `simagent run` in its own process with
a configuration file and a NOTIFY_SOCKET, and a platform-side paho subscriber to `P/#`.

Also the /proc readings the idle and memory figures are made of (Linux only).
"""

from __future__ import annotations

import json
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from simagent_lab.localagent import AgentProcess, loopback_sections, merge
from simagent_lab.localbroker import Broker
from simagent_lab.fakemodem_handles import ProcessFakeModem

IMEI = "864505040000013"
HOME_ICCID = "89860321234567890123"
FOREIGN_ICCID = "89860098765432109876"
READY_TIMEOUT_S = 20.0
UNIT_FILE = Path(__file__).resolve().parent.parent / "systemd" / "simagent.service"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def start_agent(directory: Path, broker_port: int, modem_port: str, **sections: dict) -> AgentProcess:
    """`simagent run` with defaults everywhere (telemetry every 60 s, keepalive 60 s) but
    for the local broker without TLS, the fake's port, paths in `directory` and
    `sections` (e.g. `binding={...}`); the watchdog armed as systemd arms it for the
    shipped unit. Returns once READY=1 came: `agent.wait_ready().received_at -
    agent.spawned` is the start time."""
    agent = AgentProcess(directory, merge(loopback_sections(directory, modem_port, broker_port, log_level="warning"),
                                          sections),
                         env={"WATCHDOG_USEC": str(unit_watchdog_usec())})
    agent.start()
    try:
        agent.wait_ready(timeout=READY_TIMEOUT_S)
    except TimeoutError:
        agent.close()
        raise RuntimeError(f"the agent did not report READY=1; log:\n{agent.log[-3000:]}") from None
    return agent


def unit_watchdog_usec() -> int:
    """WatchdogSec= of the shipped unit, in microseconds."""
    for line in UNIT_FILE.read_text().splitlines():
        if line.startswith("WatchdogSec="):
            return int(float(line.split("=", 1)[1].strip().rstrip("s")) * 1_000_000)
    raise RuntimeError(f"{UNIT_FILE} sets no WatchdogSec=")


class Platform:
    """A paho subscriber to the agent's topics; `events` holds (receipt time, event)."""

    def __init__(self, port: int) -> None:
        self.events: queue.Queue[tuple[float, dict]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-platform")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("simagent/+/events", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        self.events.put((time.monotonic(), json.loads(message.payload)))

    def wait_event(self, type_: str, timeout: float = 10.0) -> tuple[float, dict]:
        """The next event of `type_` (earlier ones of other types are dropped)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                received, event = self.events.get(timeout=remaining)
            except queue.Empty:
                break
            if event.get("type") == type_:
                return received, event
        raise TimeoutError(f"no {type_} event within {timeout} s")

    def drain(self) -> None:
        while not self.events.empty():
            self.events.get_nowait()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Rig:
    """Broker and fake modem (Quectel: hot-swap URCs, so no SIM polling) in `directory`."""

    directory: Path

    def __enter__(self) -> "Rig":
        self.broker = Broker(self.directory / "broker").start()
        try:
            self.modem = ProcessFakeModem(self.directory, "ttyFAKE", profile="quectel", imei=IMEI, iccid=HOME_ICCID)
        except BaseException:
            self.broker.stop()
            raise
        self.control_socket = self.directory / "control.sock"
        return self

    def start_agent(self, **sections: dict) -> AgentProcess:
        return start_agent(self.directory, self.broker.port, self.modem.port, **sections)

    def __exit__(self, *exc_info: object) -> None:
        self.modem.stop()
        self.broker.stop()


# -- /proc readings ------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat(5)


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches summed over every thread: each is a
    wake-up of some thread of the process."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        total += int(line.split()[1])
        except FileNotFoundError:
            continue  # the thread ended between listdir and open
    return total


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def thread_names(pid: int) -> list[str]:
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/comm") as f:
            names.append(f.read().strip())
    return names
