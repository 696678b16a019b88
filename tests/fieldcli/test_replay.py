"""Record on a terminal, replay in CI (issue 14, item 4): a transcript recorded with the
real `simagent at --record` against the fake-modem process (standing in for a module on a
terminal) replays through the real `simagent-fakemodem --replay`, and the real `simagent
status` reads the same identity from it."""

from __future__ import annotations

import json
import tarfile

from at_commands import transcript
from at_commands.transcript import Exchange
from simagent_lab.pytest_plugin import wait_for
from simagent_lab.replay import ReplayState

# What `simagent status` reads (README, "Record on a terminal, replay in CI").
STATUS_COMMANDS = ["AT+CGMI", "AT+CGMM", "AT+CGMR", "AT+CGSN", "AT+CPIN?", "AT+QCCID", "AT+CIMI",
                   "AT+CEREG?", "AT+CGREG?", "AT+CREG?", "AT+COPS?", "AT+CSQ", "AT+CESQ", "AT+CFUN?"]


def without_port(modem: dict) -> dict:
    return {k: v for k, v in modem.items() if k != "port"}  # each fake has its own


def status_json(cli, port: str) -> dict:
    done = cli("status", "--json", "--port", port)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_transcript_recorded_with_simagent_at_replays_to_the_same_status(cli, registered_modem, fake_modem_process,
                                                                          tmp_path):
    # An identity no default has: what the replay shows can only come from the file.
    fm = registered_modem(profile="quectel", imei="356938035643809", iccid="89314404000123456789",
                          imsi="204043612345678", pin="4321")
    assert cli("at", "--port", fm.port, "--unsafe", 'AT+CPIN="4321"').returncode == 0
    assert wait_for(lambda: fm.state()["registration"] == "home"), fm.state()  # settled before either read
    capture = tmp_path / "field-capture.jsonl"
    done = cli("at", "--port", fm.port, "--unsafe", "--record", str(capture), 'AT+CPIN="4321"', *STATUS_COMMANDS)
    assert done.returncode == 1 and done.stdout.startswith("ERROR\n"), done  # the PIN again: the card refuses it
    direct = status_json(cli, fm.port)
    fm.stop()

    text = capture.read_text()
    assert "4321" not in text  # the PIN never reaches the file
    recorded = transcript.parse(text)
    assert recorded.exchanges[0] == Exchange(recorded.exchanges[0].t, "AT", (), "OK")  # from the first AT on
    assert [e.command for e in recorded.exchanges[1:]] == ["AT+CPIN=[redacted]", *STATUS_COMMANDS]

    replay = fake_modem_process(replay=capture)
    replayed = status_json(cli, replay.port)
    assert without_port(replayed["modem"]) == without_port(direct["modem"])
    assert replayed["sim"] == direct["sim"] == {"state": "ready", "iccid": "89314404000123456789",
                                                "imsi": "204043612345678"}
    assert direct["modem"]["imei"] == "356938035643809" and direct["modem"]["profile"] == "quectel"
    assert replayed["network"] == direct["network"] and replayed["radio"] == direct["radio"]
    served = replay.state()
    assert served["commands"]["AT+QCCID"] == 1  # its own command, not the +CRSM fallback
    # status sends no set-up, only queries: those the recording lacks (answered ERROR, as a
    # module without them would) are the error-format read (so no AT+CMEE=1 follows) and
    # the 5G registration read.
    assert served["unknown"] == ["AT+CMEE?", "AT+C5GREG?"]


def test_at_through_the_daemon_records_the_daemons_answers(cli, control_server, tmp_path):
    from agent.service.control import socket_op

    async def at(args, peer):
        return {"lines": ["+CSQ: 20,99"], "final": "OK", "ok": True}

    control_server(cli.socket, [socket_op("at", at)])
    capture = tmp_path / "via-daemon.jsonl"
    done = cli("at", "--record", str(capture), "AT+CSQ")
    assert done.returncode == 0, done.stderr
    recorded = transcript.load(capture)
    assert recorded.header["port"] == "daemon"
    assert [(e.command, e.lines, e.final) for e in recorded.exchanges] == [("AT+CSQ", ("+CSQ: 20,99",), "OK")]


def test_a_record_file_that_cannot_be_written_is_a_usage_error(cli, registered_modem, tmp_path):
    fm = registered_modem(profile="quectel")
    done = cli("at", "--port", fm.port, "--record", str(tmp_path / "no" / "such" / "dir.jsonl"), "AT")
    assert done.returncode == 2 and "--record" in done.stderr and "Traceback" not in done.stderr


def test_the_diag_bundle_carries_diags_own_at_transcript_ready_to_replay(cli, registered_modem, tmp_path):
    fm = registered_modem(profile="simcom", imei="356938035643809", iccid="89314404000123456789")
    bundle = tmp_path / "support.tar.gz"
    done = cli("diag", "--port", fm.port, "--bundle", str(bundle))
    assert bundle.exists(), done.stderr
    with tarfile.open(bundle) as tar:
        member = tar.extractfile("simagent-support/at-transcript.jsonl")
        assert member is not None
        recorded = transcript.parse(member.read().decode())
    assert recorded.header["tool"] == "simagent diag"
    replay = ReplayState(recorded)
    assert b"356938035643809" in b"".join(replay.handle_line("AT+CGSN"))
    assert b"+ICCID: 89314404000123456789" in b"".join(replay.handle_line("AT+CICCID"))
