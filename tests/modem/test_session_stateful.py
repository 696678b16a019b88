"""Issue 9 item 3: the AT session cannot wedge, whatever the interleaving.

A hypothesis state machine drives the REAL ``ATClient`` against the in-process fake modem
on a real pty. Rules inject the fake's faults (hang, clear, delay, drop, garbage,
late-reply, busy, error), launch concurrent callers (normal, priority, abortable network
scans) and cancel callers at random moments; time passes only in ``settle`` steps (the
client's event loop runs) while the fake answers from its own thread in real time.

Invariants, checked for every caller that finishes:
* no caller ever gets another command's response: each command's answer identifies it
  (``AT+CGSN`` the IMEI, ``ATS3?`` 013, ``AT+CSQ``/``AT+CFUN?`` the fake's values);
* a caller ends only with its response, ``CommandTimeout``, ``PortLost``, its own
  cancellation, or (a scan only) ``CommandAborted`` - never ``LocalProtocolError``;
* the channel never stalls: while callers wait, one of them finishes at least every
  ``PROGRESS_BOUND`` seconds (one exchange: its timeout, the probes, the abort grace).
At the end of each example the faults are cleared and, once every caller has settled,
the next command succeeds within 5 s - on the same client, or, if the client has closed
itself as unresponsive, on a fresh client on the same port (as the daemon reopens it).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from simagent_lab import fakemodem
from at_commands.client import ATClient, CommandAborted, CommandTimeout, PortLost
from simagent_lab.fakemodem_handles import start_in_process

IMEI = fakemodem.DEFAULT_IMEI
# What each command may answer (the fake's values; CFUN moves between 1 and 4).
ANSWERS = {
    "AT+CGSN": {(IMEI,)},
    "ATS3?": {("013",)},
    "AT+CSQ": {("+CSQ: 14,99",), ("+CSQ: 99,99",)},
    "AT+CFUN?": {("+CFUN: 1",), ("+CFUN: 4",)},
}
PRIORITY_COMMANDS = {"AT+CFUN=4": {()}, "AT+CFUN=1": {()}}
SCAN = "AT+COPS=?"
# The fake's `garbage` fault puts these before the real answer (a confused module).
GARBAGE_LINES = {"~#@!", "+CSQ: 1"}

RESYNC_TIMEOUT = 0.2
ABORT_GRACE = 0.3
PROGRESS_BOUND = 0.6 + 3 * RESYNC_TIMEOUT + ABORT_GRACE + 1.0  # timeout, probes, grace, slack
RECOVERY_BOUND = 5.0

# First choices first: hypothesis (derandomized) starts from the simplest draws.
faults = st.one_of(
    st.just(("hang", None)), st.just(("clear", None)),
    st.tuples(st.sampled_from(["delay", "late-reply"]), st.floats(0.05, 0.5)),
    st.sampled_from([("drop", None), ("garbage", None), ("busy", None), ("error", None)]),
)
KINDS = ["normal", "priority", "scan", "normal"]
COMMANDS = {"normal": sorted(ANSWERS), "priority": sorted(PRIORITY_COMMANDS), "scan": [SCAN]}
PAUSES = [0.02, 0.0, 0.1, 0.3]


class Caller:
    def __init__(self, task: asyncio.Task, command: str, kind: str, started: float):
        self.task, self.command, self.kind, self.started = task, command, kind, started
        self.cancelled_by_us = False


class AtSession(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.fm = start_in_process(Path(self.dir.name), "modem", scan_seconds=0.4)
        self.loop = asyncio.new_event_loop()
        self.client = self._open()
        self.run(self.client.command("ATE0", 2))
        self.callers: list[Caller] = []  # launched and not yet checked
        self.launched: list[Caller] = []
        self.reopened = 0
        self.progress = time.monotonic()  # when a caller last finished (or none waited)

    # -- helpers ------------------------------------------------------------------------

    def run(self, coro, limit: float = 10.0):
        return self.loop.run_until_complete(asyncio.wait_for(coro, limit))

    def _open(self, resync_first: bool = False) -> ATClient:
        return self.run(ATClient.open(self.fm.port, resync_timeout=RESYNC_TIMEOUT,
                                      abort_grace=ABORT_GRACE, resync_first=resync_first))

    def launch(self, command: str, kind: str, timeout: float) -> None:
        coro = self.client.command(command, timeout, check=False, priority=kind == "priority",
                                   abortable=kind == "scan")
        task = self.loop.create_task(coro)
        if not self.callers:
            self.progress = time.monotonic()
        self.callers.append(Caller(task, command, kind, time.monotonic()))
        self.launched.append(self.callers[-1])

    def pass_time(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))
        self.collect()

    def collect(self) -> None:
        """Check every caller that has finished; the channel must not stall."""
        for caller in list(self.callers):
            if caller.task.done():
                self.callers.remove(caller)
                self.progress = time.monotonic()
                check_outcome(caller)
        stalled = time.monotonic() - self.progress
        assert not self.callers or stalled < PROGRESS_BOUND, (
            f"no caller finished for {stalled:.1f}s; waiting: "
            f"{[(c.command, c.kind) for c in self.callers]}, core {self.client._conn.state}")

    # -- rules ----------------------------------------------------------------------------

    @rule(fault=faults, count=st.integers(1, 3), pause=st.sampled_from(PAUSES))
    def fault(self, fault, count, pause):
        kind, seconds = fault
        self.fm.fault(kind, seconds=seconds, count=count)
        self.pass_time(pause)

    @rule(kind=st.sampled_from(KINDS), data=st.data(), timeout=st.floats(0.1, 0.6),
          pause=st.sampled_from(PAUSES))
    def call(self, kind, data, timeout, pause):
        self.launch(data.draw(st.sampled_from(COMMANDS[kind])), kind, timeout)
        self.pass_time(pause)

    # No precondition depends on timing (hypothesis must replay the same draws): cancel
    # picks any caller ever launched (a finished one is a no-op), reopen is a no-op
    # unless the client has closed itself.
    @rule(pick=st.integers(0, 63), pause=st.sampled_from(PAUSES))
    def cancel(self, pick, pause):
        if self.launched:
            caller = self.launched[pick % len(self.launched)]
            if not caller.task.done():
                caller.cancelled_by_us = True
                caller.task.cancel()
        self.pass_time(pause)

    @rule()
    def reopen(self):
        """What the daemon does after the client closed itself as unresponsive."""
        if not self.client.is_lost:
            return
        while self.callers:  # the old client's callers all end with PortLost
            self.pass_time(0.02)
        self.client = self._open(resync_first=True)
        self.reopened += 1

    @invariant()
    def callers_are_checked(self):
        self.collect()

    # -- the end: the fault clears, everyone settles, the next command succeeds -----------

    def teardown(self):
        try:
            self.fm.fault("clear")
            while self.callers:  # collect() fails if the channel stalls
                self.pass_time(0.05)
            started = time.monotonic()
            try:
                response = self.run(self.client.command("AT+CGSN", 3), RECOVERY_BOUND)
            except PortLost:  # closed as unresponsive (maybe by this very command): reopen
                self.client.close()
                self.client = self._open(resync_first=True)
                response = self.run(self.client.command("AT+CGSN", 3), RECOVERY_BOUND)
            recovery = time.monotonic() - started
            assert response.final.ok and response.lines == [IMEI]
            assert recovery <= RECOVERY_BOUND, f"recovered in {recovery:.2f}s"
        finally:  # (after a failure: do not leave tasks, a pty or a thread behind)
            self.client.close()
            leftovers = [c.task for c in self.callers]
            if leftovers:
                self.loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            self.loop.close()
            self.fm.stop()
            self.dir.cleanup()


def check_outcome(caller: Caller) -> None:
    task = caller.task
    if task.cancelled():
        assert caller.cancelled_by_us, f"{caller.command}: cancelled by nobody"
        return
    exc = task.exception()
    if exc is None:
        response = task.result()
        lines = tuple(line for line in response.lines if line not in GARBAGE_LINES)
        if caller.kind == "scan":
            assert len(lines) <= 1 and all(line.startswith("+COPS: ") for line in lines), lines
        elif response.final.ok:
            allowed = {**ANSWERS, **PRIORITY_COMMANDS}[caller.command]
            assert lines in allowed, f"{caller.command} got {lines!r}: another command's answer"
        else:
            assert lines == (), f"{caller.command} failed with {lines!r}"
        return
    if isinstance(exc, CommandAborted):
        assert caller.kind == "scan", f"{caller.command} aborted but it is not abortable"
        if exc.response is not None:
            foreign = [line for line in exc.response.lines if not line.startswith("+COPS: ") and line not in GARBAGE_LINES]
            assert not foreign, f"an aborted scan's answer holds another command's lines: {foreign!r}"
        return
    assert isinstance(exc, (CommandTimeout, PortLost)), f"{caller.command}: unexpected {exc!r}"


AtSession.TestCase.settings = settings(
    max_examples=12, stateful_step_count=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(HealthCheck),
)
test_at_session_never_wedges = AtSession.TestCase
