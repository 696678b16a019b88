"""The real `simagent` CLI in a subprocess, with a configuration of its own in tmp_path
(state directory and control socket there, so no test ever meets a real daemon)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.service.control import ControlServer, Op
from simagent_lab.pytest_plugin import wait_for


class Cli:
    def __init__(self, root: Path):
        self.state_dir = root / "state"
        self.socket = root / "run" / "control.sock"
        self.config = root / "agent.toml"
        self.config.write_text(
            f'[device]\nstate_dir = "{self.state_dir}"\n'
            f'[control]\nsocket = "{self.socket}"\n'
            '[modem]\ncommand_timeout = 2.0\n'
        )

    def __call__(self, *args: str, input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "agent", "--config", str(self.config), *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


@pytest.fixture
def registered_modem(fake_modem_process) -> Callable[..., Any]:
    """A `simagent-fakemodem` process that has finished registering (so a status read
    at any moment sees the settled network state)."""

    def start(**kwargs: Any):
        fm = fake_modem_process(register_delay=0.05, **kwargs)
        assert wait_for(lambda: fm.state()["registration"] != "searching"), fm.state()
        return fm

    return start


@pytest.fixture
def control_server() -> Iterator[Callable[[Path, list[Op]], ControlServer]]:
    """Starts an agent.service.control.ControlServer with the given ops in a thread of its own
    (the test stands in for the daemon)."""
    running: list[tuple[asyncio.AbstractEventLoop, ControlServer, threading.Thread]] = []

    def start(path: Path, ops: list[Op]) -> ControlServer:
        loop = asyncio.new_event_loop()
        server = ControlServer(path, ops)
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        running.append((loop, server, thread))
        return server

    yield start
    for loop, server, thread in running:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
