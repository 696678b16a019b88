"""The radio gate under pressure (issue 9 item 8, SPEC §11), through the whole daemon:
`simagent run`, the real `simagent-fakemodem` (quectel, hot-swap URCs) and mosquitto.
Every latency is stamped by the fake's transcript (one monotonic clock, the fake's I/O
thread): the trigger leaving or entering the fake, and `AT+CFUN=4` arriving on the wire.

- `swap_to_radio_off_under_load_p99_ms` (target ≤ 50): a foreign card is swapped in
  (from the `+QSIMSTAT: 1,0` URC leaving the fake to `AT+CFUN=4`) while threads keep
  calling `status`, `at AT+CSQ`, `at AT+COPS=?` and `export_evidence` (of a
  `EXPORT_ENTRIES`-entry log) on the control socket; the bound card goes back in
  between swaps. Where the fake supports `set scan_seconds` the scan takes `SCAN_S` s
  (`swap_under_load_scan_s`; null: the fake answers it at once).
- `hang_recovery_s` (target ≤ 5): the modem hangs (`fault hang`), a foreign card goes in
  meanwhile (the agent notices: its radio command goes unanswered), the fault clears;
  from `fault clear` to the next binding decision in the evidence log. Median of
  `HANG_TRIALS`; a trial that never recovers within `HANG_CAP_S` counts as the cap and in
  `hang_recovery_failures`.
- `replug_to_radio_off_p99_ms` (target ≤ 300): with a foreign card in the tray (held
  off), the fake is unplugged and plugged back; it boots with RF on and registers after
  `REPLUG_REGISTER_DELAY` s. From the port appearing (`plugged` in the transcript) to
  `AT+CFUN=4`. `replug_foreign_attached` counts attaches of the foreign card (must be 0);
  a replug without `AT+CFUN=4` within `REPLUG_CAP_S` counts as the cap.

Failures are figures, not exceptions: the group always finishes and prints.
`SIMAGENT_BENCH_GATE_SCALE` (a float, default 1) scales the counts for a quick run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.core.store import Store
from at_commands import profiles
from benchmarks._daemon_rig import FOREIGN_ICCID, HOME_ICCID, IMEI, Rig

_SCALE = float(os.environ.get("SIMAGENT_BENCH_GATE_SCALE", "1"))
SWAPS = max(3, round(30 * _SCALE))
HANG_TRIALS = max(1, round(3 * _SCALE))
REPLUGS = max(3, round(20 * _SCALE))
EXPORT_ENTRIES = 10_000
HANG_CAP_S = 40.0
REPLUG_CAP_S = 5.0
REPLUG_REGISTER_DELAY = 1.0
ROUND_CAP_S = 15.0  # any other wait in a round
DECISIONS = ("binding_violation", "binding_checked", "bound", "radio_blocked", "radio_restored")
REMOVED = profiles.QUECTEL.sim_removed_sample
_OK = re.compile(rb'"ok"\s*:\s*true')
SCAN_S = 3.0  # how long the fake's AT+COPS=? takes, where it can (`set scan_seconds`)


def _norm(line: str) -> str:
    return re.sub(r"\s+", "", line).upper()


def _is_cfun4(entry: dict) -> bool:
    return entry["dir"] == "in" and _norm(entry["line"]) == "AT+CFUN=4"


class _Transcript:
    """The fake's JSON-lines transcript, read incrementally."""

    def __init__(self, path: str) -> None:
        self._file = open(path, encoding="utf-8")
        self.entries: list[dict] = []
        self._partial = ""

    def refresh(self) -> list[dict]:
        data = self._partial + self._file.read()
        lines = data.split("\n")
        self._partial = lines.pop()
        self.entries += [json.loads(line) for line in lines if line.strip()]
        return self.entries

    def wait(self, predicate, start: int, timeout: float) -> dict | None:
        """The first entry from index `start` on that satisfies `predicate`, or None."""
        deadline = time.monotonic() + timeout
        index = start
        while True:
            entries = self.refresh()
            for entry in entries[index:]:
                if predicate(entry):
                    return entry
            index = len(entries)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)

    def close(self) -> None:
        self._file.close()


