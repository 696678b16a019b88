"""Issue 9's five reproductions of a broken radio gate, end to end: the real `simagent
run`, the real `simagent-fakemodem` (quectel, hot-swap URCs) and mosquitto.

Each test inserts a foreign card while the rig is in the state the issue describes and
asserts, from the fake modem's transcript and state, that `AT+CFUN=4` reached the wire
within the issue's bound and that the foreign ICCID never appears in `attaches`. The fake
registers `ATTACH_S` after any moment its radio is on with a usable card, so a gate that
comes late lets the card attach.

Fake-modem features assumed here that issue 9 asks for (item 2): `set scan_seconds=N`
(`AT+COPS=?` takes N seconds and any byte from the host aborts it). Where the fake lacks
it the variant fails at `set`; the `fault delay` variants reproduce the issue with what
exists today.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import pytest

from agent.core.store import Store

from .conftest import FOREIGN_ICCID, HOME_ICCID, IMEI, TIMEOUT, wait_event
from ..conftest import wait_until
from .gate_rig import (ForkedCall, cfun4_after, control_call_bytes, evidence_entries, find_dicts, foreign_attaches, norm,
                       sent_lines, share_control_socket, transcript)

P = f"simagent/{IMEI}"
# Seconds from radio on (with a usable card) to registered: a gate that is later attaches.
ATTACH_S = 1.0
# A scan (or a command the fake holds) that outlasts every bound below by far.
SCAN_S = 15.0


class Gate:
    """A running daemon with the home card bound and its radio on; from now on the fake
    registers `ATTACH_S` after any radio-on moment."""

    def __init__(self, modem, agent, platform) -> None:
        self.modem, self.agent, self.platform = modem, agent, platform

    def swap_in_foreign(self) -> tuple[int, float]:
        """(transcript mark, monotonic time) of a foreign card pushed into the tray
        (`ctl sim-insert`: the removal and insertion URCs go out at once)."""
        mark = len(transcript(self.modem))
        self.modem.sim_insert(FOREIGN_ICCID)
        return mark, time.monotonic()

    def outcome(self, mark: int, inserted: float, *, wait: float, settle: bool = True) -> tuple[float | None, dict]:
        """Waits up to `wait` s for `AT+CFUN=4` after the swap at `mark`; with `settle`,
        then until a card the radio was switched on for would have registered (`ATTACH_S`
        after the radio went off, or after the wait). Without it, at least until the
        foreign card would have registered had the gate missed it. Returns (latency in s
        or None, the fake's state then)."""
        deadline = inserted + max(wait, ATTACH_S + 0.5)
        while True:
            t0, off = cfun4_after(transcript(self.modem), mark)
            if off is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if settle:
            until = (off if off is not None else time.monotonic()) + ATTACH_S + 0.5
            while time.monotonic() < until:
                time.sleep(0.05)
        return (None if off is None else off - t0), self.modem.state()

    def assert_gated(self, mark: int, inserted: float, *, within: float, wait: float | None = None, what: str = "") -> float:
        latency, state = self.outcome(mark, inserted, wait=max(2 * within, within + 1.0) if wait is None else wait)
        attached = [a for a in state["attaches"] if a["iccid"] == FOREIGN_ICCID]
        came = "never" if latency is None else f"after {latency * 1000:.0f} ms"
        summary = (f"{what}: AT+CFUN=4 came {came} (limit {within * 1000:.0f} ms); "
                   f"foreign card attached: {bool(attached)}; fake cfun now {state['cfun']}")
        assert latency is not None and latency <= within and not attached and state["cfun"] == 4, summary
        return latency


@pytest.fixture
def gate(fake_modem_process, agent_process, subscriber, mosquitto) -> Gate:
    modem = fake_modem_process(profile="quectel", imei=IMEI, iccid=HOME_ICCID, register_delay=0.2)
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(modem, mosquitto)
    wait_event(platform, "radio_restored")
    platform.wait_for(lambda sub: any(d["online"] for d in sub.documents(f"{P}/status")), what="online")
    wait_until(lambda: modem.state()["attached"], TIMEOUT, what="the home card attached")
    modem.set(register_delay=ATTACH_S)
    return Gate(modem, agent, platform)


# -- 1. the AT session wedges ---------------------------------------------------------------------
# The daemon gives a control op 30 s; the old code wedged when that deadline cancelled the
# status read in the middle of a command. Long enough for that, bounded all the same.
WEDGE_STATUS_S = 40.0
HANG_RECOVERY_S = 5.0


def test_1_hang_and_status_then_clear_the_next_foreign_card_is_gated(gate):
    modem, agent = gate.modem, gate.agent
    modem.fault("hang")
    started = time.monotonic()
    try:
        agent.cli("status", "--json", timeout=WEDGE_STATUS_S)  # may fail or time out: the modem is hung
    except subprocess.TimeoutExpired:
        pass
    status_s = time.monotonic() - started
    cleared = len(transcript(modem))
    modem.fault("clear")
    # Time to recover, as long as SPEC's hang_recovery target: until the agent talks to the
    # modem again (the old code never does: its session is wedged), at most HANG_RECOVERY_S.
    deadline = time.monotonic() + HANG_RECOVERY_S
    while not sent_lines(transcript(modem), cleared) and time.monotonic() < deadline:
        time.sleep(0.05)
    # A recovery that reopened the session gates first (radio off, then on for the home
    # card): the swap comes once the radio is on again, or the gate's CFUN=4 for the foreign
    # card would have been sent before the swap (seen on a loaded machine).
    while modem.state()["cfun"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)

    mark, inserted = gate.swap_in_foreign()
    gate.assert_gated(mark, inserted, within=5.0, wait=6.0,
                      what=f"foreign SIM after hang + status ({status_s:.1f} s) + clear")
    later = agent.cli("status", "--json", timeout=30)
    assert later.returncode == 0, f"status after the hang cleared: exit {later.returncode}: {later.stderr.strip()}"
    doc = json.loads(later.stdout)
    assert doc["sim"]["iccid"] == FOREIGN_ICCID and doc["radio"]["cfun"] == 4, doc


# -- 2. a read-only caller starves the gate ---------------------------------------------------------
def arm_slow_scan(modem, how: str) -> None:
    if how == "scan_seconds":
        modem.set(scan_seconds=SCAN_S)  # the fake feature issue 9 item 2 asks for
    else:
        modem.fault("delay", seconds=SCAN_S)  # as the issue did: the next command's reply is held


def scan_on_the_wire(modem, mark: int) -> bool:
    return any(norm(e["line"]) == "AT+COPS=?" for e in sent_lines(transcript(modem), mark))


@pytest.mark.parametrize("how", ["scan_seconds", "fault_delay"])
def test_2a_a_group_members_scan_does_not_hold_off_the_gate(gate, how):
    modem, agent = gate.modem, gate.agent
    share_control_socket(agent)
    arm_slow_scan(modem, how)
    mark = len(transcript(modem))
    scan = ForkedCall.as_nobody(agent.control_socket, "at", timeout=SCAN_S + 30, command="AT+COPS=?")
    try:
        # Either the scan runs (it is on the wire) or the daemon refused it to a non-root caller.
        wait_until(lambda: scan_on_the_wire(modem, mark) or scan.result(), 10, what="the scan on the wire or refused")
        refused = scan.result()
        if refused is not None:
            assert refused.get("ok") is False, f"the scan answered at once, nothing to starve the gate: {refused}"
            modem.fault("clear")  # an armed delay would otherwise hit the gate's own command
        mark, inserted = gate.swap_in_foreign()
        gate.assert_gated(mark, inserted, within=1.0, what=f"foreign SIM during a group member's AT+COPS=? ({how})")
    finally:
        scan.kill()
        modem.fault("clear")


@pytest.mark.parametrize("how", ["scan_seconds", "fault_delay"])
def test_2b_a_platform_scan_without_token_does_not_hold_off_the_gate(gate, how):
    modem, platform = gate.modem, gate.platform
    arm_slow_scan(modem, how)
    mark = len(transcript(modem))
    platform.publish(f"{P}/cmd", json.dumps({"id": "scan-1", "name": "at", "args": {"command": "AT+COPS=?"}}))

    def reply(sub):
        return next((r for r in sub.documents(f"{P}/cmd/result") if r["id"] == "scan-1"), None)

    try:
        wait_until(lambda: scan_on_the_wire(modem, mark) or reply(platform), 10, what="the scan on the wire or refused")
        answered = reply(platform)
        if answered is not None:
            assert answered["ok"] is False, f"the scan answered at once, nothing to starve the gate: {answered}"
            modem.fault("clear")
        mark, inserted = gate.swap_in_foreign()
        gate.assert_gated(mark, inserted, within=1.0, what=f"foreign SIM during a platform AT+COPS=? ({how})")
    finally:
        modem.fault("clear")


# -- 3. work on the event loop delays the gate ---------------------------------------------------------
EVIDENCE_ENTRIES = 10_000
EXPORTERS = 8
# SPEC's target is 50 ms p99; this bound leaves room for a loaded 2-core CI machine and
# still catches exports on the loop: there a swap waits for the export in progress (up to
# about 0.5-1.2 s here; the issue measured 2.05 s). On the old code four swaps in five came
# later than this, so six in a row under it do not happen by chance.
EXPORT_LOAD_BOUND_S = 0.2
SWAPS_UNDER_EXPORTS = 6


def test_3_parallel_evidence_exports_do_not_delay_the_gate(fake_modem_process, agent_process, subscriber, mosquitto):
    modem = fake_modem_process(profile="quectel", imei=IMEI, iccid=HOME_ICCID, register_delay=0.2)
    agent = agent_process(modem, mosquitto, start=False)
    store = Store.open(agent.state_dir)
    sample = {"status": "ok", "sim_state": "ready", "imei": IMEI, "iccid": HOME_ICCID}
    with store.transaction() as tx:  # one commit: ten thousand fsyncs would take minutes
        for n in range(EVIDENCE_ENTRIES):
            tx.record("binding_checked", {**sample, "n": n}, event=False)
    store.close()
    platform = subscriber(mosquitto, "simagent/#")
    agent.start()
    wait_event(platform, "radio_restored")
    wait_until(lambda: modem.state()["attached"], TIMEOUT, what="the home card attached")
    modem.set(register_delay=ATTACH_S)
    gate = Gate(modem, agent, platform)

    stop = threading.Event()
    done: list[int] = []
    failures: list[str] = []

    def export_forever() -> None:
        while not stop.is_set():
            try:
                data = control_call_bytes(agent.control_socket, "export_evidence", timeout=120)
            except OSError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            if len(data) < 1 << 20 or not done:  # an error, or the first bundle: read it
                reply = json.loads(data) if data else {"ok": False, "error": "connection closed"}
                if not reply.get("ok"):
                    failures.append(str(reply.get("error")))
                    return
                done.append(len(reply["result"]["entries"]))
            else:
                done.append(done[0])

    exporters = [threading.Thread(target=export_forever, daemon=True) for _ in range(EXPORTERS)]
    for thread in exporters:
        thread.start()
    try:
        wait_until(lambda: done or failures, 60, what="the first evidence export")
        assert not failures, failures
        assert done[0] >= EVIDENCE_ENTRIES
        results = []
        for _ in range(SWAPS_UNDER_EXPORTS):  # the swap lands at another phase of the exports each time
            attached_before = len(foreign_attaches(modem, FOREIGN_ICCID))
            mark, inserted = gate.swap_in_foreign()
            latency, state = gate.outcome(mark, inserted, wait=5.0, settle=False)
            attached = len([a for a in state["attaches"] if a["iccid"] == FOREIGN_ICCID]) > attached_before
            results.append((latency, attached, state["cfun"]))
            modem.sim_insert(HOME_ICCID)
            wait_until(lambda: modem.state()["cfun"] == 1, TIMEOUT, what="the home card's radio back on")
    finally:
        stop.set()
        for thread in exporters:
            thread.join(120)
    assert not failures, failures
    time.sleep(ATTACH_S + 0.5)  # the home card's radio is on again: nothing foreign may attach late
    attached = foreign_attaches(modem, FOREIGN_ICCID)
    shown = [("never" if lat is None else f"{lat * 1000:.0f} ms", f"attached={att}", f"cfun={cfun}")
             for lat, att, cfun in results]
    assert not attached and all(lat is not None and lat <= EXPORT_LOAD_BOUND_S and not att and cfun == 4
                                for lat, att, cfun in results), (
        f"foreign SIM swaps while {EXPORTERS} exports of {done[0]} entries run: swap -> AT+CFUN=4 "
        f"(limit {EXPORT_LOAD_BOUND_S * 1000:.0f} ms): {shown}; foreign attaches: {len(attached)}")


# -- 4. root bypasses the gate -------------------------------------------------------------------------
BRINGS_THE_CARD_ONLINE = ["AT+CFUN=1", "AT+CGATT=1", "AT+COPS=0", "AT+CFUN=1,1"]


def test_4a_root_cannot_switch_a_held_off_card_on(gate):
    modem, agent = gate.modem, gate.agent
    mark, inserted = gate.swap_in_foreign()
    gate.assert_gated(mark, inserted, within=1.0, what="foreign SIM (before the bypass attempts)")
    for command in BRINGS_THE_CARD_ONLINE:
        mark = len(transcript(modem))
        sent = time.monotonic()
        answer = agent.cli("at", "--unsafe", command, timeout=60)
        while time.monotonic() < sent + ATTACH_S + 0.5:  # long enough for the card to register
            time.sleep(0.05)
        state = modem.state()
        attached = foreign_attaches(modem, FOREIGN_ICCID)
        on_wire = [e["line"] for e in sent_lines(transcript(modem), mark) if norm(e["line"]) == norm(command)]
        said = (answer.stdout + answer.stderr).strip()
        assert answer.returncode != 0 and not attached and not on_wire and state["cfun"] == 4, (
            f"`simagent at --unsafe {command}` as root with the foreign card held off: exit {answer.returncode} "
            f"({said!r}); sent to the modem: {bool(on_wire)}; foreign card attached: {bool(attached)}; cfun {state['cfun']}")
        assert re.search(r"gate|binding", said, re.I) and re.search(r"rebind|bind reset", said), (
            f"the refusal of {command} names neither the binding gate nor how to lift it: {said!r}")


def test_4b_an_accepted_unsafe_write_is_evidence_and_status_shows_the_real_radio(gate):
    modem, agent = gate.modem, gate.agent
    for command in ("AT+CREG=2", "AT+CFUN=4"):  # neither brings a card onto the network
        before = len(evidence_entries(agent.state_dir))
        answer = agent.cli("at", "--unsafe", command, timeout=60)
        assert answer.returncode == 0, f"{command} refused: {answer.stderr.strip()}"

        def naming() -> list[dict]:  # "+CREG=2" with or without its "AT"; uid 0: root sent it
            fresh = evidence_entries(agent.state_dir)[before:]
            return [e for e in fresh if norm(command)[2:] in norm(json.dumps(e))
                    and find_dicts(e, lambda d: d.get("uid") == 0)]

        deadline = time.monotonic() + 2.0
        while not naming():
            assert time.monotonic() < deadline, (
                f"no evidence entry names uid 0 and {command} after root sent it with --unsafe; new entries: "
                f"{[e.get('type') for e in evidence_entries(agent.state_dir)[before:]]}")
            time.sleep(0.05)

    # The module's radio is what the daemon reports, whatever the gate does next.
    seen: list[tuple] = []

    def agrees() -> bool:
        module_before = modem.state()["cfun"]
        shown = json.loads(agent.cli("status", "--json", check=True, timeout=30).stdout)["radio"]["cfun"]
        module_after = modem.state()["cfun"]
        seen.append((shown, module_before, module_after))
        return module_before == module_after == shown

    deadline = time.monotonic() + 5.0
    while not agrees():
        assert time.monotonic() < deadline, (
            f"status shows a stale radio after AT+CFUN=4: (status cfun, module cfun before, after) {seen[-3:]}")
        time.sleep(0.3)


# -- 5. SIM busy is not retried -------------------------------------------------------------------------
# Every ICCID command the old code tries in turn (the vendor command, six fallbacks, +CRSM):
# a card that answers "SIM busy" while it initialises fails them all.
ICCID_READS = 8


def arm_busy_at(modem, lines: list[dict], target: str, count: int) -> None:
    """Arms `+CME ERROR: 14` for `count` commands starting at the first `target` in the
    command sequence `lines` (a dry run of the same steps): the commands before it pass
    (a zero-second delay fault answers normally)."""
    index = next((i for i, e in enumerate(lines) if norm(e["line"]) == target), None)
    assert index is not None, f"{target} never sent in the dry run: {[e['line'] for e in lines]}"
    if index:
        modem.fault("delay", seconds=0, count=index)
    modem.fault("busy", count=count)


def busy_hit(modem, mark: int) -> str | None:
    """The command the first SIM-busy answer from `mark` on went to."""
    last_command = None
    for entry in transcript(modem)[mark:]:
        if entry["dir"] == "in" and entry["line"].strip():
            last_command = norm(entry["line"])
        elif entry["dir"] == "out" and entry["line"] in ("+CME ERROR: 14", "+CME ERROR: SIM busy"):
            return last_command
    return None


def ready_without_iccid(document) -> list[dict]:
    return find_dicts(document, lambda d: "iccid" in d and d["iccid"] is None
                      and "ready" in (d.get("state"), d.get("sim_state")))


def test_5a_sim_busy_direct_status(fake_modem_process, agent_process, mosquitto):
    modem = fake_modem_process(profile="quectel", imei=IMEI, iccid=HOME_ICCID, register_delay=0.2)
    agent = agent_process(modem, mosquitto, start=False)  # never started: direct access to the port

    def direct_status(arm=None) -> tuple[dict, list[dict]]:
        mark = len(transcript(modem))
        if arm:
            arm()
        answer = agent.cli("status", "--json", "--port", modem.port, timeout=60)
        assert answer.returncode == 0, answer.stderr
        return json.loads(answer.stdout), sent_lines(transcript(modem), mark)

    clean, lines = direct_status()
    assert clean["sim"] == {"state": "ready", "iccid": HOME_ICCID, "imsi": modem.state()["imsi"]}

    mark = len(transcript(modem))
    busy_iccid, _ = direct_status(lambda: arm_busy_at(modem, lines, "AT+QCCID", ICCID_READS))
    assert busy_hit(modem, mark) == "AT+QCCID", "rig: SIM busy did not land on the ICCID read"
    assert modem.state()["faults"] == [], "the armed faults were not all used: the command sequence changed"
    assert busy_iccid["sim"]["iccid"] == HOME_ICCID, (
        f"SIM busy on the ICCID read: direct status shows {busy_iccid['sim']}")

    mark = len(transcript(modem))
    busy_imsi, _ = direct_status(lambda: arm_busy_at(modem, lines, "AT+CIMI", 2))
    assert busy_hit(modem, mark) == "AT+CIMI", "rig: SIM busy did not land on the IMSI read"
    assert busy_imsi["sim"]["imsi"] == modem.state()["imsi"], f"SIM busy on +CIMI: direct status shows {busy_imsi['sim']}"


def test_5b_sim_busy_daemon_status(fake_modem_process, agent_process, subscriber, mosquitto):
    modem = fake_modem_process(profile="quectel", imei=IMEI, iccid=HOME_ICCID, register_delay=0.2)
    agent = agent_process(modem, mosquitto, start=False)

    def start_and_stop() -> list[dict]:
        """The commands from the daemon's start to its first ICCID read."""
        mark = len(transcript(modem))
        if agent.exit_codes:
            agent.restart()
        else:
            agent.start().wait_ready()
        wait_until(lambda: any(norm(e["line"]) == "AT+QCCID" for e in sent_lines(transcript(modem), mark)), TIMEOUT,
                   what="the daemon's ICCID read")
        wait_until(lambda: modem.state()["cfun"] == 1, TIMEOUT, what="the bound card's radio on")
        assert agent.stop() == 0
        return sent_lines(transcript(modem), mark)

    start_and_stop()  # the first start binds the card
    lines = start_and_stop()  # a dry run of a start with the card bound
    checked_before = len(evidence_entries(agent.state_dir))

    platform = subscriber(mosquitto, "simagent/#")
    mark = len(transcript(modem))
    arm_busy_at(modem, lines, "AT+QCCID", ICCID_READS)
    agent.restart()
    seen = []
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:  # what a technician would have read meanwhile
        answer = agent.cli("status", "--json", timeout=30)
        if answer.returncode == 0:
            seen.append(json.loads(answer.stdout)["sim"])
    assert busy_hit(modem, mark) == "AT+QCCID", "rig: SIM busy did not land on the ICCID read"
    assert modem.state()["faults"] == [], "the armed faults were not all used: the command sequence changed"
    published = [d["sim"] for d in platform.documents(f"{P}/state")]
    recorded = evidence_entries(agent.state_dir)[checked_before:]
    bad = {"status": ready_without_iccid(seen), "P/state": ready_without_iccid(published),
           "evidence": ready_without_iccid(recorded)}
    assert not any(bad.values()), f"SIM busy on the ICCID read at start: sim ready without an ICCID in {bad}"
    assert seen and seen[-1]["iccid"] == HOME_ICCID, seen[-3:]
