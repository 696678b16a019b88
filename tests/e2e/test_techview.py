"""Issue 13: what the technician sees through the daemon is true and fresh. A modem that
hangs is blamed on the modem within a bounded time, a modem that is gone is the first line
of `status` and a FAIL in `diag`; every section of `status --json` says where it came from,
and through the daemon `status --json` is the retained state document. The real `simagent
run`, the fake modem process on a pty, and mosquitto where the platform's view is compared."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import tarfile
import time

from .conftest import FOREIGN_ICCID, HOME_ICCID, IMEI, swap_to, wait_modem

COMMAND_TIMEOUT = 2.0  # base_sections' [modem] command_timeout


def checks(agent) -> tuple[int, dict[str, tuple[str, str]]]:
    done = agent.cli("diag", "--json")
    report = json.loads(done.stdout)
    return done.returncode, {c["name"]: (c["result"], c["hint"]) for c in report["checks"]}


def test_a_hung_then_missing_modem_is_said_first_and_fails_diag(fake_modem_process, agent_process):
    modem = fake_modem_process(profile="quectel", imei=IMEI, iccid=HOME_ICCID, register_delay=0.0)
    agent = agent_process(modem, None)
    agent.wait_ready()
    wait_modem(modem, lambda s: s["cfun"] == 1, "the radio on for the home card")

    healthy = json.loads(agent.cli("status", "--json", check=True).stdout)
    assert healthy["modem_link"] == {"state": "answering", "port": modem.port, "detail": None}
    assert healthy["freshness"]["network"]["from"] == "modem"  # read for this answer
    assert healthy["freshness"]["sim"]["from"] == "daemon" and healthy["freshness"]["sim"]["age_s"] >= 0
    assert healthy["freshness"]["sim"]["read_at"].endswith("Z")

    modem.fault("hang")
    started = time.monotonic()
    hung = agent.cli("status")
    took = time.monotonic() - started
    first = hung.stdout.splitlines()[0]
    assert hung.returncode == 69, hung.stdout + hung.stderr
    assert first.startswith(f"MODEM NOT ANSWERING on {modem.port}") and "power-cycle" in first, first
    assert "daemon did not answer" not in hung.stdout + hung.stderr
    assert took < COMMAND_TIMEOUT + 5, f"status took {took:.1f} s with a hung modem"
    code, diag = checks(agent)
    assert code == 1 and diag["at_answers"][0] == "FAIL" and "hangs" in diag["at_answers"][1], diag

    modem.fault("clear")
    modem.unplug()
    gone = agent.cli("status")
    assert gone.returncode == 69
    lines = gone.stdout.splitlines()
    assert lines[0].startswith(f"MODEM MISSING ({modem.port}") and "USB cable" in lines[0], lines[0]
    # Every section, the network too (read by the healthy `status` above), is marked as the last read.
    sources = [line for line in lines if line.startswith("  source ")]
    assert len(sources) == 5 and all("the daemon's last read" in line for line in sources), lines
    as_json = json.loads(agent.cli("status", "--json").stdout)
    assert as_json["modem_link"]["state"] == "missing" and as_json["modem_present"] is False
    assert {s["from"] for s in as_json["freshness"].values()} <= {"daemon", "unknown"}
    code, diag = checks(agent)
    assert code == 1 and diag["modem_found"][0] == "FAIL" and "check the port name" in diag["modem_found"][1], diag


def test_a_session_that_has_not_read_yet_keeps_the_last_facts_with_their_age(fake_modem_process, agent_process):
    """A hung module ends the session; the next one cannot read: status shows the last
    answered facts as the daemon's last read, not a blank modem as if just read."""
    modem = fake_modem_process(profile="quectel", imei=IMEI, iccid=HOME_ICCID, register_delay=0.0)
    agent = agent_process(modem, None)
    agent.wait_ready()
    wait_modem(modem, lambda s: s["cfun"] == 1, "the radio on for the home card")
    modem.fault("hang")
    deadline = time.monotonic() + 40
    while "modem on " not in agent.log and time.monotonic() < deadline:  # "modem on PORT lost: ..."
        agent.cli("status")  # the live reads time out until the client gives the session up
    assert "modem on " in agent.log, agent.log
    time.sleep(1.0)  # the next session is open, unanswered
    doc = json.loads(agent.cli("status", "--json").stdout)
    assert doc["modem_link"]["state"] in ("not_answering", "missing"), doc["modem_link"]
    assert doc["sim"]["iccid"] == HOME_ICCID and doc["modem"]["imei"] == IMEI, doc
    assert doc["modem"]["profile"] == "quectel"
    sim = doc["freshness"]["sim"]
    assert sim["from"] == "daemon" and sim["age_s"] >= 1.0, sim


