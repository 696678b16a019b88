"""sd_notify(3) without libsystemd, and a watchdog that pings only while the loop is healthy.

The protocol is one AF_UNIX datagram of newline-separated ``KEY=VALUE`` lines sent to
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Outside systemd
the variable is unset and every call is a no-op, so the daemon calls these freely.

``Watchdog`` sends ``WATCHDOG=1`` at half of ``$WATCHDOG_USEC`` while a health callable
says the daemon works. A loop that is blocked cannot ping at all; a loop that still runs
but has lost a critical task or lags badly stops pinging on purpose, so systemd kills
and restarts the service (SPEC §10) instead of keeping a zombie alive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to the service manager; silent when there is none.

    A failed send is logged and reported as False, never raised: losing a status line
    must not take the daemon down (systemd notices a missing READY=1 on its own)."""

    def __init__(self, address: str | None) -> None:
        self._address = _socket_address(address) if address else None
        self._socket: socket.socket | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Notifier":
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str | int) -> bool:
        """Sends one datagram with the given fields (``send(READY=1, STATUS="up")``)."""
        if self._address is None:
            return False
        # Values are single lines by protocol; a newline would start a forged field.
        message = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) wants the CLOCK_MONOTONIC time with
        # RELOADING=1 so it can tell this reload's READY=1 from an older one.
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between pings (half of ``$WATCHDOG_USEC``), or None when no watchdog
    is armed for this process (unset, zero, malformed, or meant for another pid)."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


class LoopHealth:
    """Health of the daemon's event loop: scheduling lag under ``max_lag`` seconds and
    every critical task still running. Call ``start()`` inside the loop, ``watch()``
    each critical task; the instance itself is the health callable for ``Watchdog``."""

    # The probe is the idle daemon's most frequent wake-up, so it is slow: `lag` is only
    # ever its latest wake's lateness anyway, and `problems()` also counts a probe that is
    # overdue right now, so a blocked or lagging loop is still seen at every watchdog ping.
    def __init__(self, *, max_lag: float = 5.0, probe_interval: float = 5.0) -> None:
        self.max_lag = max_lag
        self.probe_interval = probe_interval
        self.lag = 0.0  # how late the probe woke up last time, in seconds
        self._expected_wake: float | None = None
        self._critical: dict[str, asyncio.Task] = {}
        self._reported: list[str] = []

    def start(self) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._probe(), name="loop-health-probe")
        self.watch("loop-health-probe", task)
        return task

    def watch(self, name: str, task: asyncio.Task) -> None:
        self._critical[name] = task

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._expected_wake = loop.time() + self.probe_interval
            await asyncio.sleep(self.probe_interval)
            self.lag = max(0.0, loop.time() - self._expected_wake)

    def problems(self) -> list[str]:
        problems = [f"task {name} ended" for name, task in self._critical.items() if task.done()]
        lag = self.lag
        if self._expected_wake is not None:
            # The probe may itself be overdue right now; that counts as lag too.
            lag = max(lag, asyncio.get_running_loop().time() - self._expected_wake)
        if lag > self.max_lag:
            problems.append(f"event loop lag {lag:.1f}s > {self.max_lag:.1f}s")
        if problems != self._reported:
            if problems:
                log.error("daemon unhealthy: %s", "; ".join(problems))
            self._reported = problems
        return problems

    def __call__(self) -> bool:
        return not self.problems()


class Watchdog:
    """Pings ``WATCHDOG=1`` every ``interval`` seconds while ``healthy()`` is True."""

    def __init__(self, notifier: Notifier, interval: float, healthy: Callable[[], bool]) -> None:
        self.notifier = notifier
        self.interval = interval
        self.healthy = healthy
        self.pings = 0  # sent so far; for status and tests

    @classmethod
    def from_env(
        cls, notifier: Notifier, healthy: Callable[[], bool], env: Mapping[str, str] = os.environ
    ) -> "Watchdog | None":
        """The watchdog systemd asked for, or None when none is armed for us."""
        interval = watchdog_interval(env)
        if interval is None or not notifier.enabled:
            return None
        return cls(notifier, interval, healthy)

    async def run(self) -> None:
        withheld = False
        while True:
            if self.healthy():
                if withheld:
                    log.warning("daemon healthy again: watchdog pings resumed")
                withheld = False
                if self.notifier.watchdog():
                    self.pings += 1
            elif not withheld:
                log.error("watchdog pings withheld: systemd will restart the daemon")
                withheld = True
            await asyncio.sleep(self.interval)

    def start(self) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(self.run(), name="sd-watchdog")


def _socket_address(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()  # abstract namespace
    return address


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")
