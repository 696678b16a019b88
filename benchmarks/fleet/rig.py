"""The fleet: N `simagent-fakemodem` and N `simagent run` processes against one mosquitto on
loopback, and an observer that subscribes to everything on that broker.

Every process is a child of this one and `Fleet.close()` ends each of them, whatever
state the run is in (the command calls it on errors, Ctrl-C and SIGTERM).
"""

from __future__ import annotations

import concurrent.futures
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from simagent_lab.fakemodem_handles import ProcessFakeModem
from simagent_lab.localagent import AgentProcess, loopback_sections
from simagent_lab.localbroker import Broker

START_BATCH = 10  # agents started before waiting for their READY=1: 100 at once thrash 2 cores
READY_TIMEOUT_S = 120.0
PARALLEL_CONTROL = 16  # fake-modem control requests in flight at once


def luhn_digit(digits: str) -> str:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str(-total % 10)


@dataclass
class Terminal:
    """One fake modem and the agent that owns it."""

    index: int
    directory: Path
    modem: ProcessFakeModem | None = None
    agent: AgentProcess | None = None

    @property
    def imei(self) -> str:
        body = f"86450504{self.index:06d}"
        return body + luhn_digit(body)

    @property
    def home_iccid(self) -> str:
        return f"8986032123456{self.index:07d}"

    @property
    def foreign_iccid(self) -> str:
        return f"8986009876543{self.index:07d}"

    @property
    def device_id(self) -> str:
        return self.imei

    @property
    def store_path(self) -> Path:
        return self.directory / "state" / "state.db"

    def outbox(self) -> tuple[int, set[int]]:
        """(last event seq committed, seqs of the events still in the outbox), read-only
        from the agent's store: it may be running (WAL lets a reader in beside the writer)."""
        conn = sqlite3.connect(f"file:{self.store_path}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'event_seq'").fetchone()
            pending = {json.loads(payload)["seq"]
                       for (payload,) in conn.execute("SELECT payload FROM outbox WHERE kind = 'event'")}
        finally:
            conn.close()
        return (int(row[0]) if row else 0), pending


class Observer:
    """The platform's view: a paho client with a persistent session (so the broker keeps
    its QoS 1 subscriptions and queues for it across the restart) subscribed to every
    agent topic and to the broker's $SYS counters. `messages` holds (receipt time, topic,
    payload, retain) in arrival order."""

    def __init__(self, port: int, client_id: str = "fleet-observer") -> None:
        self.messages: list[tuple[float, str, bytes, bool]] = []
        self.session_present: list[bool] = []  # per connect: did the broker still hold our session?
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # back at once after the restart
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, keepalive=30, clean_start=False, properties=properties)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.session_present.append(bool(flags.session_present))
        client.subscribe([("simagent/#", 1), ("$SYS/broker/clients/connected", 0),
                          ("$SYS/broker/publish/messages/received", 0)])

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append((time.time(), message.topic, message.payload, bool(message.retain)))

    def snapshot(self) -> list[tuple[float, str, bytes, bool]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def retained_statuses(port: int, expected: int, timeout: float = 5.0) -> dict[str, bytes]:
    """The retained `P/status` of every device, as a platform that connects now sees them
    (once `expected` devices have one, or after `timeout`)."""
    found: dict[str, bytes] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet-retained-check")
    client.on_message = lambda c, u, m: found.__setitem__(m.topic.split("/")[1], m.payload) if m.retain else None
    client.connect("127.0.0.1", port)
    client.subscribe("simagent/+/status", qos=1)
    client.loop_start()
    deadline = time.monotonic() + timeout
    while len(found) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    client.loop_stop()
    client.disconnect()
    return dict(found)


class Fleet:
    def __init__(self, directory: Path, n: int, *, log_level: str = "debug") -> None:
        self.directory = directory
        # sys_interval 1: $SYS counters every second; persistence: sessions and their
        # queued QoS 1 messages survive the restart (saved on SIGTERM, loaded at start).
        self.broker = Broker(directory / "broker", persistence=True, sys_interval=1)
        self.terminals = [Terminal(i, directory / f"t{i:03d}") for i in range(n)]
        self.log_level = log_level
        self.observer: Observer | None = None

    def start(self, progress=print) -> None:
        self.broker.start()
        self.observer = Observer(self.broker.port)
        for term in self.terminals:
            term.directory.mkdir(parents=True)
        self.each(self._start_modem)
        progress(f"{len(self.terminals)} fake modems up")
        for first in range(0, len(self.terminals), START_BATCH):
            batch = self.terminals[first:first + START_BATCH]
            for term in batch:
                term.agent = AgentProcess(term.directory, loopback_sections(
                    term.directory, term.modem.port, self.broker.port, log_level=self.log_level))
                term.agent.start()
            for term in batch:
                term.agent.wait_ready(timeout=READY_TIMEOUT_S)
        progress(f"{len(self.terminals)} agents READY=1")

    def _start_modem(self, term: Terminal) -> None:
        term.modem = ProcessFakeModem(term.directory, "tty", profile="quectel", imei=term.imei, iccid=term.home_iccid)

    def each(self, action, terminals: list[Terminal] | None = None) -> None:
        """`action(terminal)` for each, several at a time (each is a blocking request to a
        child process); the first error is raised once all are done."""
        with concurrent.futures.ThreadPoolExecutor(PARALLEL_CONTROL) as pool:
            for future in [pool.submit(action, term) for term in (self.terminals if terminals is None else terminals)]:
                future.result()

    def pids(self) -> dict[str, list[int]]:
        """The processes that run, by group (agents, fakes, broker)."""
        return {"agents": [t.agent.pid for t in self.terminals if t.agent and t.agent.running],
                "fakes": [t.modem.proc.pid for t in self.terminals if t.modem and t.modem.proc.poll() is None],
                "broker": [self.broker.process.pid] if self.broker.process else []}

    def stop_agents(self) -> list[int]:
        """SIGTERM to all at once (each publishes its offline status and flushes), then the exit codes."""
        running = [t.agent for t in self.terminals if t.agent and t.agent.running]
        for agent in running:
            agent.proc.terminate()
        return [agent.wait_exit(timeout=60) for agent in running]

    def close(self) -> None:
        """Ends every child process that still runs; never raises before all were tried."""
        for term in self.terminals:
            if term.agent is not None:
                term.agent.close()
        for term in self.terminals:
            if term.modem is not None:
                try:
                    term.modem.stop()
                except Exception:  # noqa: BLE001 - the next child must still be ended
                    term.modem.proc.kill()
        if self.observer is not None:
            self.observer.close()
        self.broker.stop()
