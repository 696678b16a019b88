"""pytest plugin: a fake modem on a real pty per test (SPEC §9).

Fixtures:
  fake_modem           one in-process fake (background thread), configured by
                       ``@pytest.mark.fake_modem(profile=..., imei=..., iccid=..., no_sim=...,
                       imsi=..., pin=..., register_delay=...)``
  fake_modem_factory   ``factory(**same keywords)`` for several modems in one test
  fake_modem_process   ``start(**same keywords)`` runs the real ``simagent-fakemodem``
                       in a subprocess with a control socket (end-to-end tests)
All of them give ``.port`` (a symlink in tmp_path), ``.control(op, **args)``,
``sim_remove()``, ``sim_insert(iccid)``, ``reboot()``, ``unplug()``, ``replug()``,
``fault(kind, seconds=None, count=1)``, ``urc(line)``, ``set(**values)``, ``register(state)``,
``state()`` and ``.transcript`` (list of {"t", "dir", "line"}).
"""

from __future__ import annotations

import abc
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from at_commands import fakemodem, profiles

_MODEM_KEYWORDS = ("profile", "imei", "iccid", "no_sim", "imsi", "pin", "register_delay")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fake_modem(profile='generic', imei=..., iccid=..., no_sim=False, imsi=..., pin=None, "
        "register_delay=0.3): configure the fake_modem fixture",
    )


def _check_keywords(kwargs: dict[str, Any]) -> None:
    unknown = set(kwargs) - set(_MODEM_KEYWORDS)
    if unknown:
        raise TypeError(f"fake modem: unknown option(s) {sorted(unknown)}; known: {_MODEM_KEYWORDS}")


class _ControlMixin(abc.ABC):
    """Convenience methods over ``control(op, **args)``; raise on a refused operation."""

    @abc.abstractmethod
    def control(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one control operation; the reply is {"ok": bool, "state"|"error"}."""

    def _ok(self, op: str, **args: Any) -> dict[str, Any]:
        reply = self.control(op, **args)
        if not reply.get("ok"):
            raise ValueError(f"fake modem refused {op}: {reply.get('error')}")
        return reply["state"]

    def state(self) -> dict[str, Any]:
        return self._ok("state")

    def sim_remove(self) -> dict[str, Any]:
        return self._ok("sim-remove")

    def sim_insert(self, iccid: str, **args: Any) -> dict[str, Any]:
        return self._ok("sim-insert", iccid=iccid, **args)

    def set(self, **values: Any) -> dict[str, Any]:
        return self._ok("set", **values)

    def register(self, state: str) -> dict[str, Any]:
        return self._ok("register", state=state)

    def reboot(self) -> dict[str, Any]:
        return self._ok("reboot")

    def urc(self, line: str) -> dict[str, Any]:
        return self._ok("urc", line=line)

    def unplug(self) -> dict[str, Any]:
        return self._ok("unplug")

    def replug(self) -> dict[str, Any]:
        return self._ok("replug")

    def fault(self, kind: str, seconds: float | None = None, count: int = 1) -> dict[str, Any]:
        args: dict[str, Any] = {"kind": kind, "count": count}
        if seconds is not None:
            args["seconds"] = seconds
        return self._ok("fault", **args)


class InProcessFakeModem(_ControlMixin):
    def __init__(self, modem: fakemodem.FakeModem):
        self.modem = modem
        self.port = str(modem.link)

    def control(self, op: str, **args: Any) -> dict[str, Any]:
        return self.modem.control(op, **args)

    @property
    def transcript(self) -> list[dict[str, Any]]:
        return list(self.modem.transcript.entries)


def start_in_process(directory: Path, name: str = "modem", **kwargs: Any) -> InProcessFakeModem:
    _check_keywords(kwargs)
    no_sim = kwargs.pop("no_sim", False)
    profile = profiles.get(kwargs.pop("profile", "generic"))
    if no_sim:
        kwargs["iccid"] = None
    state = fakemodem.FakeModemState(profile=profile, **kwargs)
    modem = fakemodem.FakeModem(directory / name, state, transcript_path=directory / f"{name}.transcript")
    return InProcessFakeModem(modem.start())


@pytest.fixture
def fake_modem_factory(tmp_path: Path) -> Iterator[Callable[..., InProcessFakeModem]]:
    started: list[InProcessFakeModem] = []
    counter = itertools.count()

    def factory(**kwargs: Any) -> InProcessFakeModem:
        fm = start_in_process(tmp_path, f"modem{next(counter)}", **kwargs)
        started.append(fm)
        return fm

    yield factory
    for fm in started:
        fm.modem.stop()


@pytest.fixture
def fake_modem(request: pytest.FixtureRequest, fake_modem_factory: Callable[..., InProcessFakeModem]) -> InProcessFakeModem:
    marker = request.node.get_closest_marker("fake_modem")
    return fake_modem_factory(**(marker.kwargs if marker else {}))


class ProcessFakeModem(_ControlMixin):
    """The real ``simagent-fakemodem`` in a subprocess, driven through its control socket."""

    def __init__(self, directory: Path, name: str, **kwargs: Any):
        _check_keywords(kwargs)
        self.port = str(directory / name)
        self.control_path = str(directory / f"{name}.ctl")
        self.transcript_path = str(directory / f"{name}.transcript")
        argv = [*_fakemodem_command(), "--link", self.port, "--control", self.control_path,
                "--transcript", self.transcript_path]
        for key, value in kwargs.items():
            if key == "no_sim":
                if value:
                    argv.append("--no-sim")
            elif value is not None:
                argv += [f"--{key.replace('_', '-')}", str(value)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline() if self.proc.stdout else ""
        if not ready.startswith("READY"):
            self.proc.wait(5)
            raise RuntimeError(f"simagent-fakemodem did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")

    def control(self, op: str, **args: Any) -> dict[str, Any]:
        return fakemodem.control_request(self.control_path, {"op": op, **args})

    @property
    def transcript(self) -> list[dict[str, Any]]:
        return fakemodem.read_transcript(self.transcript_path)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        return self.proc.returncode


def _fakemodem_command() -> list[str]:
    script = Path(sys.executable).with_name("simagent-fakemodem")
    if script.exists() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "at_commands.fakemodem"]


@pytest.fixture
def fake_modem_process(tmp_path: Path) -> Iterator[Callable[..., ProcessFakeModem]]:
    started: list[ProcessFakeModem] = []
    counter = itertools.count()

    def start(**kwargs: Any) -> ProcessFakeModem:
        fm = ProcessFakeModem(tmp_path, f"pmodem{next(counter)}", **kwargs)
        started.append(fm)
        return fm

    yield start
    for fm in started:
        fm.stop()


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy (helper for tests)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
