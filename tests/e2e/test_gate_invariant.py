"""The product's one promise as a seeded, model-based test (issue 9 item 7, SPEC §12): over
the real `simagent run`, the real `simagent-fakemodem` (a subprocess on a pty) and a real
mosquitto, random steps interleave SIM swaps, modem faults, local and platform callers,
reloads and kill -9; after every step the fake modem's own records are checked.

Run (CI default: 200 steps, seed 9009, profile quectel; 200 steps take 40-75 s on a
2-core VM, plus a few seconds of set-up):

    .venv/bin/python -m pytest tests/e2e/test_gate_invariant.py
    SIMAGENT_INVARIANT_STEPS=3000 .venv/bin/python -m pytest tests/e2e/test_gate_invariant.py   # the long run
    SIMAGENT_INVARIANT_SEED=1234 ...          # replay the seed a failure printed
    SIMAGENT_INVARIANT_PROFILES=quectel,generic ...   # also a polling profile (no hot-swap URCs)
    SIMAGENT_INVARIANT_SKIP=unsafe_cfun1,hang ...     # leave step kinds out (names in STEP_WEIGHTS)

A failure prints the seed, the step it failed after, the message (for an attach, the
fake's transcript before it) and the step log (the whole log is also written to
`steps.log` in the test's tmp_path). The seed fixes the steps and their parameters, not
the timing of four processes: a replay walks the same steps and usually, not always,
fails at the same one.

Start state: a first-use terminal with `radio_gate = true` whose own card (HOME_ICCID)
got bound on the first start; the fake registers `REGISTER_DELAY` s after the radio comes
on with a usable card, so a radio wrongly left on registers within a pause.

Steps (STEP_WEIGHTS): the own card, a foreign card, or no card in the tray; `fault hang`
for 0.5-1.5 s (with or without a status/at call waiting on it) then `fault clear`; `fault
garbage|late-reply|busy|drop|delay=0.5..3`; `reboot`; `unplug` and later `replug`;
control-socket calls (raw socket or the `simagent` CLI, in the background so they overlap
what follows): `status`, `at AT+CSQ`, `at AT+COPS=?` (only when the fake knows
`set scan_seconds`), `diag`, `evidence export` (one or four at once), root's
`at --unsafe AT+CFUN=1`; platform commands on P/cmd: ping, status, at AT+CSQ,
export_evidence, a rebind with a token signed by an untrusted key; SIGHUP (with the
telemetry interval changed); kill -9 and restart; pauses.

What the test does not ask of the agent (out of any agent's reach, so never generated):
a card that the module cannot announce going in while its radio is on - the module hung
or unplugged (the fake models a USB drop, its radio keeps running), busy executing a slow
command (a `delay`/`late-reply` fault: a module answers one command at a time and takes
nothing, the gate's `+CFUN=4` included, until it answers; only a scan can be aborted), just
rebooted before the agent re-enabled hot-swap reporting, or a profile without hot-swap
URCs (polled); such an insert waits until the radio is off (the step becomes a pause; with
a polled profile the card is pulled first and the insert waits up to 3 s for the agent to
switch the radio off). Nor a card in within GATE_S of a hang's end (what the agent sent into
the hang times out on its own schedule). Nor a hang, unplug, kill -9, or a
`delay`/`late-reply` fault (it would make the module slow on the gate's own command) within
GATE_S = 0.3 s of a swap (six times
the gate's 50 ms target) or GATE_AFTER_BOOT_S = 0.8 s of a boot (the replug target is
300 ms): the step waits that long first. Nor reboots closer than
BOOT_GAP_S = 1.5 s to each other (the fake boots instantly, a module takes seconds). A
module that (re)boots does so with RF on and registers after `BOOT_REGISTER_DELAY` = 1.0 s
(issue 9 item 8: "with register_delay=1.0 a foreign card never attaches").

Checks after every step (`ctl state`, the fake's `--transcript`, the evidence table read
read-only from the state DB):

1. No card the binding does not allow ever attached: every entry of the fake's `attaches`
   is (HOME_ICCID, IMEI); the foreign ICCID never appears.
2. Every radio action has its evidence entry. Matching rule:
   - The radio commands are the lines the fake received (`dir` "in") that are `AT+CFUN=<n>`
     or `AT+CGATT=<n>`, whoever sent them (the gate, or root through `at --unsafe`).
   - A command counts only when it changed the radio. The test replays the transcript
     through a model of the fake (`TranscriptModel`, mirroring `FakeModemState`): CFUN
     starts at the profile's boot level at every `plugged`/`reboot` (and `AT+CFUN=1,1`);
     a line received while the fake is hung (`fault hang` .. `fault clear`/reboot) is not
     executed; every other line is (delay, late-reply, garbage, busy, drop and error
     faults only spoil the reply), and with a fake that has a busy channel (it knows
     `scan_seconds`) a line received while a delayed command or a scan executes runs when
     that ends or is aborted, unless a power-on drops it first. So a `CFUN=4` sent while
     the radio was already at 4 needs no entry, nor does one lost to a hang. The model is
     checked against the fake's own `cfun` at every `ctl state` (a mismatch is a
     RigError: the model needs updating, the product is not blamed).
   - Each counted command needs its own evidence entry (one entry answers one command,
     matched earliest first) whose `data.command` names it (`+CFUN=4`, `AT+CFUN=1` ...;
     the gate writes `radio_blocked`/`radio_restored`, an accepted unsafe write an entry
     of its own) and whose `mono` (CLOCK_BOOTTIME) lies within [t - 0.01 s, t + GRACE_S]
     of the time t the fake executed the command: the agent writes after the reply,
     which a delay fault and the retries behind it can hold back.
   - An entry written after a later counted command of the same kind belongs to that
     later one (so a missing entry is blamed on the right command).
   - Exempt (and logged as such) when no entry came: a command the daemon sent less than
     GRACE_S before it was killed (no process records after SIGKILL; the restart reads
     CFUN and gates again), and a command the modem answered no `OK` to - its reply
     dropped or lost to a hang or boot, an error answered (the fake executes the command
     whatever fault spoils the reply) - unless a retry of it (the same command, changing
     nothing now) got its `OK` within GRACE_S: the agent was never told it took effect.
     Check 1 still watches what such a command did.
3. The gate cannot be bypassed: root's `at --unsafe AT+CFUN=1` is refused while a foreign
   card is in the tray (SPEC §4); an accepted one fails at once.
The daemon must keep running (it is only ever stopped by the kill -9 step).

At the end: faults cleared, the modem plugged, background calls given up to 10 s; then
the agent must recover within RECOVERY_S: `status` shows the binding status of the card
in the tray (ok / violation / no_sim) with its ICCID, and the radio is on only for the own
card; the checks run once more after a pause.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from at_commands import profiles
from simagent_lab.fakemodem import read_transcript

from .conftest import FOREIGN_ICCID, HOME_ICCID, IMEI, wait_event

SEED = int(os.environ.get("SIMAGENT_INVARIANT_SEED", "9009"))
STEPS = int(os.environ.get("SIMAGENT_INVARIANT_STEPS", "200"))
PROFILES = [p.strip() for p in os.environ.get("SIMAGENT_INVARIANT_PROFILES", "quectel").split(",") if p.strip()]
SKIP = {s.strip() for s in os.environ.get("SIMAGENT_INVARIANT_SKIP", "").split(",") if s.strip()}

REGISTER_DELAY = 0.5  # s from radio on (usable card) to registered: a pause lets it happen
BOOT_REGISTER_DELAY = 1.0  # the same after a (re)boot with RF on (issue 9 item 8)
PAUSE_S = REGISTER_DELAY + 0.3
BOOT_GAP_S = 1.5  # a module takes seconds to boot: reboots come at least this far apart
GATE_AFTER_BOOT_S = 0.8  # the same after a boot (target: replug to CFUN=4 in 300 ms; registers at 1.0 s)
GATE_S = 0.3  # the gate's time to act on a change before a hang, unplug or kill -9 takes it away (target: 50 ms)
GRACE_S = 8.0  # a radio command's evidence entry may come this long after the command
RECOVERY_S = 20.0
BEFORE_ATTACH_S = 2.0  # how much of the transcript a check-1 failure shows
MAX_BACKGROUND = 6  # calls in flight at once; more become pauses
CALL_TIMEOUT = 40.0  # a background call gives up after this (the daemon's own op timeout is 30 s)
P = f"simagent/{IMEI}"

STEP_WEIGHTS = {
    "own": 9, "foreign": 10, "remove": 5, "pause": 9,
    "hang": 4, "garbage": 3, "late_reply": 3, "busy": 3, "drop": 1, "delay": 3,
    "reboot": 3, "unplug": 2,
    "status": 6, "at_csq": 4, "scan": 2, "diag": 2, "export": 3, "export_burst": 1, "unsafe_cfun1": 3,
    "mqtt_ping": 2, "mqtt_status": 2, "mqtt_at": 2, "mqtt_export": 2, "mqtt_bad_rebind": 2,
    "sighup": 2, "kill9": 2,
}
UNTRUSTED = Ed25519PrivateKey.generate()  # signs tokens no `trusted_keys` entry accepts


class InvariantBroken(AssertionError):
    pass


class RigError(Exception):
    """The test's own model disagrees with the fake: a rig bug, not a product failure."""


