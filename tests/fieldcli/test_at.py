"""`simagent at`: the query rule, one-shot and console against the fake-modem process,
writes and IMEI rewrites refused, and the daemon path."""

from __future__ import annotations

import asyncio

import pytest

from agent.service.control import socket_op
from agent.core.at_rules import Refused, check_command
from at_commands.commands import is_imei_rewrite, is_query
from at_commands import profiles
from at_commands.client import ATClient

IMEI_REWRITES = [
    'AT+EGMR=1,7,"867400030000099"',
    'at + egmr = 1 , 7,"867400030000099"',  # any case, any spacing
    'AT+CSQ;+EGMR=1,7,"867400030000099"',  # hidden behind a query
    'AT+SIMEI="867400030000099"',  # SIMCom
    'AT^CIMEI="867400030000099"',  # Huawei
    'AT#IMEI="867400030000099"',  # Telit
]


@pytest.mark.parametrize(
    "command, query",
    [
        ("AT", True), ("at", True), ("ATI", True), ("ATI3", True), ("AT+CGSN", True), ("AT+CIMI", True),
        ("AT+CSQ", True), ("AT+CESQ", True), ("AT+CGMI", True), ("AT&V", True), ("ATS3?", True),
        ("AT+CFUN?", True), ("AT+CFUN=?", True), ("AT+COPS=?", False), ("at + cops = ?", False), ("AT+CSQ;+COPS=?", False), ("AT^ICCID?", True), ("AT+CPIN?", True),
        ("AT+QCCID", True), ("AT+CICCID", True), ("AT#CCID", True), ("AT$MYCCID", True), ("AT+CCID", True),
        ('AT+QENG="servingcell"', True), ("AT#RFSTS", True), ("AT+CRSM=176,12258,0,0,10", True),
        ("AT+CGSN=1", True), ('AT+CLCK="SC",2', True), ('AT+CLCK="SC",1,"1234"', False),
        ('AT+CLCK="SC",2,"1234"', False), ("AT+CLCK=SC,2", True), ("AT+CSQ;+CREG?", True), (" at+csq ", True), ("AT+CSQ;", True),
        ("AT+CFUN=4", False), ("AT+CFUN=1,1", False), ("ATZ", False), ("AT&W", False), ("AT&F", False),
        ("ATD112;", False), ("ATH", False), ("ATE0", False), ("AT+CMEE=2", False), ("AT+CGATT=0", False),
        ("AT+CPIN=1234", False), ("AT+CRSM=214,28539,0,0,3,\"FFFFFF\"", False), ("AT+CSQ;+CFUN=0", False),
        ("ATE0+CSQ", False), ("AT+QPOWD", False), ("AT+COPS=2", False), ("AT+CFUN", False),
        ('AT+QENG="servingcell";+CFUN=4', False), ("", False), ("CSQ", False), ("+++", False),
    ],
)
def test_query_rule(command, query):
    assert is_query(command) is query


def test_imei_rewrites_are_refused_even_with_unsafe():
    for command in IMEI_REWRITES:
        assert is_imei_rewrite(command), command
        with pytest.raises(Refused) as refused:
            check_command(command, unsafe=True)
        assert refused.value.code == "imei_rewrite_refused"
    # Every profile's declared pattern is covered by the samples above.
    declared = {p for profile in profiles.PROFILES.values() for p in profile.imei_rewrite_commands}
    assert all(any(profiles.Profile("x", imei_rewrite_commands=(p,)).is_imei_rewrite(c) for c in IMEI_REWRITES) for p in declared)
    assert not is_imei_rewrite("AT+CGSN") and not is_imei_rewrite("AT+EGMR=0,7")


def test_control_characters_and_non_at_lines_are_refused():
    for command in ("AT+CMGS=\"1\"\x1a", "AT\rATZ", "hello"):
        with pytest.raises(Refused) as refused:
            check_command(command, unsafe=True)
        assert refused.value.code == "bad_args"


