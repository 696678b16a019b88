"""Raw pyserial access to the fake modem: the tests talk to it like any terminal program."""

from __future__ import annotations

import re
import time
from typing import Callable, Iterator

import pytest
import serial

FINAL = re.compile(r"^(OK|ERROR|\+CME ERROR: .*)$")


class AtPort:
    """Line-oriented reader/writer over a real serial port (no AT client involved)."""

    def __init__(self, port: str):
        self.ser = serial.Serial(port, 115200, timeout=0.02)
        self._buf = b""
        self.raw = b""  # every byte read, for framing assertions

    def close(self) -> None:
        self.ser.close()

    def _fill(self) -> bool:
        data = self.ser.read(4096)
        self.raw += data
        self._buf += data
        return bool(data)

    def _pop_line(self) -> str | None:
        m = re.search(rb"[\r\n]", self._buf)
        while m:
            line, self._buf = self._buf[: m.start()], self._buf[m.end():]
            if line:
                return line.decode("latin-1")
            m = re.search(rb"[\r\n]", self._buf)
        return None

    def read_until(self, pattern: str, timeout: float = 3.0) -> list[str]:
        """Lines read up to and including the first one matching ``pattern``."""
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            line = self._pop_line()
            if line is not None:
                lines.append(line)
                if re.search(pattern, line):
                    return lines
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"no line matching {pattern!r}; got {lines!r}")
            self._fill()

    def lines_for(self, seconds: float) -> list[str]:
        lines: list[str] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            line = self._pop_line()
            if line is not None:
                lines.append(line)
            else:
                self._fill()
        while (line := self._pop_line()) is not None:
            lines.append(line)
        return lines

    def send(self, command: str) -> None:
        self.ser.write(command.encode() + b"\r")

    def command(self, command: str, timeout: float = 3.0) -> list[str]:
        """Send one command; return every line up to its final result (echo included)."""
        self.send(command)
        return self.read_until(FINAL.pattern, timeout)


@pytest.fixture
def open_port() -> Iterator[Callable[[str], AtPort]]:
    opened: list[AtPort] = []

    def _open(port: str) -> AtPort:
        p = AtPort(port)
        opened.append(p)
        return p

    yield _open
    for p in opened:
        p.close()
