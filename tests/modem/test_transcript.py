"""AT transcripts (`at_commands.transcript`): the format, its redaction, and the AT
client recording a session with the fake modem on a real pty."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from at_commands import transcript
from at_commands.client import ATClient, CommandTimeout
from at_commands.commands import redact_secrets
from at_commands.transcript import Exchange, Recorder, TranscriptError, Unsolicited


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_a_recording_reads_back_as_written_and_keeps_no_secret():
    out = io.StringIO()
    ticks = iter([10.0, 10.25, 11.5, 12.0])
    recorder = Recorder(out, port="/dev/ttyUSB2", tool="test", clock=lambda: next(ticks))
    recorder.exchange("AT+CGSN ", ["490154203237518"], "OK")
    recorder.urc("+QSIMSTAT: 1,0")
    recorder.exchange('AT+CSQ;+CPIN="1234"', [], "+CME ERROR: 16")
    recorder.close()  # not ours: the StringIO stays open
    text = out.getvalue()
    assert "1234" not in text
    header = json.loads(text.splitlines()[0])
    assert header["schema"] == "simagent/at-transcript/1" and header["redacted"] is True
    assert header["port"] == "/dev/ttyUSB2"

    read = transcript.parse(text)
    assert read.records == (
        Exchange(0.25, "AT+CGSN", ("490154203237518",), "OK"),
        Unsolicited(1.5, "+QSIMSTAT: 1,0"),
        Exchange(2.0, "AT+CSQ;+CPIN=[redacted]", (), "+CME ERROR: 16"),
    )
    assert read.urcs == ("+QSIMSTAT: 1,0",)


@pytest.mark.parametrize("text, kept, gone", [
    ('AT+CPIN="1234"', "AT+CPIN=", "1234"),
    ("at+cpin2=8765", "at+cpin2=", "8765"),
    ('AT+CLCK="SC",0,"4321"', "AT+CLCK=", "4321"),
    ('AT+QICSGP=1,1,"iot.apn","user","s3cret",1', "AT+QICSGP=", "s3cret"),
    ('AT^SICS=0,"passwd","s3cret"', "AT^SICS=", "s3cret"),
    ('AT+CSQ;+CGAUTH=1,1,"u","s3cret"', "AT+CSQ;+CGAUTH=", "s3cret"),
    ('+QICSGP: 1,"iot.apn","user","s3cret",1', "+QICSGP:", "s3cret"),
    ('+CGAUTH: 1,1,"s3cret"', "+CGAUTH:", "s3cret"),
])
def test_secrets_are_removed_from_commands_and_credential_answers(text, kept, gone):
    redacted = redact_secrets(text)
    assert redacted.startswith(kept) and gone not in redacted and "[redacted]" in redacted


@pytest.mark.parametrize("line", ["AT+CPIN?", "+CPIN: SIM PIN", "AT+CLCK=?", "+CSQ: 20,99", "AT+QCCID"])
def test_what_is_no_secret_stays(line):
    assert redact_secrets(line) == line


@pytest.mark.parametrize("text, where", [
    ("", "empty"),
    ('{"schema": "simagent/at-transcript/2"}\n', "line 1"),
    ('{"t": 0, "cmd": "AT", "lines": [], "final": "OK"}\n', "line 1"),
    ('{"schema": "simagent/at-transcript/1"}\n\nnot json\n', "line 3"),
    ('{"schema": "simagent/at-transcript/1"}\n{"t": 0, "cmd": "AT", "lines": "OK", "final": "OK"}\n', "line 2"),
    ('{"schema": "simagent/at-transcript/1"}\n{"t": "soon", "urc": "RDY"}\n', "line 2"),
])
def test_a_file_that_is_not_a_version_1_transcript_is_refused_naming_the_line(text, where):
    with pytest.raises(TranscriptError, match=where):
        transcript.parse(text)


def test_unknown_record_keys_are_ignored():
    read = transcript.parse('{"schema": "simagent/at-transcript/1", "new": 1}\n'
                            '{"t": 1, "cmd": "AT", "lines": [], "final": "OK", "rssi": 3}\n')
    assert read.exchanges == (Exchange(1.0, "AT", (), "OK"),)


@pytest.mark.fake_modem(profile="quectel", imei="490154203237518", iccid="89860012345678901230")
def test_the_client_records_answers_errors_timeouts_and_urcs_but_not_what_it_never_sent(fake_modem):
    out = io.StringIO()

    async def main():
        client = await ATClient.open(fake_modem.port)
        try:
            await client.command("ATE0")  # before recording: not in the file
            client.record(Recorder(out, port=fake_modem.port))
            await client.command("AT+CGSN")
            await client.command("AT+NOSUCH", check=False)
            fake_modem.urc("+QSIMSTAT: 1,0")
            await client.command("AT+QCCID")
            fake_modem.fault("drop")
            with pytest.raises(CommandTimeout):
                await client.command("AT+CIMI", timeout=0.3)

            def refuse() -> None:
                raise PermissionError("the gate says no")

            with pytest.raises(PermissionError):
                await client.command("AT+CFUN=1", guard=refuse)
            await client.command("AT+CSQ")  # after a resynchronisation: its probe is not recorded
        finally:
            client.close()

    run(main())
    records = transcript.parse(out.getvalue()).records
    assert [(type(r).__name__, getattr(r, "command", getattr(r, "line", None))) for r in records] == [
        ("Exchange", "AT+CGSN"), ("Exchange", "AT+NOSUCH"), ("Unsolicited", "+QSIMSTAT: 1,0"),
        ("Exchange", "AT+QCCID"), ("Exchange", "AT+CIMI"), ("Exchange", "AT+CSQ")]
    cgsn, nosuch, _urc, qccid, cimi, csq = records
    assert (cgsn.lines, cgsn.final) == (("490154203237518",), "OK")
    assert (nosuch.lines, nosuch.final) == ((), "ERROR")
    assert qccid.lines == ("+QCCID: 89860012345678901230",)
    assert cimi.final is None  # no final result came
    assert csq.final == "OK" and csq.lines[0].startswith("+CSQ:")


def test_a_recorder_that_keeps_holds_only_the_newest_records_within_its_bound():
    recorder = Recorder(keep=300, port="/dev/ttyUSB2")
    for n in range(50):
        recorder.exchange(f"AT+X{n}", ["+X: 1"], "OK")
    text = recorder.text()
    kept = transcript.parse(text).exchanges
    assert len(text) - len(text.splitlines(keepends=True)[0]) <= 300
    assert kept and [e.command for e in kept] == [f"AT+X{n}" for n in range(50 - len(kept), 50)]
    assert Recorder(io.StringIO()).text().count("\n") == 1  # a recorder that keeps nothing: the header