def _control_call(path: Path, op: str, timeout: float = 120.0, **args: Any) -> dict:
    """The reply's "ok" and, for a small reply, the rest; a bundle of megabytes is not
    parsed (that would load the machine the latencies are measured on)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(json.dumps({"id": 1, "name": op, "args": args}).encode() + b"\n")
        chunks = []
        while not chunks or not chunks[-1].endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    if not data:
        return {"ok": False, "error": {"code": "closed"}}
    if len(data) < 1 << 16:
        return json.loads(data)
    return {"ok": bool(_OK.search(data[:256]) or _OK.search(data[-256:]))}


def _evidence(state_dir: Path, after_seq: int = 0) -> list[dict]:
    db = state_dir / "state.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        rows = conn.execute("SELECT entry FROM evidence WHERE seq > ? ORDER BY seq", (after_seq,)).fetchall()
    return [json.loads(row[0]) for row in rows]


def _last_seq(state_dir: Path) -> int:
    entries = _evidence(state_dir)
    return entries[-1]["seq"] if entries else 0


def _wait_cfun(rig: Rig, cfun: int, timeout: float = ROUND_CAP_S) -> bool:
    deadline = time.monotonic() + timeout
    while rig.modem.state()["cfun"] != cfun:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _p99_ms(values: list[float]) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0] * 1000, 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[98] * 1000, 1)


def _foreign_attaches(rig: Rig) -> int:
    return sum(1 for a in rig.modem.state()["attaches"] if a["iccid"] == FOREIGN_ICCID)


# -- swap under load -----------------------------------------------------------------------------
class _Load:
    """Threads that keep the control socket busy the way technicians and scripts would."""

    CALLS = {
        "status": ("status", {}),
        "at_csq": ("at", {"command": "AT+CSQ"}),
        "at_scan": ("at", {"command": "AT+COPS=?", "unsafe": True}),  # root's scan: aborted for the gate
        "export": ("export_evidence", {}),
    }

    def __init__(self, control_socket: Path) -> None:
        self.control_socket = control_socket
        self.stop = threading.Event()
        self.counts = dict.fromkeys(self.CALLS, 0)
        self.errors = dict.fromkeys(self.CALLS, 0)
        self.threads = [threading.Thread(target=self._loop, args=(name,), daemon=True) for name in self.CALLS]

    def _loop(self, name: str) -> None:
        op, args = self.CALLS[name]
        while not self.stop.is_set():
            try:
                reply = _control_call(self.control_socket, op, **args)
            except (OSError, ValueError):
                reply = {"ok": False}
            if reply.get("ok"):
                self.counts[name] += 1
            else:
                self.errors[name] += 1
                self.stop.wait(0.05)  # a refusal (e.g. a scan refused to...) is not a busy loop

    def __enter__(self) -> "_Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(130)


def _swap_under_load(rig: Rig, transcript: _Transcript) -> dict:
    latencies: list[float] = []
    missed = 0
    try:  # a scan that takes seconds, as on a real module (a fake feature issue 9 asks for)
        rig.modem.set(scan_seconds=SCAN_S)
        scan_s: float | None = SCAN_S
    except ValueError:  # an older fake answers AT+COPS=? at once
        scan_s = None
    with _Load(rig.control_socket) as load:
        deadline = time.monotonic() + 60
        while load.counts["export"] == 0 and time.monotonic() < deadline:  # the load is on
            time.sleep(0.05)
        for _ in range(SWAPS):
            start = len(transcript.refresh())
            rig.modem.sim_insert(FOREIGN_ICCID)
            trigger = transcript.wait(lambda e: e["dir"] == "out" and e["line"] == REMOVED, start, 5.0)
            off = transcript.wait(_is_cfun4, start, ROUND_CAP_S)
            if trigger is None or off is None:
                missed += 1
            else:
                latencies.append(off["t"] - trigger["t"])
            rig.modem.sim_insert(HOME_ICCID)
            _wait_cfun(rig, 1)
    return {
        "swap_to_radio_off_under_load_p99_ms": _p99_ms(latencies),
        "swap_to_radio_off_under_load_median_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "swap_to_radio_off_under_load_max_ms": round(max(latencies) * 1000, 1) if latencies else None,
        "swap_to_radio_off_under_load_count": len(latencies),
        "swap_to_radio_off_under_load_missed": missed,
        "swap_under_load_scan_s": scan_s,
        "swap_under_load_calls": dict(load.counts),
        "swap_under_load_call_errors": dict(load.errors),
    }


# -- hang recovery -------------------------------------------------------------------------------
def _hang_recovery(rig: Rig, transcript: _Transcript, state_dir: Path) -> dict:
    recoveries: list[float] = []
    failures = 0
    for _ in range(HANG_TRIALS):
        rig.modem.fault("hang")
        start = len(transcript.refresh())
        rig.modem.sim_insert(FOREIGN_ICCID)
        # The agent noticed: it sent something into the hung modem. Give it time to wait.
        transcript.wait(lambda e: e["dir"] == "in" and e["line"].strip(), start, 5.0)
        time.sleep(1.0)
        after = _last_seq(state_dir)
        rig.modem.fault("clear")
        cleared = time.monotonic()
        recovered = None
        while time.monotonic() < cleared + HANG_CAP_S:
            if any(e["type"] in DECISIONS for e in _evidence(state_dir, after)):
                recovered = time.monotonic() - cleared
                break
            time.sleep(0.02)
        if recovered is None:
            failures += 1
            recovered = HANG_CAP_S
        recoveries.append(recovered)
        rig.modem.sim_insert(HOME_ICCID)
        _wait_cfun(rig, 1, HANG_CAP_S)
    return {
        "hang_recovery_s": round(statistics.median(recoveries), 2),
        "hang_recovery_max_s": round(max(recoveries), 2),
        "hang_recovery_trials": len(recoveries),
        "hang_recovery_failures": failures,
    }


# -- replug ----------------------------------------------------------------------------------------
def _replug(rig: Rig, transcript: _Transcript, state_dir: Path) -> dict:
    rig.modem.sim_insert(FOREIGN_ICCID)
    _wait_cfun(rig, 4)
    rig.modem.set(register_delay=REPLUG_REGISTER_DELAY)
    attaches_before = _foreign_attaches(rig)
    latencies: list[float] = []
    missed = 0
    for _ in range(REPLUGS):
        after = _last_seq(state_dir)
        rig.modem.unplug()
        deadline = time.monotonic() + ROUND_CAP_S  # the agent saw the port go (or gave up looking)
        while time.monotonic() < deadline and not any(e["type"] == "modem_lost" for e in _evidence(state_dir, after)):
            time.sleep(0.02)
        start = len(transcript.refresh())
        rig.modem.replug()
        plugged = transcript.wait(lambda e: e["dir"] == "ctl" and e["line"].startswith("plugged"), start, 5.0)
        off = transcript.wait(_is_cfun4, start, REPLUG_CAP_S)
        if plugged is None or off is None:
            missed += 1
            latencies.append(REPLUG_CAP_S)
            _wait_cfun(rig, 4)
        else:
            latencies.append(off["t"] - plugged["t"])
    time.sleep(REPLUG_REGISTER_DELAY + 0.3)  # an attach still due after the last replug
    return {
        "replug_to_radio_off_p99_ms": _p99_ms(latencies),
        "replug_to_radio_off_median_ms": round(statistics.median(latencies) * 1000, 1),
        "replug_count": len(latencies),
        "replug_missed": missed,
        "replug_foreign_attached": _foreign_attaches(rig) - attaches_before,
        "replug_register_delay_s": REPLUG_REGISTER_DELAY,
    }


def _prefill(state_dir: Path) -> None:
    store = Store.open(state_dir)
    sample = {"status": "ok", "sim_state": "ready", "imei": IMEI, "iccid": HOME_ICCID}
    with store.transaction() as tx:
        for n in range(EXPORT_ENTRIES):
            tx.record("binding_checked", {**sample, "n": n}, event=False)
    store.close()


def run() -> dict:
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sa-bench-gate-", dir="/tmp") as name, Rig(Path(name)) as rig:
        state_dir = Path(name) / "state"
        _prefill(state_dir)
        rig.modem.set(register_delay=3600)  # no registration noise: the figures are the agent's reaction
        agent = rig.start_agent()
        transcript = _Transcript(rig.modem.transcript_path)
        try:
            _wait_cfun(rig, 1)
            for part in (lambda: _swap_under_load(rig, transcript), lambda: _hang_recovery(rig, transcript, state_dir),
                         lambda: _replug(rig, transcript, state_dir)):
                try:
                    figures.update(part())
                except Exception as exc:  # a figure that could not be made is reported, not raised
                    figures.setdefault("gate_errors", []).append(f"{type(exc).__name__}: {exc}")
            figures["gate_agent_alive"] = agent.running
        finally:
            transcript.close()
            if agent.running:
                agent.stop()
            agent.close()
    return figures
