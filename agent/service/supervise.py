"""Supervision of the daemon's long-lived tasks (modem session, reporter, control server,
telemetry): none of them may die silently.

Each supervised job is a coroutine factory run by a keeper task. A run that ends with an
exception is logged with its traceback and started again after `RESTART_DELAY`; one that
fails `MAX_FAILURES` times within `FAILURE_WINDOW` seconds is given up: its keeper ends,
`LoopHealth` (which watches every keeper) reports it, the watchdog stops pinging and
systemd restarts the whole daemon. A run that returns normally is done (e.g. the reporter
after a reconfiguration) unless `restart(name)` asked for it again; `restart(name)` also
starts a job that was given up or done (without a watchdog nothing else would).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0
MAX_FAILURES = 5
FAILURE_WINDOW = 60.0

Factory = Callable[[], Coroutine[Any, Any, Any]]


class GaveUp(RuntimeError):
    """A job that kept failing."""


class Supervisor:
    def __init__(self, watch: Callable[[str, asyncio.Task], None] | None = None) -> None:
        self._watch = watch
        self._keepers: dict[str, asyncio.Task] = {}
        self._runs: dict[str, asyncio.Task] = {}
        self._again: set[str] = set()
        self._factories: dict[str, Factory] = {}
        self._gave_up: dict[str, str] = {}  # job -> why it was given up, until it is started again

    def start(self, name: str, factory: Factory) -> asyncio.Task:
        """Runs `factory()` under supervision (again, if `name` ran before and ended)."""
        old = self._keepers.get(name)
        if old is not None and not old.done():
            raise RuntimeError(f"{name} is already supervised")
        self._factories[name] = factory
        self._gave_up.pop(name, None)
        keeper = asyncio.get_running_loop().create_task(self._keep(name, factory), name=f"keep-{name}")
        self._keepers[name] = keeper
        if self._watch is not None:
            self._watch(name, keeper)
        return keeper

    def restart(self, name: str) -> None:
        """Ends the current run of `name` and starts a fresh one at once (a job that ended
        is started again). A run already ending for a restart is left to end: the fresh one
        starts after it anyway, and a second cancel would cut its clean-up short (the
        reporter's disconnect)."""
        keeper = self._keepers.get(name)
        if keeper is not None and keeper.done():
            self.start(name, self._factories[name])
            return
        run = self._runs.get(name)
        if run is not None and not run.done() and not run.cancelling():
            self._again.add(name)
            run.cancel()

    def gave_up(self, name: str) -> str | None:
        """Why `name` was given up (its last failure), or None."""
        return self._gave_up.get(name)

    async def stop(self) -> None:
        keepers = list(self._keepers.values())
        for keeper in keepers:
            keeper.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)

    async def _keep(self, name: str, factory: Factory) -> None:
        loop = asyncio.get_running_loop()
        failures: list[float] = []
        while True:
            run = loop.create_task(factory(), name=name)
            self._runs[name] = run
            try:
                await asyncio.shield(run)
                if name not in self._again:
                    return
            except asyncio.CancelledError:
                if run.cancelled() and name in self._again:  # restart(): go round at once
                    self._again.discard(name)
                    continue
                run.cancel()  # the keeper itself is being cancelled
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await run
                raise
            except Exception as exc:
                now = loop.time()
                failures = [t for t in failures if now - t < FAILURE_WINDOW] + [now]
                log.error("%s failed (%d in %.0f s): %s", name, len(failures), FAILURE_WINDOW, exc, exc_info=exc)
                if len(failures) >= MAX_FAILURES:
                    self._gave_up[name] = str(exc) or type(exc).__name__
                    raise GaveUp(f"{name} failed {len(failures)} times in {FAILURE_WINDOW:.0f} s; giving up") from exc
                await asyncio.sleep(RESTART_DELAY)
            self._again.discard(name)
