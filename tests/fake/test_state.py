"""The fake modem's state machine, without a pty: bytes in, bytes out, injected clock."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st

from simagent_lab import fakemodem
from at_commands import profiles
from simagent_lab.fakemodem import FakeModemState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(profile: str = "generic", **kwargs) -> tuple[FakeModemState, Clock]:
    clock = Clock()
    state = FakeModemState(profile=profiles.get(profile), clock=clock, wallclock=lambda: 1732669740.0, **kwargs)
    return state, clock


def text(chunks: list[bytes]) -> str:
    return b"".join(chunks).decode("latin-1")


def lines(chunks: list[bytes]) -> list[str]:
    return [x for x in re.split(r"[\r\n]+", text(chunks)) if x]


def run(state: FakeModemState, command: str) -> list[str]:
    return lines(state.handle_line(command))


def advance(state: FakeModemState, clock: Clock, seconds: float) -> list[str]:
    clock.now += seconds
    return lines(state.poll())


def test_echo_on_until_ate0_and_v1_framing():
    s, _ = make()
    assert text(s.handle_line("AT")) == "AT\r\r\nOK\r\n"
    assert text(s.handle_line("ATE0")) == "ATE0\r\r\nOK\r\n"
    assert text(s.handle_line("AT")) == "\r\nOK\r\n"
    assert text(s.handle_line("ATE1")) == "\r\nOK\r\n"
    assert run(s, "AT") == ["AT", "OK"]


def test_luhn_default_imei_and_validation():
    assert fakemodem.luhn_check_digit("49015420323751") == "8"
    assert fakemodem.DEFAULT_IMEI[-1] == fakemodem.luhn_check_digit(fakemodem.DEFAULT_IMEI[:14])
    with pytest.raises(ValueError, match="imei"):
        make(imei="12345")
    with pytest.raises(ValueError, match="iccid"):
        make(iccid="1234567890123456789")
    assert make(iccid="898600a123456789012F")[0].iccid == "898600A123456789012"


@pytest.mark.parametrize("cmee, expected", [(0, "ERROR"), (1, "+CME ERROR: 10"), (2, "+CME ERROR: SIM not inserted")])
def test_cme_modes(cmee, expected):
    s, _ = make(iccid=None)
    s.handle_line("ATE0")
    assert run(s, f"AT+CMEE={cmee}") == ["OK"]
    assert run(s, "AT+CPIN?") == [expected]
    assert run(s, "AT+CMEE?") == [f"+CMEE: {cmee}", "OK"]


def test_unknown_command_is_plain_error_in_every_cmee_mode():
    s, _ = make()
    s.handle_line("ATE0")
    s.handle_line("AT+CMEE=2")
    assert run(s, "AT+QFOO=1") == ["ERROR"]
    assert run(s, "hello") == ["ERROR"]
    assert s.counters["unknown_commands"] == 1


def test_identity_and_iccid_in_vendor_dialects():
    s, _ = make("simcom")
    s.handle_line("ATE0")
    assert run(s, "AT+CGMI") == ["SIMCOM INCORPORATED", "OK"]
    assert run(s, "AT+CICCID") == ["+ICCID: 89860012345678901234", "OK"]
    assert run(s, "at+ccid") == ["+CCID: 89860012345678901234", "OK"]
    assert run(s, "AT+CGSN") == [s.imei, "OK"]
    assert run(s, "AT+GSN") == [s.imei, "OK"]
    assert run(s, "AT+CGSN=1") == [f'+CGSN: "{s.imei}"', "OK"]
    assert run(s, "AT+CIMI") == ["460001234567890", "OK"]
    assert run(s, "ATI") == ["SIMCOM INCORPORATED", "SIMCOM_SIM7600G-H", "Revision: LE20B04SIM7600G22", "OK"]
    assert run(s, "AT+QCCID") == ["ERROR"]  # another vendor's command


def test_crsm_returns_nibble_swapped_ef_iccid_padded_with_f():
    s, _ = make(iccid="8986001234567890123")
    s.handle_line("ATE0")
    assert run(s, "AT+CRSM=176,12258,0,0,10") == ['+CRSM: 144,0,"986800214365870921F3"', "OK"]
    assert fakemodem.ef_iccid_hex("89860012345678901234") == "98680021436587092143"
    assert run(s, "AT+CRSM=176,28478,0,0,0") == ['+CRSM: 106,130,""', "OK"]  # EF_GID1: not on the card


def test_command_concatenation_and_quotes():
    s, _ = make()
    s.handle_line("ATE0")
    assert run(s, "AT+CMEE=2;+CREG=2;+CMEE?") == ["+CMEE: 2", "OK"]
    assert s.reg_n["+CREG"] == 2


def test_cfun_register_after_delay_and_cfun4_keeps_sim_readable():
    s, clock = make(register_delay=0.5)
    s.handle_line("ATE0")
    assert run(s, "AT+CREG=1") == ["OK"]
    assert run(s, "AT+CREG?") == ["+CREG: 1,2", "OK"]  # searching right after power-on
    assert advance(s, clock, 0.4) == []
    assert advance(s, clock, 0.2) == ["+CREG: 1"]
    assert run(s, "AT+COPS?") == ['+COPS: 0,0,"CHINA MOBILE",7', "OK"]
    assert s.snapshot()["attached"] and len(s.attaches) == 1

    assert run(s, "AT+CFUN=4") == ["OK", "+CREG: 0"]
    assert run(s, "AT+CFUN?") == ["+CFUN: 4", "OK"]
    assert run(s, "AT+CPIN?") == ["+CPIN: READY", "OK"]
    assert run(s, "AT+CCID") == [f"+CCID: {s.iccid}", "OK"]
    assert run(s, "AT+CSQ") == ["+CSQ: 99,99", "OK"]
    assert advance(s, clock, 5) == []  # no registration while the radio is off

    assert run(s, "AT+CFUN=1") == ["OK", "+CREG: 2"]
    assert advance(s, clock, 0.5) == ["+CREG: 1"]
    assert len(s.attaches) == 2


def test_cfun0_powers_the_sim_down():
    s, _ = make()
    s.handle_line("ATE0")
    s.handle_line("AT+CMEE=1")
    assert run(s, "AT+CFUN=0") == ["OK"]
    assert run(s, "AT+CPIN?") == ["+CME ERROR: 10"]
    assert run(s, "AT+CRSM=176,12258,0,0,10") == ["+CME ERROR: 10"]
    assert run(s, "AT+CFUN=4") == ["OK"]
    assert run(s, "AT+CPIN?") == ["+CPIN: READY", "OK"]


def test_signal_csq_and_cesq():
    s, clock = make()
    s.handle_line("ATE0")
    s.set_values(signal=-85)
    assert run(s, "AT+CSQ") == ["+CSQ: 14,99", "OK"]  # 2*14 - 113 = -85
    assert run(s, "AT+CESQ") == ["+CESQ: 99,99,255,255,20,56", "OK"]  # -141 + 56 = -85
    s.set_values(signal="none")
    assert run(s, "AT+CSQ") == ["+CSQ: 99,99", "OK"]


def test_registration_forms_and_control():
    s, clock = make(register_delay=0)
    s.handle_line("ATE0")
    advance(s, clock, 0)
    s.handle_line("AT+CEREG=2")
    assert run(s, "AT+CEREG?") == ['+CEREG: 2,1,"5F3C","0C8A1F02",7', "OK"]
    assert lines(s.register("roaming")) == ["+CEREG: 2"]
    assert advance(s, clock, 0) == ['+CEREG: 5,"5F3C","0C8A1F02",7']
    assert lines(s.register("denied")) == ["+CEREG: 2"]
    assert advance(s, clock, 0) == ["+CEREG: 3"]
    with pytest.raises(ValueError, match="register"):
        s.register("moon")


def test_cgatt_detach_and_reattach():
    s, clock = make(register_delay=0)
    s.handle_line("ATE0")
    advance(s, clock, 0)
    s.handle_line("AT+CGREG=1")
    assert run(s, "AT+CGATT=0") == ["OK", "+CGREG: 0"]
    assert run(s, "AT+CGATT?") == ["+CGATT: 0", "OK"]
    assert run(s, "AT+CREG?") == ["+CREG: 0,1", "OK"]
    assert run(s, "AT+CGATT=1") == ["OK", "+CGREG: 1"]
    s.handle_line("AT+CFUN=4")
    s.handle_line("AT+CMEE=1")
    assert run(s, "AT+CGATT=1") == ["+CME ERROR: 30"]


@pytest.mark.parametrize("name", ["quectel", "simcom", "telit", "ublox"])
def test_hotswap_urcs_only_after_enable(name):
    p = profiles.get(name)
    s, _ = make(name)
    s.handle_line("ATE0")
    assert p.sim_removed_sample not in lines(s.sim_remove())
    s2, _ = make(name)
    s2.handle_line("ATE0")
    for command in p.hotswap_enable:
        assert run(s2, command) == ["OK"]
    assert s2.hotswap_active
    assert p.sim_removed_sample in lines(s2.sim_remove())
    assert p.sim_inserted_sample in lines(s2.sim_insert("89860099999999999999"))


def test_huawei_reports_simst_unasked():
    s, _ = make("huawei")
    assert s.hotswap_active
    assert "^SIMST: 255" in lines(s.sim_remove())


def test_generic_never_reports_hotswap_so_the_agent_must_poll():
    s, _ = make()
    s.handle_line("ATE0")
    s.handle_line("AT+CMEE=1")
    assert lines(s.sim_remove()) == []
    assert run(s, "AT+CPIN?") == ["+CME ERROR: 10"]
    s.sim_insert("89860099999999999999")
    assert run(s, "AT+CCID") == ["+CCID: 89860099999999999999", "OK"]


def test_pin_locked_sim():
    s, clock = make(pin="1234", register_delay=0)
    s.handle_line("ATE0")
    s.handle_line("AT+CMEE=1")
    assert run(s, "AT+CPIN?") == ["+CPIN: SIM PIN", "OK"]
    assert run(s, "AT+CIMI") == ["+CME ERROR: 11"]
    assert run(s, "AT+CCID")[0].startswith("+CCID: ")  # ICCID is readable without PIN
    assert run(s, 'AT+CPIN="0000"') == ["+CME ERROR: 16"]
    assert advance(s, clock, 1) == []  # locked card: never registers
    assert run(s, 'AT+CPIN="1234"') == ["OK", "+CPIN: READY"]
    assert advance(s, clock, 0) == []
    assert s.snapshot()["registration"] == "home"


def test_imei_rewrite_answered_ok_but_changes_nothing():
    s, _ = make("simcom")
    s.handle_line("ATE0")
    before = s.imei
    assert run(s, 'AT+SIMEI="490154203237518"') == ["OK"]
    assert run(s, 'AT+EGMR=1,7,"490154203237518"') == ["OK"]
    assert s.imei == before
    assert s.counters["imei_rewrite_attempts"] == 2


def test_reboot_restores_power_on_defaults_and_prints_boot_urcs():
    s, _ = make("quectel")
    s.handle_line("ATE0")
    s.handle_line("AT+CMEE=2")
    s.handle_line("AT+CFUN=4")
    for command in profiles.QUECTEL.hotswap_enable:
        s.handle_line(command)
    assert lines(s.reboot()) == ["RDY", "+CPIN: READY", "+QUSIM: 1", "+QIND: SMS DONE", "+QIND: PB DONE"]
    snap = s.snapshot()
    assert (snap["echo"], snap["cmee"], snap["cfun"], snap["hotswap_active"]) == (True, 0, 1, False)
    assert snap["counters"]["reboots"] == 1
    assert lines(make("quectel", iccid=None)[0].boot_output()) == ["RDY"]


def test_cfun_1_1_resets():
    s, _ = make("simcom")
    s.handle_line("ATE0")
    assert run(s, "AT+CFUN=1,1") == ["OK", "RDY", "+CPIN: READY", "SMS DONE", "PB DONE"]
    assert s.echo


def test_network_time_after_ctzu_and_registration():
    s, clock = make(register_delay=0.1)
    s.handle_line("ATE0")
    assert run(s, "AT+CCLK?") == ['+CCLK: "80/01/06,00:00:00+00"', "OK"]
    s.handle_line("AT+CTZU=1")
    s.handle_line("AT+CTZR=2")
    assert advance(s, clock, 0.1) == ['+CTZE: "+32",0,"2024/11/27,09:09:00"']
    assert run(s, "AT+CCLK?") == ['+CCLK: "24/11/27,09:09:00+32"', "OK"]


def test_faults():
    s, clock = make()
    s.handle_line("ATE0")
    s.fault("drop")
    assert run(s, "AT") == []
    s.fault("error")
    assert run(s, "AT+CGMI") == ["ERROR"]
    s.fault("garbage")
    assert b"".join(s.handle_line("AT")).startswith(fakemodem.GARBAGE)
    s.fault("delay", 0.5)
    assert run(s, "AT+CGMI") == []
    assert advance(s, clock, 0.6) == ["Generic", "OK"]
    s.fault("hang")
    assert s.handle_line("AT") == []
    s.fault("clear")
    assert run(s, "AT") == ["OK"]
    with pytest.raises(ValueError, match="fault"):
        s.fault("explode")


def test_late_reply_arrives_before_the_next_answer_if_the_client_moves_on():
    s, clock = make()
    s.handle_line("ATE0")
    s.fault("late-reply", 5)
    assert run(s, "AT+CGMM") == []
    assert run(s, "AT+CGMI") == ["3GPP TS 27.007 modem", "OK", "Generic", "OK"]
    assert advance(s, clock, 10) == []  # delivered once only
    s.fault("late-reply", 0.2, count=1)
    assert run(s, "AT+CGMM") == []
    assert advance(s, clock, 0.3) == ["3GPP TS 27.007 modem", "OK"]


def test_line_assembler():
    a = fakemodem.LineAssembler()
    assert a.feed(b"AT+C") == []
    assert a.feed(b"GMI\r\nAT\r\x00") == ["AT+CGMI", "AT"]
    assert a.feed(b"X" * 10000 + b"\r") == ["X" * fakemodem.MAX_LINE]


@pytest.mark.parametrize(
    "op, words, expected",
    [("sim-insert", ["89860099999999999999"], {"op": "sim-insert", "iccid": "89860099999999999999"}),
     ("set", ["signal=-85", "imei=490154203237518"], {"op": "set", "signal": "-85", "imei": "490154203237518"}),
     ("register", ["roaming"], {"op": "register", "state": "roaming"}),
     ("fault", ["delay=2.5"], {"op": "fault", "kind": "delay", "seconds": 2.5}),
     ("fault", ["late-reply", "seconds=3", "count=2"], {"op": "fault", "kind": "late-reply", "seconds": 3.0, "count": 2}),
     ("fault", ["drop"], {"op": "fault", "kind": "drop"}),
     ("state", [], {"op": "state"})],
)
def test_parse_ctl_words(op, words, expected):
    assert fakemodem.parse_ctl_words(op, words) == expected


@pytest.mark.parametrize("op, words", [("sim-insert", []), ("set", ["signal"]), ("fault", ["boom"]), ("reboot", ["now"])])
def test_parse_ctl_words_rejects(op, words):
    with pytest.raises(ValueError):
        fakemodem.parse_ctl_words(op, words)


def test_set_is_all_or_nothing():
    s, _ = make()
    with pytest.raises(ValueError, match="imei"):
        s.set_values(signal=-60, imei="123")
    assert s.signal_dbm == -85
    with pytest.raises(ValueError, match="unknown key"):
        s.set_values(colour="red")
    s.set_values(signal="-60", operator="CHN-UNICOM", register_delay="0.1")
    assert (s.signal_dbm, s.operator, s.register_delay) == (-60, "CHN-UNICOM", 0.1)


def test_s_register_probes_answer_v250_defaults():
    s, _ = make()
    s.handle_line("ATE0")
    assert [run(s, f"ATS{n}?") for n in (3, 4, 5)] == [["013", "OK"], ["010", "OK"], ["008", "OK"]]
    assert run(s, "ATS99?") == ["ERROR"]


def test_characters_before_the_at_prefix_are_ignored():
    s, _ = make()
    s.handle_line("ATE0")
    assert run(s, "\x1b  AT+CFUN?") == ["+CFUN: 1", "OK"]
    assert run(s, "") == []  # a bare CR (a late abort byte) is an empty line: nothing
    assert run(s, "hello") == ["ERROR"]


def test_network_scan_takes_scan_seconds_and_lines_wait_for_it():
    s, clock = make(scan_seconds=2.0)
    s.handle_line("ATE0")
    assert run(s, "AT+COPS=?") == []
    assert s.snapshot()["executing"] and s.abortable_running
    assert run(s, "AT+CSQ") == []  # a busy channel: answered after the scan, in order
    assert advance(s, clock, 1.0) == []
    out = advance(s, clock, 1.1)
    assert out[0].startswith('+COPS: (1,"CHINA MOBILE"') and out[1:] == ["OK", "+CSQ: 14,99", "OK"]
    assert not s.snapshot()["executing"]


def test_abort_stops_a_scan_with_error_and_counts():
    s, clock = make(scan_seconds=10.0)
    s.handle_line("ATE0")
    run(s, "AT+COPS=?")
    assert lines(s.abort()) == ["ERROR"]
    assert s.counters["aborted"] == 1 and not s.abortable_running
    assert advance(s, clock, 20) == []  # the scan's answer never comes
    assert lines(s.abort()) == []  # nothing to abort
    assert run(s, "AT+CFUN?") == ["+CFUN: 1", "OK"]
    run(s, "AT+COPS=?")
    s.fault("hang")
    assert lines(s.abort()) == [] and s.counters["aborted"] == 1  # a hung module ignores input


def test_a_delayed_reply_holds_the_channel_but_is_not_abortable():
    s, clock = make()
    s.handle_line("ATE0")
    s.fault("delay", 0.5)
    assert run(s, "AT+CGMI") == []
    assert not s.abortable_running
    assert run(s, "AT+CFUN?") == []
    assert advance(s, clock, 0.6) == ["Generic", "OK", "+CFUN: 1", "OK"]


def test_scan_seconds_is_settable():
    s, _ = make()
    assert s.scan_seconds == fakemodem.DEFAULT_SCAN_SECONDS
    s.set_values(scan_seconds="7.5")
    assert s.snapshot()["scan_seconds"] == 7.5
    with pytest.raises(ValueError, match="scan_seconds"):
        s.set_values(scan_seconds="-1")
    assert fakemodem.parse_ctl_words("set", ["scan_seconds=4"]) == {"op": "set", "scan_seconds": "4"}


def test_a_queued_line_cancels_a_timer_due_in_the_same_poll():
    """The end of a busy channel answers the queued lines; one of them (radio off) cancels
    the registration timer that is due in the same poll. The poll must not fire it (it
    raised ValueError in the fake's loop thread, which then answered nothing: found by the
    invariant run on CI)."""
    s, clock = make(register_delay=0.5)
    s.handle_line("ATE0")
    assert run(s, "AT+CFUN=1") == ["OK"]  # registration settles in 0.5 s
    s.fault("delay", 0.3)
    assert run(s, "AT+CGMI") == []  # the channel is busy for 0.3 s
    assert run(s, "AT+CFUN=4") == []  # queued behind it
    assert advance(s, clock, 1.0) == ["Generic", "OK", "OK"]
    assert s.snapshot()["registration"] == "idle"


LINES = ["AT", "AT+COPS=?", "ATS3?", "AT+CFUN=4", "AT+CFUN=1", "AT+CSQ", "AT+CPIN?", "AT+QCCID", "AT+CIMI",
         "ATE0", "AT+CMEE=2", "AT+CGATT=1", "AT+CRSM=176,12258,0,0,10", "\x00garbage", "AT+CFUN=1,1"]
OPERATIONS = st.one_of(
    st.tuples(st.just("line"), st.sampled_from(LINES)),
    st.tuples(st.just("abort"), st.none()),
    st.tuples(st.just("tick"), st.floats(0, 3)),
    st.tuples(st.just("fault"), st.sampled_from([*fakemodem.FAULT_KINDS, "clear"])),
    st.tuples(st.just("reboot"), st.none()),
    st.tuples(st.just("remove"), st.none()),
    st.tuples(st.just("insert"), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(profile=st.sampled_from(sorted(profiles.PROFILES)), operations=st.lists(OPERATIONS, max_size=60))
def test_any_sequence_of_lines_faults_and_time_keeps_the_fake_answering(profile, operations):
    """Whatever the client sends, whatever the faults and however time passes: no exception
    (one would kill the fake's loop), and once faults clear and the queued commands have run
    the channel is free and a plain AT is answered OK."""
    s, clock = make(profile, scan_seconds=2)
    for kind, value in operations:
        if kind == "line":
            s.handle_line(value)
        elif kind == "abort":
            s.abort()
        elif kind == "tick":
            advance(s, clock, value)
        elif kind == "fault":
            s.fault(value, seconds=1.0, count=2) if value != "clear" else s.fault("clear")
        elif kind == "reboot":
            s.reboot()
        elif kind == "remove":
            s.sim_remove()
        else:
            s.sim_insert(fakemodem.DEFAULT_ICCID)
    s.fault("clear")
    for _ in range(len(operations) + 1):  # each queued scan runs in turn
        advance(s, clock, 60)
    assert s.snapshot()["executing"] is False
    s.handle_line("ATE0")
    advance(s, clock, 60)  # held late replies, if any, have gone out
    assert run(s, "AT") == ["OK"]