def test_the_support_bundle_carries_the_daemons_recent_at_transcript_redacted(fake_modem_process, agent_process,
                                                                                tmp_path):
    modem = fake_modem_process(profile="quectel", imei=IMEI, iccid=HOME_ICCID, register_delay=0.0)
    agent = agent_process(modem, None)
    agent.wait_ready()
    agent.cli("at", "AT+CSQ", check=True)
    agent.cli("at", "--unsafe", 'AT+CPIN="4321"')  # refused or not: the PIN must not leave the box
    bundle = tmp_path / "support.tar.gz"
    done = agent.cli("diag", "--bundle", str(bundle))
    assert done.returncode in (0, 1), done.stderr
    with tarfile.open(bundle) as tar:
        transcript = tar.extractfile("simagent-support/at-transcript.txt").read().decode()
    lines = transcript.splitlines()
    assert any(line.endswith("> AT+CSQ") for line in lines), transcript
    assert any(" < +CSQ: " in line for line in lines) and any(line.endswith("< OK") for line in lines), transcript
    assert any("AT+CPIN=[redacted]" in line for line in lines), transcript
    assert "4321" not in transcript


def test_journald_gets_one_line_with_fields_per_sim_event_decision_and_gate_action(
        fake_modem_process, agent_process, tmp_path):
    """A stand-in for journald's native socket (`$SIMAGENT_JOURNAL_SOCKET`, JOURNAL_STREAM set as systemd
    does): what `journalctl -u simagent -o verbose` would show."""
    path = f"/tmp/sa-journal-{os.getpid()}.sock"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(path)
    journal.settimeout(0.2)
    try:
        modem = fake_modem_process(profile="quectel", imei=IMEI, iccid=HOME_ICCID, register_delay=0.0)
        agent = agent_process(modem, None, env={"JOURNAL_STREAM": "8:1234", "SIMAGENT_JOURNAL_SOCKET": path},
                              binding={"mode": "first-use"})
        agent.wait_ready()
        swap_to(modem, FOREIGN_ICCID)
        wait_modem(modem, lambda s: s["cfun"] == 4, "the radio held off for the foreign card")
        entries = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not {"sim_removed", "sim_inserted", "radio_blocked"} <= {
                e.get("SIMAGENT_EVENT") for e in entries}:
            with contextlib.suppress(TimeoutError):
                entries.append(dict(line.split("=", 1) for line in journal.recv(65536).decode().splitlines()))
        assert agent.stop() == 0
    finally:
        journal.close()
        os.unlink(path)
    by_event = {}
    for entry in entries:
        by_event.setdefault(entry.get("SIMAGENT_EVENT"), []).append(entry)
    assert len(by_event.get("sim_removed", [])) == 1 and len(by_event.get("sim_inserted", [])) == 1, entries
    assert by_event["radio_blocked"][-1]["MESSAGE"].startswith("radio_blocked: reason=sim_removed"), entries
    for event in ("sim_removed", "sim_inserted", "radio_blocked"):
        entry = by_event[event][0]
        assert entry["PRIORITY"] == "6" and entry["MESSAGE"].startswith(event) and len(entry["MESSAGE_ID"]) == 32
    assert by_event["sim_inserted"][0]["ICCID"] == FOREIGN_ICCID
    assert len({by_event[e][0]["MESSAGE_ID"] for e in ("sim_removed", "sim_inserted", "radio_blocked")}) == 3
    assert any(e.get("SIMAGENT_EVENT") == "bound" and e.get("ICCID") == HOME_ICCID for e in entries), entries


