"""What modem software probes on a module of this class (issue 14 item 1): test forms with
the ranges the profile data cites, and the 27.007 commands ModemManager and field tools
send (identity, card files, PIN status, settings). State machine only, no pty."""

from __future__ import annotations

import re

import pytest

from at_commands import commands, profiles
from simagent_lab.fakemodem import FakeModemState

from .test_state import make, run

ALL = list(profiles.PROFILES.values())
IDS = [p.name for p in ALL]


def ready(profile: str = "quectel", **kwargs) -> FakeModemState:
    s, _ = make(profile, **kwargs)
    s.handle_line("ATE0")
    return s


def swapped(hex_text: str) -> str:
    """Undo the card's nibble swap (what a client does, written independently of the fake)."""
    return "".join(hex_text[i + 1] + hex_text[i] for i in range(0, len(hex_text), 2))


def crsm_data(reply: list[str]) -> str:
    m = re.fullmatch(r'\+CRSM: 144,0,"([0-9A-F]+)"', reply[0])
    assert m and reply[1:] == ["OK"], reply
    return m.group(1)


@pytest.mark.parametrize("p", ALL, ids=IDS)
def test_every_implemented_command_has_a_cited_test_form(p):
    for name in FakeModemState._HANDLERS:
        form = p.test_form(name)
        if name in p.unsupported:
            assert form is None, f"{p.name} does not implement {name}"
            continue
        assert form is not None, f"{p.name}: {name}=? has no range line"
        tag = re.match(r"\[[^\]]+\]", form.source)
        assert tag and tag.group(0) in profiles.__doc__, f"{name}: source {form.source!r} not in the sources list"
        assert all(line.startswith(name + ": ") for line in form.lines), form


@pytest.mark.parametrize("p", ALL, ids=IDS)
def test_the_fake_answers_each_test_form_with_the_profiles_line(p):
    s = ready(p.name)
    for name in FakeModemState._HANDLERS:
        if name == "+COPS":  # a network scan (test_state covers it)
            continue
        if name in p.unsupported:  # as on the module: the command and its forms are errors
            assert run(s, f"AT{name}=?") == run(s, f"AT{name}") == ["ERROR"], name
            continue
        assert run(s, f"AT{name}=?") == [*p.test_form(name).lines, "OK"], name
        assert commands.is_query(f"AT{name}=?"), f"AT{name}=? must stay a query for the agent"


def test_quectel_ctzu_range_is_the_manuals_and_accepted():
    # ModemManager 1.20 crashed on a bare OK here; a real EC25 gives the range.
    s = ready("quectel")
    assert run(s, "AT+CTZU=?") == ["+CTZU: (0,1,3)", "OK"]
    assert run(s, "AT+CTZU=3") == ["OK"]
    assert run(s, "AT+CTZU?") == ["+CTZU: 3", "OK"]
    g = ready("generic")
    assert run(g, "AT+CTZU=?") == ["+CTZU: (0,1)", "OK"]
    assert run(g, "AT+CTZU=3") == ["ERROR"]  # not in the range it advertises


def test_unknown_commands_and_their_test_forms_stay_error():
    s = ready()
    for line in ("AT+QFOO=?", "AT+CBC", "AT+CBC=?", "AT*CNTI=2", "AT+CLAC"):
        assert run(s, line) == ["ERROR"], line


def test_identity_class_commands():
    s = ready("quectel")
    assert run(s, "AT+GCAP") == ["+GCAP: +CGSM", "OK"]
    assert run(s, "AT+CNUM") == ['+CNUM: ,"+8613800138000",145', "OK"]
    assert run(s, "ATX4") == ["OK"]
    s.msisdn = None
    assert run(s, "AT+CNUM") == ["OK"]


def test_settings_read_back_and_are_checked_against_the_range():
    s = ready("quectel")
    assert run(s, "AT+CSCS?") == ['+CSCS: "GSM"', "OK"]
    assert run(s, 'AT+CSCS="UCS2"') == ["OK"]
    assert run(s, "AT+CSCS?") == ['+CSCS: "UCS2"', "OK"]
    assert run(s, 'AT+CSCS="EBCDIC"') == ["ERROR"]
    assert run(s, "AT+CNMI=2,1,0,0,0") == ["OK"]
    assert run(s, "AT+CNMI?") == ["+CNMI: 2,1,0,0,0", "OK"]
    assert run(s, "AT+CNMI=2,1,1,0,0") == ["ERROR"]  # <bm> is 0 or 2
    assert run(s, "AT+WS46?") == ["+WS46: 25", "OK"]
    assert run(s, "AT+CEMODE?") == ["+CEMODE: 2", "OK"]
    assert run(s, "AT+CPLS=0") == ["OK"]
    assert run(s, "AT+CPLS?") == ["+CPLS: 0", "OK"]
    assert run(s, "AT+CUSD=1") == ["OK"]
    assert run(s, "AT+CUSD?") == ["+CUSD: 1", "OK"]
    assert run(s, "AT+CPOL?") == ["OK"]  # the card has no preferred operators
    assert run(s, "AT+CPOL=,2") == ["OK"]
    s.reboot()
    s.handle_line("ATE0")
    assert run(s, "AT+CSCS?") == ['+CSCS: "GSM"', "OK"]  # power-on default again


