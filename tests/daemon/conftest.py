"""Fixtures for the daemon infrastructure tests: real AF_UNIX sockets in short paths."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest


@pytest.fixture
def short_dir():
    """A private directory with a short path: AF_UNIX paths are limited to 107 bytes,
    and pytest's tmp_path can be longer than that."""
    with tempfile.TemporaryDirectory(prefix="sa-", dir="/tmp") as name:
        os.chmod(name, 0o755)  # the tests run clients as nobody, who must reach sockets here
        yield Path(name)


class NotifyListener:
    """What systemd does on $NOTIFY_SOCKET: receive datagrams and split them into fields."""

    def __init__(self, address: str) -> None:
        self.address = address  # the $NOTIFY_SOCKET value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)

    def receive(self, timeout: float = 2.0) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        return dict(line.split("=", 1) for line in data.decode().split("\n"))

    def drain(self) -> list[dict[str, str]]:
        messages = []
        while (message := self.receive(timeout=0.01)) is not None:
            messages.append(message)
        return messages


@pytest.fixture(params=["path", "abstract"])
def notify_listener(request, short_dir):
    address = str(short_dir / "notify") if request.param == "path" else f"@simagent-test-{uuid.uuid4().hex}"
    listener = NotifyListener(address)
    yield listener
    listener.sock.close()


@pytest.fixture
def run_as():
    """The tests run as root; this is how they act as an ordinary user."""
    return _run_as


def _run_as(uid: int, gid: int, function):
    """Runs `function()` in a forked child with the given uid/gid and returns
    ``{"value": ...}`` or ``{"raised": "Type: message", "code": ...}``."""
    import json

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                outcome = {"value": function()}
            except Exception as exc:
                outcome = {"raised": f"{type(exc).__name__}: {exc}", "code": getattr(exc, "code", None)}
            os.write(write_end, json.dumps(outcome).encode())
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert status == 0, "child failed before reporting"
    return json.loads(b"".join(chunks))
