"""A RabbitMQ cluster of our own on loopback, with the MQTT plugin: the clustered broker the
failover proof runs against (tests/cluster/, `./dev.sh cluster`).

Debian's `rabbitmq-server` (bookworm: 3.10) is started from its scripts in
/usr/lib/rabbitmq/bin, never as the system service: every node gets its own directory
(config, Mnesia, logs, enabled plugins), its own ports, its own node name and a cookie
shared only by the nodes of this cluster (the CLI reads it from $HOME), and the nodes find
each other through an epmd on a free port (ERL_EPMD_PORT), so nothing collides with a
system broker or another engineer's cluster. The second node joins the first with
`rabbitmqctl join_cluster`.

    cluster = RabbitCluster(directory).start()    # two nodes, "a" and "b"
    a, b = cluster.nodes                           # each has .host, .port (MQTT), .tls = None
    a.stop()                                       # graceful `rabbitmqctl stop` (a.kill(): SIGKILL)
    cluster.close()

What RabbitMQ 3.x does that the agent and the tests must live with:
- MQTT 3.1.1 only: an MQTT 5 CONNECT is closed unanswered (the agent falls back per endpoint).
- Retained messages are kept per node, and a subscription with a wildcard gets none: read
  `P/status` and `P/state` by their exact names, from the node the agent published them to.
- A persistent MQTT session (clean session off) is a durable queue on the node the client
  was connected to. With that node down the queue is unavailable, and the client cannot
  subscribe to it from another node; the policy `HA_POLICY` mirrors those queues to every
  node (classic queue mirroring, still supported in 3.x), so the agent's command
  subscription and a platform's event queue survive the loss of their node.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from simagent_lab.localbroker import free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT_S = 120.0  # a node boots in 5-15 s on the shared 2-core VM; more under load

# Mirror every MQTT session queue to all nodes (see the module docstring).
HA_POLICY = ("mqtt-sessions", "^mqtt-subscription-", '{"ha-mode":"all","ha-sync-mode":"automatic"}')


def available() -> bool:
    return (RABBITMQ_BIN / "rabbitmq-server").exists()


def _epmd() -> str:
    return shutil.which("epmd") or next(iter(glob.glob("/usr/lib/erlang/erts-*/bin/epmd")), "epmd")


@dataclass
class RabbitNode:
    name: str  # the short node name: "a" -> a@localhost
    directory: Path
    cookie: str
    epmd_port: int
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)  # MQTT
    amqp_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    tls: None = None  # plaintext listeners (what the tests' Subscriber asks of a broker)
    process: subprocess.Popen | None = None

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        d = self.directory
        return {**os.environ, "HOME": str(d / "home"), "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"), "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(d / "mnesia"), "RABBITMQ_LOG_BASE": str(d / "log"),
                "RABBITMQ_PID_FILE": str(d / "pid"), "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_PORT": str(self.epmd_port)}

    def _write_files(self) -> None:
        d = self.directory
        for sub in ("home", "mnesia", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        cookie = d / "home" / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.host}:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = {self.host}:{self.port}\n"
            "log.console = false\n")

    def spawn(self) -> "RabbitNode":
        """Starts the node's process; `wait_started` waits for it."""
        self._write_files()
        with open(self.directory / "server.out", "ab") as out:
            self.process = subprocess.Popen([str(RABBITMQ_BIN / "rabbitmq-server")], env=self.env(),
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        return self

    def wait_started(self, timeout: float = START_TIMEOUT_S) -> "RabbitNode":
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq node {self.node} exited {self.process.returncode}:\n{self.log()}")
            if self.ctl("status", check=False, timeout=30).returncode == 0 and self._listening():
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"rabbitmq node {self.node} did not start within {timeout} s:\n{self.log()}")
            time.sleep(0.5)

    def _listening(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def ctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """`rabbitmqctl -n NODE ARGS...`"""
        done = subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env(),
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.node} {' '.join(args)} exited {done.returncode}: "
                               f"{done.stdout}{done.stderr}")
        return done

    def join(self, other: "RabbitNode") -> None:
        self.ctl("stop_app")
        self.ctl("reset")
        self.ctl("join_cluster", other.node)
        self.ctl("start_app")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 60) -> None:
        """A graceful stop (`rabbitmqctl stop`): client connections are closed, the node
        leaves the running cluster. Killed if it does not go within `timeout`."""
        if not self.running:
            return
        self.ctl("stop", check=False, timeout=timeout)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL to the Erlang VM, as a crash or power loss: no connection is closed
        politely. (The process started is the start script; the VM is its child and
        writes its pid to RABBITMQ_PID_FILE.)"""
        if self.running:
            pid = int((self.directory / "pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            self.process.wait(30)

    def log(self) -> str:
        text = ""
        for path in sorted((self.directory / "log").glob("*.log")) + [self.directory / "server.out"]:
            if path.exists():
                text += f"--- {path}\n" + path.read_text(errors="replace")[-4000:]
        return text


class RabbitCluster:
    def __init__(self, directory: Path, names: tuple[str, ...] = ("a", "b")) -> None:
        self.directory = directory
        self.epmd_port = free_port()
        cookie = secrets.token_hex(16).upper()
        self.nodes = [RabbitNode(name, directory / name, cookie, self.epmd_port) for name in names]

    def start(self) -> "RabbitCluster":
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.wait_started()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.join(first)
        first.ctl("set_policy", "--apply-to", "queues", *HA_POLICY)
        return self

    def members(self) -> str:
        return self.nodes[0].ctl("cluster_status").stdout

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        # The epmd the first node started outlives the nodes; it is ours (own port).
        subprocess.run([_epmd(), "-port", str(self.epmd_port), "-kill"], capture_output=True, env={**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)})