def test_pdp_contexts_defined_read_and_undefined():
    s = ready()
    assert run(s, "AT+CGDCONT?") == ['+CGDCONT: 1,"IPV4V6","","",0,0', "OK"]
    assert run(s, 'AT+CGDCONT=2,"IP","cmnet"') == ["OK"]
    assert run(s, "AT+CGDCONT?")[1] == '+CGDCONT: 2,"IP","cmnet","",0,0'
    assert run(s, "AT+CGDCONT=2") == ["OK"]
    assert run(s, "AT+CGDCONT?") == ['+CGDCONT: 1,"IPV4V6","","",0,0', "OK"]
    assert run(s, 'AT+CGDCONT=16,"IP","x"') == ["ERROR"]
    assert run(s, 'AT+CGDCONT=3,"X25","x"') == ["ERROR"]


def test_facility_lock_status_follows_the_card():
    s = ready()
    assert run(s, 'AT+CLCK="SC",2') == ["+CLCK: 0", "OK"]
    assert run(s, 'AT+CLCK="ZZ",2') == ["ERROR"]
    locked = ready(pin="1234")
    assert run(locked, 'AT+CLCK="SC",2') == ["+CLCK: 1", "OK"]
    empty = ready(iccid=None)
    assert run(empty, 'AT+CLCK="SC",2') == ["ERROR"]


def test_pin_status_apdus_give_the_retry_counters():
    s = ready()
    assert run(s, 'AT+CSIM=10,"0020000100"') == ['+CSIM: 4,"63C3"', "OK"]  # PIN1
    assert run(s, 'AT+CSIM=10,"0020008100"') == ['+CSIM: 4,"63C3"', "OK"]  # PIN2
    assert run(s, 'AT+CSIM=10,"002C000100"') == ['+CSIM: 4,"63CA"', "OK"]  # PUK1
    assert run(s, 'AT+CSIM=10,"00A4000C023F00"') == ["ERROR"]  # length does not match
    assert run(s, 'AT+CSIM=14,"00A4000C023F00"') == ['+CSIM: 4,"6D00"', "OK"]
    assert run(ready(iccid=None), 'AT+CSIM=10,"0020000100"') == ["ERROR"]


def test_card_files_come_from_the_cards_data():
    s = ready(imsi="460029876543210", iccid="89860012345678901234")
    imsi = crsm_data(run(s, "AT+CRSM=176,28423,0,0,9"))
    # length 8, then identity type 001 with the odd-parity bit (nibble 9), then the digits
    assert imsi[:2] == "08" and swapped(imsi[2:]) == "9460029876543210"
    assert crsm_data(run(s, "AT+CRSM=176,28589,0,0,4")) == "00000002"  # EF_AD: 2-digit MNC
    spn = crsm_data(run(s, "AT+CRSM=176,28486,0,0,17"))
    assert bytes.fromhex(spn[2:].replace("FF", "")).decode() == "CMCC"
    record = crsm_data(run(s, "AT+CRSM=178,28480,1,4,28"))
    number = swapped(record[32:52]).rstrip("F")
    assert record[30:32] == "91" and "+" + number == s.msisdn
    assert crsm_data(run(s, "AT+CRSM=176,28589,0,0,0")) == "00000002"  # P3 0: the whole file
    assert crsm_data(run(s, "AT+CRSM=176,12258,0,0,10")) == swapped("89860012345678901234")


def test_card_files_other_than_the_iccid_need_the_pin():
    s = ready(pin="1234")
    assert run(s, "AT+CRSM=176,28423,0,0,9") == ['+CRSM: 105,130,""', "OK"]
    assert run(s, "AT+CRSM=176,12258,0,0,10")[0].startswith("+CRSM: 144,0,")
    assert run(s, "AT+CPIN=1234") == ["OK", "+CPIN: READY"]
    assert run(s, "AT+CRSM=176,28423,0,0,9")[0].startswith("+CRSM: 144,0,")


def test_nrf91_has_no_csq_and_reports_signal_through_cesq():
    s = ready("nrf91")
    assert run(s, "AT+CSQ") == ["ERROR"]
    assert run(s, "AT+CESQ")[0].startswith("+CESQ: ")
