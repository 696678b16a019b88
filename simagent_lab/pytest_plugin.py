"""pytest plugin: a fake modem on a real pty per test (SPEC §9).

Fixtures:
  fake_modem           one in-process fake (background thread), configured by
                       ``@pytest.mark.fake_modem(profile=..., imei=..., iccid=..., no_sim=..., scan_seconds=...,
                       imsi=..., pin=..., register_delay=...)``, or by ``replay=FILE``: the
                       fake answers as that AT transcript recorded (``simagent at --record``)
  fake_modem_factory   ``factory(**same keywords)`` for several modems in one test
  fake_modem_process   ``start(**same keywords)`` runs the real ``simagent-fakemodem``
                       in a subprocess with a control socket (end-to-end tests)
All of them give ``.port`` (a symlink in tmp_path), ``.control(op, **args)``,
``sim_remove()``, ``sim_insert(iccid)``, ``reboot()``, ``unplug()``, ``replug()``,
``fault(kind, seconds=None, count=1)``, ``urc(line)``, ``replay_urc(every=False)``, ``set(**values)``,
``register(state)``,
``state()`` and ``.transcript`` (list of {"t", "dir", "line"}).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from simagent_lab.fakemodem_handles import (  # noqa: F401 (re-exported for tests)
    InProcessFakeModem,
    ProcessFakeModem,
    start_in_process,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fake_modem(profile='generic', imei=..., iccid=..., no_sim=False, imsi=..., pin=None, "
        "register_delay=0.3, scan_seconds=3.0) or fake_modem(replay=TRANSCRIPT): configure the fake_modem fixture",
    )


def _modems(start: Callable[[str], Any]):
    """A fixture body: `make(**keywords)` starts a modem named by a counter; all of them
    are stopped at teardown."""
    started = []
    counter = itertools.count()

    def make(**kwargs: Any):
        handle = start(str(next(counter)), **kwargs)
        started.append(handle)
        return handle

    yield make
    for handle in started:
        handle.stop()


@pytest.fixture
def fake_modem_factory(tmp_path: Path) -> Iterator[Callable[..., InProcessFakeModem]]:
    yield from _modems(lambda n, **kw: start_in_process(tmp_path, f"modem{n}", **kw))


@pytest.fixture
def fake_modem(request: pytest.FixtureRequest, fake_modem_factory: Callable[..., InProcessFakeModem]) -> InProcessFakeModem:
    marker = request.node.get_closest_marker("fake_modem")
    return fake_modem_factory(**(marker.kwargs if marker else {}))


@pytest.fixture
def fake_modem_process(tmp_path: Path) -> Iterator[Callable[..., ProcessFakeModem]]:
    yield from _modems(lambda n, **kw: ProcessFakeModem(tmp_path, f"pmodem{n}", **kw))


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy (helper for tests)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
