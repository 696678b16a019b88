"""A minimal AT responder on a real pty (or a TCP socket) for the client tests.

It answers commands strictly in order from one thread, like a modem: a reply that is
delayed delays every later reply too. ``handler(command) -> reply`` where reply is
bytes, ``(delay_seconds, bytes)``, or None (no answer at all).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import tty
from typing import Callable, Union

import pytest

Reply = Union[bytes, tuple[float, bytes], None]


def ok(*lines: str) -> bytes:
    return b"".join(b"\r\n" + line.encode() + b"\r\n" for line in lines) + b"\r\nOK\r\n"


CANNED = {
    "AT": ok(),
    "ATE0": ok(),
    "ATS3?": ok("013"),
    "ATS4?": ok("010"),
    "ATS5?": ok("008"),
    "AT+CMEE=1": ok(),
    "AT+CSQ": ok("+CSQ: 20,99"),
    "AT+CPIN?": ok("+CPIN: READY"),
    "AT+CGMI": ok("Quectel"),
}


def canned(command: str) -> Reply:
    return CANNED.get(command.upper(), b"\r\nERROR\r\n")


class Responder:
    def __init__(self, handler: Callable[[str], Reply] = canned, *, echo: bool = False):
        self.handler = handler
        self.echo = echo
        self.received: list[str] = []
        self._stop = threading.Event()
        self._fd: int | None = None
        self._thread: threading.Thread | None = None

    def _start(self, fd: int) -> None:
        self._fd = fd
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        os.write(self._fd, data)

    def _run(self) -> None:
        buf = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.02)
            if not ready:
                continue
            try:
                data = os.read(self._fd, 4096)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\r" in buf:
                raw, buf = buf.split(b"\r", 1)
                command = raw.strip(b"\n").decode("ascii", "replace")
                self.received.append(command)
                if self.echo:
                    self.write(raw + b"\r")
                reply = self.handler(command)
                if isinstance(reply, tuple):
                    delay, reply = reply
                    time.sleep(delay)
                if reply is not None and not self._stop.is_set():
                    try:
                        self.write(reply)
                    except OSError:
                        return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)


class PtyResponder(Responder):
    def __init__(self, handler: Callable[[str], Reply] = canned, *, echo: bool = False):
        super().__init__(handler, echo=echo)
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self._start(self.master)

    def unplug(self) -> None:
        """Close the master side: the client's next read fails (EIO), as on USB unplug."""
        self.stop()
        os.close(self.master)
        self.master = -1

    def close(self) -> None:
        self.stop()
        for fd in (self.master, self._slave):
            if fd >= 0:
                os.close(fd)
        self.master = self._slave = -1


class SocketResponder(Responder):
    def __init__(self, handler: Callable[[str], Reply] = canned, *, echo: bool = False):
        super().__init__(handler, echo=echo)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"socket://127.0.0.1:{self._server.getsockname()[1]}"
        self._conn: socket.socket | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self._conn, _ = self._server.accept()
        self._start(self._conn.fileno())

    def close(self) -> None:
        self.stop()
        if self._conn is not None:
            self._conn.close()
        self._server.close()


def _responders(kind):
    """A fixture body: a factory of responders of `kind`, all closed at teardown."""
    made = []

    def make(handler: Callable[[str], Reply] = canned, *, echo: bool = False):
        responder = kind(handler, echo=echo)
        made.append(responder)
        return responder

    yield make
    for responder in made:
        responder.close()


@pytest.fixture
def pty_responder():
    yield from _responders(PtyResponder)


@pytest.fixture
def socket_responder():
    yield from _responders(SocketResponder)


@pytest.fixture
def replies():
    """The reply helpers, for handlers written in tests (conftest is not importable
    under --import-mode=importlib)."""
    import types

    return types.SimpleNamespace(ok=ok, canned=canned)
