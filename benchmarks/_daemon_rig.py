"""The whole daemon as it runs on a device, for the daemon benchmarks: a local mosquitto,
the real `simagent-fakemodem` in its own process, `simagent run` in its own process with
a configuration file and a NOTIFY_SOCKET, and a platform-side paho subscriber to `P/#`.

Also the /proc readings the idle and memory figures are made of (Linux only).
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.localbroker import Broker
from at_commands.fakemodem_handles import ProcessFakeModem

IMEI = "864505040000013"
HOME_ICCID = "89860321234567890123"
FOREIGN_ICCID = "89860098765432109876"
READY_TIMEOUT_S = 20.0
UNIT_FILE = Path(__file__).resolve().parent.parent / "systemd" / "simagent.service"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def agent_config(directory: Path, broker_port: int, modem_port: str) -> Path:
    """The demo's configuration: defaults everywhere (telemetry every 60 s, keepalive 60 s)
    but for the local broker without TLS, the fake's port and paths in `directory`."""
    config = directory / "agent.toml"
    config.write_text(textwrap.dedent(f"""\
        [device]
        id = "imei"
        state_dir = "{directory / 'state'}"
        [modem]
        port = "{modem_port}"
        [mqtt]
        host = "127.0.0.1"
        port = {broker_port}
        [mqtt.tls]
        enabled = false  # a loopback benchmark broker
        [control]
        socket = "{directory / 'control.sock'}"
        [log]
        level = "warning"
    """))
    return config


class Agent:
    """`simagent run` in a subprocess; `spawned` and `ready` are time.monotonic() stamps
    of the fork and of READY=1 arriving on the NOTIFY_SOCKET."""

    def __init__(self, directory: Path, config: Path) -> None:
        notify_path = directory / "notify.sock"
        notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        self.log_path = directory / "agent.log"
        # The watchdog armed as systemd arms it for the shipped unit (WATCHDOG_PID unset:
        # the daemon accepts that, and its pid is not known before the fork).
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": str(unit_watchdog_usec())}
        env.pop("WATCHDOG_PID", None)
        # Kept open while the agent runs, so its later notifications (watchdog pings)
        # land somewhere, as they would with systemd.
        self._notify = notify
        try:
            with open(self.log_path, "ab") as log:
                self.spawned = time.monotonic()
                self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
            self.ready = self._wait_ready(notify)
        except BaseException:
            notify.close()
            raise

    def _wait_ready(self, notify: socket.socket) -> float:
        deadline = self.spawned + READY_TIMEOUT_S
        while (remaining := deadline - time.monotonic()) > 0:
            notify.settimeout(remaining)
            try:
                message = notify.recv(4096).decode()
            except TimeoutError:
                break
            if "READY=1" in message.split("\n"):
                return time.monotonic()
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"the agent did not report READY=1; log:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._notify.close()


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
        self.config = agent_config(self.directory, self.broker.port, self.modem.port)
        self.control_socket = self.directory / "control.sock"
        return self

    def start_agent(self) -> Agent:
        return Agent(self.directory, self.config)

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