# Keys that say when or through what a document was made, not what the terminal is: the
# publication time (`ts`), the ages in `freshness`, and the local view `status` adds (the
# live probe `modem_link`, the broker link `mqtt`, the queue `outbox`).
NOT_THE_TERMINAL = ("ts", "freshness", "modem_link", "mqtt", "outbox")


def test_status_json_is_the_retained_state_document(home_modem, agent_process, subscriber, mosquitto,
                                                    validate_message):
    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)
    agent.wait_ready()
    wait_modem(home_modem, lambda s: s["cfun"] == 1, "the radio on for the home card")
    # The fake registers register_delay after CFUN=1: read until the network says so.
    deadline = time.monotonic() + 15
    while True:
        status = json.loads(agent.cli("status", "--json", check=True).stdout)
        if status["network"]["registration"] in ("home", "roaming") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    validate_message(status, "state")

    def retained_like_status(sub):
        states = sub.documents("/state")
        return states and states[-1]["network"] == status["network"] and states[-1]

    state = platform.wait_for(retained_like_status, what="a state document with the network status read")
    assert {k: v for k, v in status.items() if k not in NOT_THE_TERMINAL} == \
        {k: v for k, v in state.items() if k not in NOT_THE_TERMINAL}
    assert state["schema"] == status["schema"] == "simagent/state/1"
    assert state["modem"]["profile"] == "quectel" and state["modem"]["port"] == home_modem.port
    assert state["network"]["registration"] in ("home", "roaming"), state["network"]
    assert set(state["freshness"]) == set(status["freshness"])
    assert status["mqtt"]["connected"] is True and "ts" not in status


def test_status_through_the_daemon_reads_the_network_only_and_records_nothing(home_modem, agent_process, subscriber,
                                                                              mosquitto):
    """Read-only means read-only. The daemon's status read sent AT+CPIN? (and the ICCID and
    IMSI reads): "+CPIN: READY" is shaped like a SIM-insertion report, so the gate checked
    again, committed a binding_checked entry and rewrote last_decision (the first status
    after a bind). The card is what the gate knows; only the network is read live."""
    from .gate_rig import evidence_entries, norm, sent_lines, transcript

    platform = subscriber(mosquitto, "simagent/#")
    agent = agent_process(home_modem, mosquitto)
    platform.wait_for(lambda sub: any(e["type"] == "radio_restored" for e in sub.documents("/events")), what="radio on")

    settled = (len(evidence_entries(agent.state_dir)), last_decision(agent.state_dir))
    mark = len(transcript(home_modem))
    status = agent.cli("status", "--json", check=True)
    assert json.loads(status.stdout)["sim"]["iccid"] == HOME_ICCID
    time.sleep(1.0)  # what a re-check would have done by now
    assert (len(evidence_entries(agent.state_dir)), last_decision(agent.state_dir)) == settled
    sent = [norm(e["line"]) for e in sent_lines(transcript(home_modem), mark)]
    assert sent and not [line for line in sent if line.startswith(("AT+CPIN", "AT+QCCID", "AT+CCID", "AT+ICCID", "AT+CIMI",
                                                                    "AT+CRSM"))], sent


def last_decision(state_dir) -> tuple | None:
    with contextlib.closing(sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True, timeout=10)) as conn:
        return conn.execute("SELECT value FROM meta WHERE key='last_decision'").fetchone()
