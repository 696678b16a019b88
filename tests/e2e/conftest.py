"""End-to-end plumbing: the real `simagent run` process against the fake modem subprocess
and a real mosquitto, watched the way systemd and a platform watch it.

    broker = mosquitto                                   # root conftest: one per test
    modem = fake_modem_process(profile="quectel", imei=IMEI, iccid=HOME_ICCID)
    agent = agent_process(modem, broker, binding={"on_violation": "report"})
    agent.wait_ready()                                   # READY=1 on $NOTIFY_SOCKET
    platform = subscriber(broker, "simagent/#")          # schema-checks every message
    wait_event(platform, "bound")
    agent.cli("status", "--json")                        # `simagent --config FILE status --json`
    agent.stop()  agent.kill9()  agent.restart()  agent.hup()  agent.log

Every agent process gets its own short /tmp directory (AF_UNIX paths are limited to 107
bytes) holding the configuration, state, control socket and $NOTIFY_SOCKET.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import exitcodes
from simagent_lab.localagent import AgentProcess, loopback_sections, merge

IMEI = "864505040000013"
HOME_ICCID = "89860321234567890123"
FOREIGN_ICCID = "89860098765432109876"
TIMEOUT = 20.0  # generous: other engineers' test runs share this machine

SIGNER = Ed25519PrivateKey.generate()


def trusted_key() -> str:
    """SIGNER's public key as `[binding] trusted_keys` takes it (raw, base64)."""
    raw = SIGNER.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def sign_token(act: str, iccid: str, *, imei: str = IMEI, ttl: float = 3600, **claims: Any) -> str:
    now = time.time()
    body = {"sub": imei, "iccid": iccid, "act": act, "exp": int(now + ttl), "iat": int(now - 60),
            "jti": f"e2e-{uuid.uuid4().hex}", **claims}
    return jwt.encode(body, SIGNER, algorithm="EdDSA")


def base_sections(directory: Path, modem_port: str, broker_port: int | list[str]) -> dict[str, dict[str, Any]]:
    return merge(loopback_sections(directory, modem_port, broker_port, log_level="debug"), {
        "modem": {"command_timeout": 2.0},
        "binding": {"trusted_keys": [trusted_key()]},
        "mqtt": {"keepalive": 10},
    })


@pytest.fixture
def agent_process():
    """`agent_process(modem, broker, start=True, env={}, **sections)` -> a started
    AgentProcess; `modem` is a fake modem handle or a port path, `broker` a Broker (or
    None for a closed port, or a list of brokers: `[mqtt] endpoints`); `sections` override config keys per section, e.g.
    `binding={"on_violation": "report"}`, `mqtt__tls={...}` for `[mqtt.tls]`.

    At teardown the process is killed if it still runs, and its log must hold no
    traceback: a test that passes while the daemon crashed in a corner is a failure."""
    agents: list[AgentProcess] = []
    directories: list[str] = []

    def start(modem: Any, broker: Any, *, start: bool = True, env: dict[str, str] | None = None,
              **sections: dict[str, Any]) -> AgentProcess:
        directory = Path(tempfile.mkdtemp(prefix="sa-e2e-", dir="/tmp"))
        directories.append(str(directory))
        port = modem if isinstance(modem, str) else modem.port
        if isinstance(broker, list):
            broker_port = [f"{b.host}:{b.port}" for b in broker]
        else:
            broker_port = broker.port if broker is not None else _closed_port()
        agent = AgentProcess(directory, merge(base_sections(directory, port, broker_port), sections), env or {})
        agents.append(agent)
        return agent.start() if start else agent

    yield start
    tracebacks = []
    for agent in agents:
        agent.close()
        if "Traceback" in agent.log:
            tracebacks.append(agent.log)
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)
    assert not tracebacks, "the agent logged a traceback:\n" + "\n".join(tracebacks)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def home_modem(fake_modem_process):
    """A fake Quectel module (hot-swap URCs) with the home card in it."""
    return fake_modem_process(profile="quectel", imei=IMEI, iccid=HOME_ICCID, register_delay=0.2)


# -- reading what the platform saw -------------------------------------------------------------
def events(platform, types: tuple[str, ...] | None = None) -> list[dict]:
    found = platform.documents("/events")
    return [e for e in found if types is None or e["type"] in types]


def wait_event(platform, type_: str, *, after: int = 0, timeout: float = TIMEOUT,
               where: Callable[[dict], bool] = lambda e: True) -> dict:
    """The first `type_` event with seq > `after` (and `where`) the platform received."""
    def find(sub):
        return next((e for e in events(sub) if e["type"] == type_ and e["seq"] > after and where(e)), None)

    return platform.wait_for(find, timeout=timeout, what=f"a {type_} event after seq {after}")


def last_seq(platform) -> int:
    return max((e["seq"] for e in events(platform)), default=0)


def swap_to(modem, iccid: str) -> None:
    """A technician pulls the card and pushes another one in."""
    modem.sim_remove()
    modem.sim_insert(iccid)


def wait_modem(modem, predicate: Callable[[dict], bool], what: str, timeout: float = TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = modem.state()
        if predicate(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"the fake modem never reached {what}: {state}")
        time.sleep(0.05)


EX_CONFIG = exitcodes.CONFIG


def committed_event_seq(agent: AgentProcess) -> int:
    """The seq of the last event the agent committed to its store (read-only, beside it)."""
    db = agent.state_dir / "state.db"
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'event_seq'").fetchone()
    return json.loads(row[0]) if row else 0


def assert_delivered_in_order(platform, up_to: int) -> list[dict]:
    """Every event 1..up_to reached the platform; first arrivals are in seq order and a
    redelivered event carries the same id. Returns the events, one per seq."""
    received = events(platform)
    first: dict[int, dict] = {}
    order: list[int] = []
    for event in received:
        if event["seq"] in first:
            assert event["id"] == first[event["seq"]]["id"], f"seq {event['seq']} came back with another id"
            continue
        first[event["seq"]] = event
        order.append(event["seq"])
    missing = sorted(set(range(1, up_to + 1)) - set(first))
    assert not missing, f"events never delivered: seq {missing}; got {order}"
    assert order == sorted(order), f"events arrived out of seq order: {order}"
    assert len({e["id"] for e in first.values()}) == len(first), "two events share an id"
    return [first[s] for s in sorted(first)]