# -- the control socket, spoken directly (SPEC §8 wire format: JSON lines) ------------------
def control_call(path: Path, op: str, args: dict[str, Any], timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
    with closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"id": 1, "name": op, "args": args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the daemon closed the control connection")
            buf += chunk
    return json.loads(buf)


# -- the transcript replayed through a model of the fake ----------------------------------------
_RADIO = re.compile(r"^AT\+(CFUN|CGATT)=(\d)(?:,(\d))?$")


_FINAL = re.compile(r"^(OK|ERROR|\+CM[ES] ERROR:.*|NO CARRIER|COMMAND NOT SUPPORT)$")


@dataclass(eq=False)
class RadioCommand:
    t: float  # CLOCK_BOOTTIME seconds
    command: str  # normalised: "+CFUN=4"
    step: int
    until: float  # its entry is looked for up to here
    acknowledged: bool = False  # the modem answered OK to it, or to a retry of it


class TranscriptModel:
    """Reads the fake's JSON-lines transcript incrementally and replays it through a model
    of the fake's sequencing (see the module docstring); returns the radio commands that
    changed the radio.

    It mirrors `FakeModemState.handle_line`: a line received while hung is lost; faults are
    taken in order by the lines executed; every executed line runs its command (a fault only
    spoils the reply). With a busy channel (a fake that knows `scan_seconds`), a `delay`
    fault or an `AT+COPS=?` scan keeps the command executing: lines received meanwhile wait
    and run, in order, when it finishes or is aborted (`abort` entry); a power-on drops them.
    """

    def __init__(self, path: str, boot_cfun: int, clock_offset: float) -> None:
        self.path = path
        self.boot_cfun = boot_cfun
        self.offset = clock_offset  # CLOCK_BOOTTIME - CLOCK_MONOTONIC
        self.busy_channel = False  # set when the fake has `scan_seconds`
        self.scan_seconds = 0.0
        self._pos = 0
        self._partial = b""
        self.cfun = boot_cfun
        self.ps_wanted = True
        self.hung = False
        self.faults: list[list] = []  # [kind, seconds, count], as the fake keeps them
        self.executing_until: float | None = None
        self.executing_abortable = False
        self.queued: list[str] = []
        self.cfun_at_last_state: int | None = None
        self.lines_in = 0
        self.disruptions: list[float] = []  # boots and unplugs (CLOCK_BOOTTIME)
        # The radio command whose final result is next (a retry that changed nothing stands
        # for the command it repeats), until that result comes.
        self._awaiting: RadioCommand | None = None
        self._exec_awaiting: RadioCommand | None = None  # the same, for the command executing
        self._finals_owed: list[tuple[RadioCommand | None, bool]] = []  # ended executions' replies, in order
        self._last: dict[str, RadioCommand] = {}
        self._changed: list[RadioCommand] = []
        self._step = 0

    def _disrupted(self, t: float) -> None:
        self.disruptions.append(t + self.offset)
        self._awaiting = None

    def _power_on(self, t: float) -> None:
        self.cfun, self.ps_wanted, self.hung = self.boot_cfun, True, False
        self.faults, self.queued, self.executing_until = [], [], None
        self._finals_owed = []
        # An entry written after a power-on belongs to a command after it (the next
        # session's first +CFUN=4 comes within ms): a command from before the boot may
        # only claim entries up to it.
        for command in self._last.values():
            command.until = min(command.until, t + self.offset + 0.01)
        self._last = {}  # a retry after a boot repeats nothing from before it
        self._disrupted(t)

    def _take_fault(self) -> list | None:
        if not self.faults:
            return None
        fault = self.faults[0]
        fault[2] -= 1
        if fault[2] <= 0:
            self.faults.pop(0)
        return fault

    def _end_execution(self, t: float, *, aborted: bool = False) -> None:
        # Its reply (ERROR when aborted) goes out before the waiting lines are answered.
        self._finals_owed.append((self._exec_awaiting, aborted))
        self.executing_until, self.executing_abortable, self._exec_awaiting = None, False, None
        queued, self.queued = self.queued, []
        for line in queued:
            self._handle_line(line, t)

    def _handle_line(self, line: str, t: float) -> None:
        if self.hung:
            return
        if self.executing_until is not None:
            self.queued.append(line)
            return
        text = re.sub(r"\s+", "", line).upper()
        if not text:
            return
        at = text.find("AT")  # V.250: characters before the AT prefix are ignored
        text = text[at:] if at >= 0 else ""
        self._awaiting = None  # a reply still to come is not attributed
        self._execute(text, t)
        scan = text == "AT+COPS=?"
        fault = self._take_fault()  # taken by any non-empty line, an ERROR one too
        if not self.busy_channel:
            return
        if fault is None and scan:
            self.executing_until, self.executing_abortable = t + self.scan_seconds, True
        elif fault is not None and fault[0] == "delay":
            self.executing_until = t + fault[1] + (self.scan_seconds if scan else 0.0)
            self.executing_abortable = scan
        if self.executing_until is not None:  # its reply comes when it ends
            self._exec_awaiting, self._awaiting = self._awaiting, None

    def _execute(self, text: str, t: float) -> None:
        m = _RADIO.match(text)
        if not m:
            return
        name, value, extra = m.group(1), int(m.group(2)), m.group(3)
        command = f"+{name}={value}" + (f",{extra}" if extra is not None else "")
        effective = False
        if name == "CFUN" and extra == "1" and value == 1:  # reset: boots again
            self._power_on(t)
            effective = True
        elif name == "CFUN" and value in (0, 1, 4):
            effective = value != self.cfun
            self.cfun = value
        elif name == "CGATT" and value in (0, 1):
            effective = self.ps_wanted != bool(value)
            self.ps_wanted = bool(value)
        if not effective:
            retried = self._last.get(command)  # a retry: its OK tells the agent the first one took
            if retried is not None and not retried.acknowledged and t + self.offset - retried.t <= GRACE_S:
                self._awaiting = retried
            return
        t += self.offset
        radio = RadioCommand(t, command, self._step, until=t + GRACE_S)
        previous = self._last.get(command)
        if previous is not None:  # an entry after this command is this command's
            previous.until = min(previous.until, t)
        self._last[command] = radio
        self._awaiting = radio
        self._changed.append(radio)

    def read(self, step: int) -> list[RadioCommand]:
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        self._pos += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        self._step = step
        self._changed = []
        for raw in lines:
            if raw.strip():
                self._entry(json.loads(raw))
        return self._changed

    def _entry(self, entry: dict) -> None:
        t, direction, line = entry["t"], entry["dir"], entry["line"]
        while self.executing_until is not None and t >= self.executing_until:  # the command finished
            self._end_execution(self.executing_until)
        if direction == "ctl":
            if "-> error:" in line:
                return
            op, _, rest = line.partition(" ")
            if op in ("plugged", "reboot"):
                self._power_on(t)
            elif op == "unplugged":
                self._disrupted(t)
            elif op == "fault":
                args = json.loads(rest)
                kind = args.get("kind")
                if kind == "clear":
                    self.faults, self.hung = [], False
                elif kind == "hang":
                    self.hung = True
                else:
                    default = {"delay": 1.0, "late-reply": 1.0}.get(kind, 0.0)
                    seconds = args.get("seconds")
                    seconds = default if seconds is None else float(seconds)
                    self.faults.append([kind, seconds, int(args.get("count", 1))])
            elif op == "set":
                args = json.loads(rest)
                if "scan_seconds" in args:
                    self.scan_seconds = float(args["scan_seconds"])
            elif op == "state":
                self.cfun_at_last_state = self.cfun
        elif direction == "abort":
            if self.executing_until is not None and self.executing_abortable:
                self._end_execution(t, aborted=True)
        elif direction == "out":
            if self._finals_owed and _FINAL.match(line.strip()):
                owner, aborted = self._finals_owed.pop(0)
                if owner is not None:
                    owner.acknowledged |= line.strip() == "OK" and not aborted
            elif self._awaiting is not None and _FINAL.match(line.strip()):
                self._awaiting.acknowledged |= line.strip() == "OK"
                self._awaiting = None
        elif direction == "in":
            self.lines_in += 1
            self._handle_line(line, t)


def _norm_command(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    text = re.sub(r"\s+", "", value).upper()
    return text[2:] if text.startswith("AT") else text


class EvidenceReader:
    """The evidence table of the state DB, read-only and incrementally."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.last_seq = 0
        self.entries: list[dict] = []

    def read(self) -> list[dict]:
        if not self.db.exists():
            return []
        try:
            with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)) as conn:
                rows = conn.execute("SELECT seq, entry FROM evidence WHERE seq > ? ORDER BY seq",
                                    (self.last_seq,)).fetchall()
        except sqlite3.OperationalError:  # mid-checkpoint or locked: next time
            return []
        new = [json.loads(entry) for _, entry in rows]
        if rows:
            self.last_seq = rows[-1][0]
        self.entries += new
        return new


# -- background callers ----------------------------------------------------------------------
@dataclass
class Call:
    number: int
    what: str
    step: int
    started: float
    thread: threading.Thread | None = None
    result: Any = None
    error: str | None = None
    finished: float | None = None
    reported: bool = False
    judge: Callable[["Call"], None] | None = None  # looks at the answer once it came

    @property
    def done(self) -> bool:
        return self.finished is not None


@dataclass
class World:
    """What the test knows it did: the card in the tray, plugged or not."""

    tray: str | None = HOME_ICCID
    plugged: bool = True
    unplugged_at_step: int = 0
    last_clear: float = 0.0  # when a hang was last cleared
    last_change: float = 0.0  # monotonic time of the last tray change or boot
    last_boot: float = 0.0  # monotonic time of the last reboot or replug
    kills: list[float] = field(default_factory=list)  # CLOCK_BOOTTIME of each kill -9


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class InvariantRun:
    def __init__(self, profile: str, modem, agent, platform, log_path: Path) -> None:
        self.profile = profile
        spec = profiles.get(profile)  # polled unless it announces SIM changes and boots (as the Enforcer decides)
        self.polling = not ((spec.sim_removed_urcs or spec.sim_inserted_urcs) and spec.boot_urcs)
        self.modem = modem
        self.agent = agent
        self.platform = platform
        self.rng = random.Random(SEED)
        self.world = World()
        offset = boottime() - time.monotonic()
        self.transcript = TranscriptModel(modem.transcript_path, profiles.get(profile).boot_cfun, offset)
        self.evidence = EvidenceReader(agent.state_dir / "state.db")
        self.pending: list[RadioCommand] = []
        self.used_entries: set[int] = set()
        self.matched = 0
        self.exempt = 0
        self.calls: list[Call] = []
        self.step = 0
        self.log: list[str] = []
        self.log_path = log_path
        self.t0 = time.monotonic()
        self.scan_supported = False
        self.counts: dict[str, int] = {}

    # -- logging and failing ----------------------------------------------------------------
    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.2f}s] step {self.step:4d}: {text}"
        self.log.append(line)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def fail(self, message: str) -> None:
        self.note("FAILED: " + message)
        shown = self.log if len(self.log) <= 400 else ["..."] + self.log[-150:]
        raise InvariantBroken(
            f"invariant broken (seed {SEED}, profile {self.profile}, after step {self.step} of {STEPS}): {message}\n"
            f"replay: SIMAGENT_INVARIANT_SEED={SEED} SIMAGENT_INVARIANT_STEPS={STEPS} "
            f"SIMAGENT_INVARIANT_PROFILES={self.profile}"
            + (f" SIMAGENT_INVARIANT_SKIP={','.join(sorted(SKIP))}" if SKIP else "")
            + " .venv/bin/python -m pytest tests/e2e/test_gate_invariant.py\n"
            f"full step log: {self.log_path}\n" + "\n".join(shown))

    # -- checks -----------------------------------------------------------------------------
    def check(self, *, final: bool = False) -> dict:
        state = self.modem.state()
        for attach in state["attaches"]:
            if attach["iccid"] != HOME_ICCID or attach["imei"] != IMEI:
                self.fail(f"check 1: a card the binding does not allow attached: {attach}; "
                          f"all attaches: {state['attaches']}; fake state: cfun={state['cfun']} "
                          f"iccid={state['iccid']} hung={state['hung']} faults={state['faults']}\n"
                          f"the fake's transcript in the {BEFORE_ATTACH_S:g} s before the attach:\n"
                          + self.transcript_excerpt(attach["t"] - BEFORE_ATTACH_S, attach["t"] + 0.01))
        changed = self.transcript.read(self.step)
        if self.transcript.cfun_at_last_state is not None and self.transcript.cfun_at_last_state != state["cfun"]:
            raise RigError(f"transcript model says CFUN {self.transcript.cfun_at_last_state}, "
                           f"the fake says {state['cfun']} (step {self.step})")
        self.pending += changed
        self._match_evidence(final=final)
        if not self.agent.running:
            code = self.agent.proc.poll()
            self.fail(f"the daemon exited by itself (code {code}); log tail:\n{self.agent.log[-3000:]}")
        self._report_calls()
        return state

    def transcript_excerpt(self, since: float, until: float) -> str:
        """The fake's transcript between two of its (monotonic) times, without `state` polls."""
        lines = [f"  {e['t']:.3f} {e['dir']:>5} {e['line'][:100]}"
                 for e in read_transcript(self.modem.transcript_path)
                 if since <= e["t"] <= until and e["line"] != "state"]
        return "\n".join(lines[-80:])

    def _match_evidence(self, *, final: bool) -> None:
        self.evidence.read()
        now = boottime()
        still: list[RadioCommand] = []
        for command in self.pending:
            entry = next((e for e in self.evidence.entries
                          if e["seq"] not in self.used_entries
                          and _norm_command((e.get("data") or {}).get("command")) == command.command
                          and command.t - 0.01 <= e.get("mono", -1) <= command.until), None)
            if entry is not None:
                self.used_entries.add(entry["seq"])
                self.matched += 1
                continue
            if now <= command.t + GRACE_S and not final:
                still.append(command)
                continue
            killed = [k for k in self.world.kills if command.t <= k <= command.t + GRACE_S]
            if killed:
                self.exempt += 1
                self.note(f"exempt: AT{command.command} (step {command.step}) had no entry when the daemon "
                          f"was killed {killed[0] - command.t:.2f} s later")
                continue
            if not command.acknowledged:
                self.exempt += 1
                self.note(f"exempt: AT{command.command} (step {command.step}) changed the radio but the modem "
                          f"answered no OK to it or to a retry: the agent was never told it took effect")
                continue
            if now <= command.t + GRACE_S:  # final: wait for it
                still.append(command)
                continue
            near = [(e["seq"], e["type"], (e.get("data") or {}).get("command"), round(e.get("mono", 0) - command.t, 2))
                    for e in self.evidence.entries if abs(e.get("mono", 0) - command.t) < 15]
            self.fail(f"check 2: AT{command.command} changed the radio (sent at step {command.step}, "
                      f"{now - command.t:.1f} s ago, transcript t {command.t - self.transcript.offset:.3f}, "
                      f"{'answered OK' if command.acknowledged else 'no OK'}) and has no evidence entry naming it "
                      f"within {command.until - command.t:.2f} s; "
                      f"entries near it (seq, type, command, s after): {near}")
        self.pending = still

    def _report_calls(self) -> None:
        for call in self.calls:
            if call.done and not call.reported:
                call.reported = True
                outcome = call.error or _short(call.result)
                self.note(f"  <- #{call.number} {call.what} (step {call.step}) after "
                          f"{call.finished - call.started:.2f} s: {outcome}")
                if call.judge is not None:
                    call.judge(call)

    # -- background calls -----------------------------------------------------------------
    def background(self, what: str, fn: Callable[[], Any], *, wait: float = 0.0,
                   judge: Callable[[Call], None] | None = None) -> Call | None:
        running = [c for c in self.calls if not c.done]
        if len(running) >= MAX_BACKGROUND:
            self.note(f"{what}: {len(running)} calls in flight, pausing instead")
            time.sleep(PAUSE_S)
            return None
        call = Call(len(self.calls) + 1, what, self.step, time.monotonic(), judge=judge)

        def run() -> None:
            try:
                call.result = fn()
            except Exception as exc:  # reported, not raised: the checks judge the product
                call.error = f"{type(exc).__name__}: {exc}"
            call.finished = time.monotonic()

        call.thread = threading.Thread(target=run, name=f"invariant-call-{call.number}", daemon=True)
        self.calls.append(call)
        self.note(f"-> #{call.number} {what}")
        call.thread.start()
        if wait:
            call.thread.join(wait)
        return call

    def control(self, what: str, op: str, args: dict[str, Any], cli: list[str] | None, use_cli: bool,
                wait: float) -> Call | None:
        if use_cli and cli is not None:
            def fn() -> Any:
                proc = self.agent.cli(*cli, timeout=CALL_TIMEOUT)
                tail = (proc.stdout.strip().splitlines() or [""])[-1][:100]
                return {"exit": proc.returncode, "out": tail, "err": proc.stderr.strip()[:160]}
            return self.background(f"cli {' '.join(cli)}", fn, wait=wait)
        return self.background(f"socket {op} {args or ''}", lambda: control_call(self.agent.control_socket, op, args),
                               wait=wait)

    def mqtt(self, name: str, args: dict[str, Any], token: str | None = None) -> None:
        command = {"id": f"inv-{self.step}-{uuid.uuid4().hex[:6]}", "name": name, "args": args}
        if token:
            command["token"] = token
        self.platform.publish(f"{P}/cmd", json.dumps(command))
        self.note(f"mqtt {name} {args or ''}{' (untrusted token)' if token else ''}")

    # -- the world ----------------------------------------------------------------------------
    def can_insert_while_radio_on(self, state: dict) -> bool:
        """A card may go in with the radio on only when the module announces it and the
        agent can reach the module: not while the module itself is slow (a `delay` or
        `late-reply` fault executing or armed for the next command) - it takes no command
        on its one AT channel, the gate's included, until it answers (a scan is aborted)."""
        slow = (state.get("executing") and not state.get("executing_abortable")) or any(
            kind in ("delay", "late-reply") for kind in state["faults"])
        return (state["plugged"] and not state["hung"] and not self.polling and state["hotswap_active"] and not slow)

    def boot(self, op: Callable[[], Any]) -> None:
        wait = self.world.last_boot + BOOT_GAP_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.modem.set(register_delay=BOOT_REGISTER_DELAY)
        try:
            op()
        finally:
            self.modem.set(register_delay=REGISTER_DELAY)
            self.world.last_change = self.world.last_boot = time.monotonic()

    def let_the_gate_act(self) -> None:
        """A hang, unplug or kill -9 right on the heels of a swap or boot would take the
        modem away before any gate could act, and a module made slow (`delay`,
        `late-reply`) then would take nothing, the gate's command included, until it
        answers: they come GATE_S after the last change, and GATE_AFTER_BOOT_S after the
        last boot, at the earliest."""
        wait = max(self.world.last_change + GATE_S, self.world.last_boot + GATE_AFTER_BOOT_S) - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    # -- one step ------------------------------------------------------------------------------
    def pick(self) -> tuple[str, list[float]]:
        kinds = [k for k in STEP_WEIGHTS if k not in SKIP and (k != "scan" or self.scan_supported)]
        kind = self.rng.choices(kinds, weights=[STEP_WEIGHTS[k] for k in kinds])[0]
        return kind, [self.rng.random() for _ in range(4)]  # a fixed number of draws per step

    def do(self, kind: str, r: list[float]) -> None:
        world = self.world
        state = self.modem.state()
        if not world.plugged and (self.step - world.unplugged_at_step >= 4 or kind in ("unplug", "reboot")):
            world.plugged = True
            self.boot(self.modem.replug)
            self.note(f"replug (unplugged since step {world.unplugged_at_step}; boots with RF on)")
            return
        use_cli = r[1] < 0.2
        wait = 0.0 if r[2] < 0.5 else r[2] * 2.0  # wait for the call up to 2 s, or not at all
        if kind in ("own", "foreign"):
            iccid = HOME_ICCID if kind == "own" else FOREIGN_ICCID
            if (wait_after_clear := world.last_clear + GATE_S - time.monotonic()) > 0:
                time.sleep(wait_after_clear)
            if (kind == "foreign" and state["cfun"] != 4 and self.polling and state["plugged"] and not state["hung"]
                    and state["iccid"] is not None):
                # A polled module: the technician pulls the card and waits for the agent to
                # see the empty tray (radio off) before pushing the other card in.
                self.modem.sim_remove()
                world.tray, world.last_change = None, time.monotonic()
                deadline = time.monotonic() + 3.0
                while (state := self.modem.state())["cfun"] != 4 and time.monotonic() < deadline:
                    time.sleep(0.05)
            if kind == "foreign" and state["cfun"] != 4 and not self.can_insert_while_radio_on(state):
                self.note(f"foreign card deferred: radio on (cfun {state['cfun']}) and the module cannot announce "
                          f"it (plugged {state['plugged']}, hung {state['hung']}, hot-swap {state['hotswap_active']}, "
                          f"polling {self.polling}); pause")
                time.sleep(PAUSE_S)
                return
            if state["iccid"] is not None:
                self.modem.sim_remove()
                if r[0] < 0.3:
                    time.sleep(r[3] * 0.3)  # the tray stays empty a moment
                    state = self.modem.state()
                    if kind == "foreign" and state["cfun"] != 4 and not self.can_insert_while_radio_on(state):
                        world.tray = None
                        world.last_change = time.monotonic()
                        self.note("card removed; foreign card deferred (the module cannot announce it)")
                        return
            self.modem.sim_insert(iccid)
            world.tray = iccid
            world.last_change = time.monotonic()
            self.note(f"{kind} card in ({iccid})")
        elif kind == "remove":
            self.modem.sim_remove()
            world.tray = None
            world.last_change = time.monotonic()
            self.note("card removed")
        elif kind == "pause":
            time.sleep(PAUSE_S * (1 + r[0]))
            self.note("pause")
        elif kind == "hang":
            hold = 0.5 + r[0]
            self.let_the_gate_act()
            self.modem.fault("hang")
            self.note(f"fault hang for {hold:.1f} s")
            if r[3] < 0.6:
                if r[1] < 0.5:
                    self.control("status", "status", {}, ["status", "--json"], r[1] < 0.15, 0.0)
                else:
                    self.control("at AT+CSQ", "at", {"command": "AT+CSQ"}, ["at", "AT+CSQ"], r[1] > 0.85, 0.0)
            time.sleep(hold)
            self.modem.fault("clear")
            self.note("fault clear")
            # What the agent sent into the hang times out on its own schedule (it cannot
            # know the module is back before): a card goes in GATE_S after the clear at the
            # earliest.
            self.world.last_clear = time.monotonic()
        elif kind in ("garbage", "late_reply", "busy", "drop"):
            if kind == "late_reply":
                self.let_the_gate_act()  # a module slow to answer right after a swap: see can_insert_while_radio_on
            count = 1 + int(r[0] * 3)
            self.modem.fault(kind.replace("_", "-"), count=count)
            self.note(f"fault {kind.replace('_', '-')} count={count}")
            time.sleep(r[3] * 0.3)
        elif kind == "delay":
            self.let_the_gate_act()
            seconds = round(0.5 + r[0] * 2.5, 1)
            self.modem.fault("delay", seconds=seconds)
            self.note(f"fault delay={seconds}")
            time.sleep(r[3] * 0.3)
        elif kind == "reboot":
            self.boot(self.modem.reboot)
            self.note("reboot (boots with RF on)")
        elif kind == "unplug":
            self.let_the_gate_act()
            self.modem.unplug()
            world.plugged = False
            world.unplugged_at_step = self.step
            self.note("unplug")
        elif kind == "status":
            self.control("status", "status", {}, ["status", "--json"], use_cli, wait)
        elif kind == "at_csq":
            self.control("at AT+CSQ", "at", {"command": "AT+CSQ"}, ["at", "AT+CSQ"], use_cli, wait)
        elif kind == "scan":
            self.control("at AT+COPS=?", "at", {"command": "AT+COPS=?"}, ["at", "AT+COPS=?"], use_cli, wait)
        elif kind == "diag":
            self.control("diag", "diag", {}, ["diag", "--json"], use_cli, wait)
        elif kind == "export":
            self.control("evidence export", "export_evidence", {}, ["evidence", "export", "--out", os.devnull],
                         use_cli, wait)
        elif kind == "export_burst":
            for _ in range(4):
                self.control("evidence export", "export_evidence", {}, None, False, 0.0)
        elif kind == "unsafe_cfun1":
            self.unsafe_cfun1(state, use_cli)
        elif kind == "mqtt_ping":
            self.mqtt("ping", {})
        elif kind == "mqtt_status":
            self.mqtt("status", {})
        elif kind == "mqtt_at":
            self.mqtt("at", {"command": "AT+CSQ"})
        elif kind == "mqtt_export":
            self.mqtt("export_evidence", {})
        elif kind == "mqtt_bad_rebind":
            now = int(time.time())
            token = jwt.encode({"sub": IMEI, "iccid": FOREIGN_ICCID, "act": "rebind", "exp": now + 600, "iat": now - 60,
                                "jti": f"bad-{uuid.uuid4().hex}"}, UNTRUSTED, algorithm="EdDSA")
            self.mqtt("rebind", {}, token=token)
        elif kind == "sighup":
            interval = 5 + int(r[0] * 55)
            self.agent.reconfigure(telemetry={"interval": float(interval)})
            self.agent.hup()
            self.note(f"SIGHUP (telemetry interval {interval} s)")
        elif kind == "kill9":
            self.let_the_gate_act()
            self.agent.kill9()
            world.kills.append(boottime())
            self.note("kill -9")
            ready = self.agent.restart()
            self.note(f"restarted: {ready.get('STATUS', '')}")
        else:
            raise AssertionError(kind)

    def unsafe_cfun1(self, state: dict, use_cli: bool) -> None:
        """Root's `at --unsafe AT+CFUN=1`, in the background; check 3 judges its answer when
        it comes (the step waits up to 2 s for it)."""
        foreign_in = state["iccid"] == FOREIGN_ICCID and self.world.tray == FOREIGN_ICCID
        if foreign_in:
            self.let_the_gate_act()  # the gate has seen the card: it holds the radio off now

        def fn() -> dict[str, Any]:
            if use_cli:
                proc = self.agent.cli("at", "--unsafe", "AT+CFUN=1", timeout=CALL_TIMEOUT)
                return {"accepted": proc.returncode == 0 and proc.stdout.strip().endswith("OK"),
                        "answer": f"exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-160:]}"}
            reply = control_call(self.agent.control_socket, "at", {"command": "AT+CFUN=1", "unsafe": True})
            return {"accepted": bool(reply.get("ok") and reply["result"].get("ok")), "answer": _short(reply)}

        def judge(call: Call) -> None:
            if foreign_in and call.result and call.result["accepted"]:
                self.fail(f"check 3: root's `at --unsafe AT+CFUN=1` (#{call.number}, step {call.step}) was accepted "
                          f"while the gate holds a foreign card off: {call.result['answer']}")

        via = "cli" if use_cli else "socket"
        self.background(f"root at --unsafe AT+CFUN=1 via {via} (foreign card in: {foreign_in})", fn, wait=2.0,
                        judge=judge)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> None:
        self.note(f"seed {SEED}, {STEPS} steps, profile {self.profile} (polling {self.polling}), "
                  f"scan_seconds {'supported' if self.scan_supported else 'not in this fake: scan steps skipped'}, "
                  f"skip {sorted(SKIP) or 'nothing'}")
        self.check()
        for self.step in range(1, STEPS + 1):
            kind, r = self.pick()
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.do(kind, r)
            self.check()
        self.step += 1
        self.finish()

    def finish(self) -> None:
        self.note("end: clear faults, replug, settle")
        self.modem.fault("clear")
        if not self.world.plugged:
            self.world.plugged = True
            self.boot(self.modem.replug)
        deadline = time.monotonic() + 10
        for call in self.calls:
            if call.thread is not None:
                call.thread.join(max(0.0, deadline - time.monotonic()))
        self.check()
        stuck = [c for c in self.calls if not c.done]
        if stuck:
            self.note(f"{len(stuck)} call(s) still unanswered 10 s after the end: "
                      + ", ".join(f"#{c.number} {c.what} (step {c.step})" for c in stuck))
        self.settle_evidence()  # the radio commands sent so far get their entries (or fail) first
        tray = self.modem.state()["iccid"]
        expected = {HOME_ICCID: ("ok", "bound"), FOREIGN_ICCID: ("violation",), None: ("no_sim",)}[tray]
        deadline = time.monotonic() + RECOVERY_S
        last: Any = None
        while True:
            try:
                reply = control_call(self.agent.control_socket, "status", {}, timeout=5)
                doc = reply.get("result") or {}
                last = {"binding": doc.get("binding"), "sim": doc.get("sim"), "radio": doc.get("radio")}
                if (reply.get("ok") and doc["binding"]["status"] in expected and doc["sim"]["iccid"] == tray):
                    break
            except (OSError, ValueError, KeyError, TypeError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                self.fail(f"recovery: {RECOVERY_S:.0f} s after the faults cleared, status does not show "
                          f"binding {expected} for the card in the tray ({tray}); last status: {last}")
            self.check()
            time.sleep(0.25)
        want_cfun = 1 if tray == HOME_ICCID else 4
        deadline = time.monotonic() + RECOVERY_S
        while (cfun := self.modem.state()["cfun"]) != want_cfun:
            if time.monotonic() > deadline:
                self.fail(f"recovery: the radio is at CFUN {cfun} with card {tray} in the tray (want {want_cfun})")
            time.sleep(0.1)
        self.note(f"recovered: status {last}")
        time.sleep(PAUSE_S)
        self.settle_evidence()
        self.check(final=True)

    def settle_evidence(self) -> None:
        """Checks until every radio command seen so far has its entry or its GRACE_S is over."""
        deadline = time.monotonic() + GRACE_S + 1
        self.check()
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.25)
            self.check()


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 160 else text[:157] + "..."


@pytest.mark.parametrize("profile", PROFILES)
def test_no_foreign_card_ever_attaches(profile, fake_modem_process, agent_process, subscriber, mosquitto, tmp_path):
    started = time.monotonic()
    modem = fake_modem_process(profile=profile, imei=IMEI, iccid=HOME_ICCID, register_delay=REGISTER_DELAY)
    platform = subscriber(mosquitto, f"{P}/#")
    modem_section: dict[str, Any] = {"profile": profile, "sim_poll_interval": 0.5}  # (a polled profile's pace)
    agent = agent_process(modem, mosquitto, start=False,
                          binding={"mode": "first-use", "radio_gate": True, "on_violation": "radio-off"})
    agent.reconfigure(modem=modem_section)  # ("modem" is also agent_process's first parameter)
    agent.start().wait_ready()
    wait_event(platform, "bound")  # the own card got bound on the first start

    run = InvariantRun(profile, modem, agent, platform, tmp_path / "steps.log")
    probe = modem.control("set", scan_seconds=2)  # a `+COPS=?` that takes 2 s, where the fake has it
    run.scan_supported = run.transcript.busy_channel = bool(probe.get("ok"))
    try:
        run.run()
    except InvariantBroken:
        raise
    except Exception:  # the rig itself failed: show where the run was
        print(f"the run stopped on an error; its last steps (full log: {run.log_path}):\n" + "\n".join(run.log[-60:]))
        raise
    finally:
        elapsed = time.monotonic() - started
        summary = (f"invariant run: seed {SEED}, profile {profile}, {run.step} steps in {elapsed:.1f} s; "
                   f"radio commands matched {run.matched}, exempt {run.exempt}, pending {len(run.pending)}; "
                   f"transcript lines in {run.transcript.lines_in}; evidence entries {len(run.evidence.entries)}; "
                   f"steps {dict(sorted(run.counts.items()))}")
        print(summary)
        run.note(summary)
    assert run.matched > 0, "no radio command was matched: the evidence check would be vacuous"