def test_one_shot_prints_responses_and_fails_on_an_error(cli, registered_modem):
    fm = registered_modem(profile="quectel")
    state = fm.state()
    done = cli("at", "--port", fm.port, "AT+CGSN", "AT+QCCID", "AT+CSQ;+CFUN?")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        state["imei"], "OK", f"+QCCID: {state['iccid']}", "OK", "+CSQ: 14,99", "+CFUN: 1", "OK",
    ]
    failed = cli("at", "--port", fm.port, "AT+CEER", "ATI")  # the fake knows no +CEER
    assert failed.returncode == 1
    assert failed.stdout.splitlines() == ["ERROR", "Quectel", "EC25", "Revision: EC25EFAR06A06M4G", "OK"]


def test_write_needs_unsafe(cli, registered_modem):
    fm = registered_modem(profile="generic")
    before = fm.state()["counters"]["commands"]
    refused = cli("at", "--port", fm.port, "AT+CSQ", "AT+CFUN=4")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip() == ("AT+CFUN=4: refused: this command changes the modem; repeat it with --unsafe; "
                                      "nothing was sent (a batch is checked whole before any of its 2 commands goes out)")
    assert fm.state()["cfun"] == 1 and fm.state()["counters"]["commands"] == before  # nothing was sent

    done = cli("at", "--port", fm.port, "--unsafe", "AT+CFUN=4")
    assert done.returncode == 0 and done.stdout == "OK\n"
    assert fm.state()["cfun"] == 4


def test_interactive_console_reads_stdin(cli, registered_modem):
    fm = registered_modem(profile="telit")
    console = "AT+CGMI\n\nAT+CFUN=4\nAT#CCID\nquit\nAT+CGSN\n"
    done = cli("at", "--port", fm.port, input=console)
    assert done.returncode == 1  # one line was refused
    assert done.stdout.splitlines() == ["Telit", "OK", f"#CCID: {fm.state()['iccid']}", "OK"]  # no prompt: not a tty
    assert "AT+CFUN=4: refused" in done.stderr
    assert fm.state()["commands"].get("AT+CGSN") is None  # after quit
    assert cli("at", "--port", fm.port, input="AT\n").returncode == 0  # EOF ends


def test_imei_rewrite_never_reaches_the_modem(cli, registered_modem):
    fm = registered_modem(profile="simcom")
    for command in IMEI_REWRITES:
        done = cli("at", "--port", fm.port, "--unsafe", command)
        assert done.returncode == 1 and "rewrites the IMEI" in done.stderr
    console = cli("at", "--port", fm.port, "--unsafe", input="\n".join(IMEI_REWRITES) + "\nAT+CGSN\n")
    assert console.stdout.splitlines() == [fm.state()["imei"], "OK"]
    assert fm.state()["counters"]["imei_rewrite_attempts"] == 0

    async def send_it_anyway():  # the counter is real: the fake counts what reaches it
        client = await ATClient.open(fm.port)
        try:
            await client.command('AT+SIMEI="867400030000099"')
        finally:
            client.close()

    asyncio.run(send_it_anyway())
    assert fm.state()["counters"]["imei_rewrite_attempts"] == 1


def test_at_goes_through_the_daemon_when_it_runs(cli, control_server):
    seen = []

    async def at(args, peer):
        seen.append(args)
        return {"lines": ["+CSQ: 20,99"], "final": "OK", "ok": True}

    control_server(cli.socket, [socket_op("at", at)])
    done = cli("at", "AT+CSQ")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["+CSQ: 20,99", "OK"]
    assert seen == [{"command": "AT+CSQ", "unsafe": False}]

    refused = cli("at", "AT+CFUN=4")  # refused locally, the daemon never asked
    assert refused.returncode == 1 and len(seen) == 1


@pytest.mark.parametrize("command", ["ATV0", "ATQ1", "ATS3=10", "ATS4=13", "ATE0V0", "AT+CSQ;S4=1", "at v0"])
def test_settings_that_break_the_at_session_are_refused_always(command):
    """Numeric or no result codes, another line terminator: the session could no longer
    tell one answer from the next (review of issue 9)."""
    with pytest.raises(Refused) as refused:
        check_command(command, unsafe=True)
    assert "frames its answers" in str(refused.value)
