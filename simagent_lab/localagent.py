"""`simagent run` as a child process, watched the way systemd watches it: for the demo,
the benchmarks and the end-to-end tests.

    agent = AgentProcess(directory, loopback_sections(directory, modem.port, broker.port))
    agent.start().wait_ready()           # READY=1 on the $NOTIFY_SOCKET it listens on
    agent.cli("evidence", "export")      # `simagent --config FILE ...`
    agent.stop()                         # SIGTERM -> exit code

The directory holds the configuration, the state, the control socket, the notify socket
and the log; keep its path short (AF_UNIX paths are limited to 107 bytes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

Sections = dict[str, dict[str, Any]]
WAIT_S = 20.0


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def render_toml(sections: Sections) -> str:
    """Sections named like "mqtt.tls" become `[mqtt.tls]` tables."""
    lines: list[str] = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def merge(base: Sections, overrides: Sections) -> Sections:
    """`overrides` may name `[mqtt.tls]` as "mqtt__tls" (a keyword argument)."""
    merged = {name: dict(keys) for name, keys in base.items()}
    for name, keys in overrides.items():
        merged.setdefault(name.replace("__", "."), {}).update(keys)
    return merged


def loopback_sections(directory: Path, modem_port: str, broker_port: int | list[str], *, log_level: str = "info") -> Sections:
    """Defaults everywhere but for a local broker without TLS (the shipped configuration
    has TLS on), the given modem port and paths in `directory`. `broker_port` is the
    port of one broker on 127.0.0.1, or a list of `[mqtt] endpoints`."""
    mqtt = {"endpoints": broker_port} if isinstance(broker_port, list) else {"host": "127.0.0.1", "port": broker_port}
    return {
        "device": {"id": "imei", "state_dir": str(directory / "state")},
        "modem": {"port": modem_port},
        "mqtt": mqtt,
        "mqtt.tls": {"enabled": False},
        "control": {"socket": str(directory / "control.sock")},
        "log": {"level": log_level},
    }


class CliFailed(Exception):
    pass


class Notification(dict):
    """One datagram's fields, with the monotonic time it arrived."""

    received_at: float = 0.0


class NotifyListener:
    """What systemd does on $NOTIFY_SOCKET: each datagram becomes a Notification."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[Notification] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._receive, name="notify-listener", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:  # closed
                return
            message = Notification(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            message.received_at = time.monotonic()
            with self._cond:
                self.messages.append(message)
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], since: int = 0, timeout: float = WAIT_S,
                 what: str = "a notification", count: int = 1) -> Notification:
        """The `count`-th message from index `since` on that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                matching = [m for m in self.messages[since:] if predicate(m)]
                if len(matching) >= count:
                    return matching[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {what} on $NOTIFY_SOCKET within {timeout} s; got {self.messages}")
                self._cond.wait(remaining)

    def close(self) -> None:
        self.sock.close()


class AgentProcess:
    def __init__(self, directory: Path, sections: Sections, env: dict[str, str] | None = None) -> None:
        self.dir = directory
        self.config_path = directory / "agent.toml"
        self.state_dir = Path(sections["device"]["state_dir"])
        self.control_socket = Path(sections["control"]["socket"])
        self.log_path = directory / "agent.log"
        self.notify = NotifyListener(directory / "notify.sock")
        self.extra_env = env or {}
        self.sections = sections
        self.config_path.write_text(render_toml(sections))
        self.proc: subprocess.Popen | None = None
        self.spawned = 0.0  # monotonic time of the last start
        self.exit_codes: list[int] = []

    def reconfigure(self, **overrides: dict[str, Any]) -> None:
        """Rewrites the file with some keys changed (the process sees it on SIGHUP)."""
        self.sections = merge(self.sections, overrides)
        self.config_path.write_text(render_toml(self.sections))

    def start(self) -> "AgentProcess":
        if self.running:
            raise RuntimeError("the agent is already running")
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **self.extra_env}
        env.pop("SIMAGENT_CONFIG", None)
        env.pop("WATCHDOG_PID", None)  # the pid is not known before the fork; the daemon accepts none
        with open(self.log_path, "ab") as log:
            log.write(f"=== simagent run (start {len(self.exit_codes) + 1}) ===\n".encode())
            log.flush()
            self.spawned = time.monotonic()
            self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        return self

    def wait_ready(self, since: int = 0, timeout: float = WAIT_S) -> Notification:
        return self.notify.wait_for(lambda m: m.get("READY") == "1", since, timeout, what="READY=1")

    def wait_exit(self, timeout: float = WAIT_S) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the agent did not exit within {timeout} s\n{self.log}") from None
        self.exit_codes.append(code)
        return code

    def _signal(self, signum: int) -> None:
        if not self.running:
            raise RuntimeError(f"the agent is not running\n{self.log}")
        self.proc.send_signal(signum)

    def stop(self) -> int:
        """SIGTERM and the exit code."""
        self._signal(signal.SIGTERM)
        return self.wait_exit()

    def kill9(self) -> None:
        self._signal(signal.SIGKILL)
        self.wait_exit()

    def hup(self) -> None:
        self._signal(signal.SIGHUP)

    def restart(self) -> Notification:
        """Starts the process again (after stop or kill9) and waits for its READY=1."""
        mark = self.notify.mark()
        self.start()
        return self.wait_ready(mark)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        """`simagent --config FILE ARGS...` as a field technician would run it; with
        `check`, a non-zero exit raises CliFailed."""
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "SIMAGENT_CONFIG")}
        proc = subprocess.run([sys.executable, "-m", "agent", "--config", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise CliFailed(f"simagent {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def close(self) -> None:
        """Kills the process if it still runs (after a failed step) and stops listening."""
        if self.running:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()
