"""`simagent-fakemodem --replay`: a recorded AT transcript served as a module
(`simagent_lab.replay.ReplayState`), in-process on a pty, through the pytest plugin and as
the real process with its control socket."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from at_commands import transcript
from simagent_lab.replay import ReplayState

HEADER = {"schema": "simagent/at-transcript/1", "recorded_at": "2026-11-29T10:00:00.000Z", "port": "/dev/ttyUSB2",
          "tool": "simagent at", "redacted": True}
RECORDS = [
    {"t": 0.01, "cmd": "AT", "lines": [], "final": "OK"},
    {"t": 0.02, "cmd": "AT+QCCID", "lines": ["+QCCID: 89860012345678901230"], "final": "OK"},
    {"t": 0.50, "urc": "+QSIMSTAT: 1,0"},
    {"t": 0.60, "cmd": "AT+QCCID", "lines": [], "final": "+CME ERROR: 10"},
    {"t": 0.70, "urc": "+QSIMSTAT: 1,1"},
    {"t": 0.80, "cmd": "AT+QCCID", "lines": ["+QCCID: 89860099999999999990"], "final": "OK"},
    {"t": 0.90, "cmd": "AT+CPIN=[redacted]", "lines": [], "final": "OK"},
    {"t": 1.00, "cmd": "AT+COPS=?", "lines": [], "final": None},
    {"t": 1.10, "cmd": "ATE0", "lines": [], "final": "OK"},
]


def write(path: Path, records: list[dict] = RECORDS, header: dict = HEADER) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in (header, *records)))
    return path


def state(records: list[dict] = RECORDS) -> ReplayState:
    return ReplayState(transcript.parse("".join(json.dumps(x) + "\n" for x in (HEADER, *records))))


def said(out: list[bytes]) -> list[str]:
    return [line for line in b"".join(out).decode().replace("\r", "\n").split("\n") if line]


def test_each_command_gets_its_answers_in_recorded_order_then_the_last_again():
    s = state()
    assert said(s.handle_line("AT+QCCID")) == ["AT+QCCID", "+QCCID: 89860012345678901230", "OK"]
    assert said(s.handle_line("at+qccid")) == ["at+qccid", "+CME ERROR: 10"]
    assert said(s.handle_line("AT + QCCID")) == ["AT + QCCID", "+QCCID: 89860099999999999990", "OK"]
    assert said(s.handle_line("AT+QCCID")) == ["AT+QCCID", "+QCCID: 89860099999999999990", "OK"]
    assert s.snapshot()["commands"]["AT+QCCID"] == 4
    s.reboot()  # starts the replay over
    assert said(s.handle_line("AT+QCCID"))[1] == "+QCCID: 89860012345678901230"


def test_an_unrecorded_command_answers_error_and_the_client_probes_answer_v250_defaults():
    s = state()
    assert said(s.handle_line("AT+CGSN")) == ["AT+CGSN", "ERROR"]
    assert said(s.handle_line("ATS3?")) == ["ATS3?", "013", "OK"]
    assert said(s.handle_line("ATS5?")) == ["ATS5?", "008", "OK"]
    assert said(s.handle_line("   ")) == ["   "]  # an empty line: echo only, no answer
    assert s.snapshot()["unknown"] == ["AT+CGSN"]
    assert s.snapshot()["counters"]["unknown_commands"] == 1
    recorded_probe = state([{"t": 0, "cmd": "ATS3?", "lines": ["13"], "final": "OK"}])
    assert said(recorded_probe.handle_line("ATS3?")) == ["ATS3?", "13", "OK"]


def test_secrets_are_looked_up_redacted_a_silent_command_stays_silent_and_ate0_ends_echo():
    s = state()
    assert said(s.handle_line('AT+CPIN="1234"')) == ['AT+CPIN="1234"', "OK"]
    assert said(s.handle_line("AT+COPS=?")) == ["AT+COPS=?"]  # recorded without a final result
    assert said(s.handle_line("ATE0")) == ["ATE0", "OK"]
    assert said(s.handle_line("AT")) == ["OK"]


def test_recorded_urcs_go_out_on_request_in_order():
    s = state()
    assert said(s.replay_urc()) == ["+QSIMSTAT: 1,0"]
    assert said(s.replay_urc(every=True)) == ["+QSIMSTAT: 1,1"]
    with pytest.raises(ValueError, match="no recorded URC left"):
        s.replay_urc()
    assert s.snapshot()["urcs_left"] == 0


def test_the_plugin_serves_a_replay_on_a_pty(fake_modem_factory, open_port, tmp_path):
    fm = fake_modem_factory(replay=write(tmp_path / "capture.jsonl"))
    port = open_port(fm.port)
    assert port.command("AT+QCCID") == ["AT+QCCID", "+QCCID: 89860012345678901230", "OK"]
    fm.replay_urc()
    assert port.read_until("QSIMSTAT") == ["+QSIMSTAT: 1,0"]
    assert port.command("AT+QCCID") == ["AT+QCCID", "+CME ERROR: 10"]
    fm.urc("RDY")  # any line, as on the simulated modem
    assert port.read_until("RDY") == ["RDY"]
    with pytest.raises(ValueError, match="a replay"):
        fm.sim_remove()
    with pytest.raises(TypeError, match="replay= takes no other option"):
        fake_modem_factory(replay=tmp_path / "capture.jsonl", profile="quectel")


def ctl(fm, *words: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simagent_lab.fakemodem", "ctl", "--control", fm.control_path, *words],
                          capture_output=True, text=True, timeout=20)


def test_the_process_replays_and_its_control_socket_says_what_a_replay_serves(fake_modem_process, open_port, tmp_path):
    fm = fake_modem_process(replay=write(tmp_path / "capture.jsonl"))
    port = open_port(fm.port)
    assert port.command("AT+QCCID")[1:] == ["+QCCID: 89860012345678901230", "OK"]
    assert ctl(fm, "replay-urc", "all").stdout.startswith("replay-urc: done; replaying ")
    assert port.read_until(r"1,1") == ["+QSIMSTAT: 1,0", "+QSIMSTAT: 1,1"]
    refused = ctl(fm, "sim-insert", "89860099999999999990")
    assert refused.returncode == 1 and "a replay" in refused.stderr
    assert ctl(fm, "replay-urc", "twice").returncode == 2
    snapshot = json.loads(ctl(fm, "state").stdout)
    assert snapshot["replay"].endswith("capture.jsonl") and snapshot["urcs_left"] == 0


@pytest.mark.parametrize("extra, content, message", [
    (["--profile", "quectel"], None, "--profile do not apply"),
    ([], '{"schema": "simagent/at-transcript/9"}\n', "line 1"),
    ([], '{"schema": "simagent/at-transcript/1"}\n{"cmd": 5}\n', "line 2"),
])
def test_a_replay_that_cannot_be_served_is_a_usage_error(tmp_path, extra, content, message):
    capture = tmp_path / "capture.jsonl"
    capture.write_text(content) if content else write(capture)
    done = subprocess.run([sys.executable, "-m", "simagent_lab.fakemodem", "--link", str(tmp_path / "m"),
                           "--replay", str(capture), *extra], capture_output=True, text=True, timeout=20)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
