"""Table-driven parser tests.

The +CREG/+CGREG vectors marked MM come from ModemManager's published parser tests,
src/tests/test-modem-helpers.c (linux-mobile-broadband/ModemManager, the revision
stored as commit 675d8aeeea8ded0adcfacb2ef20ca2db2fc1388d), test_creg*/test_cgreg*; the
IMEI vectors marked MM are the +GSN answers of that file's device-identifier table. That
revision has no CSQ/CESQ/CPIN/ICCID vectors; those below are from 27.007 and module
manuals.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from at_commands import parsers as p
from at_commands.parsers import ParseError

# (reply, stat, lac, ci, access_tech, unsolicited); MM's AcT expectations differ only
# where noted (MM reports EDGE for AcT 3, we report gsm; the Samsung/Gobi quirks).
REGISTRATION = [
    ("+CREG: 1,3", 3, None, None, "unknown", False),  # MM creg1_solicited
    ("+CREG: 3", 3, None, None, "unknown", True),  # MM creg1_unsolicited
    ("+CREG: 0,1,84CD,00D30173", 1, 0x84CD, 0xD30173, "unknown", False),  # MM mercury
    ("+CREG: 1,84CD,00D30156", 1, 0x84CD, 0xD30156, "unknown", True),  # MM mercury unsol.
    ('+CREG: 2,1,"CE00","01CEAD8F"', 1, 0xCE00, 0x01CEAD8F, "unknown", False),  # MM K850i
    ('+CREG: 1,"CE00","00005449"', 1, 0xCE00, 0x5449, "unknown", True),  # MM K850i unsol.
    ("+CREG: 2,0,00,0", 0, 0, 0, "unknown", False),  # MM E160G unregistered
    ("+CREG: 2,1,8BE3,2BAF", 1, 0x8BE3, 0x2BAF, "unknown", False),  # MM E160G
    ("+CREG: 2,8BE3,2BAF", 2, 0x8BE3, 0x2BAF, "unknown", True),  # MM E160G unsol.
    ('+CREG: 2,1,"8BE3","00002BAF"', 1, 0x8BE3, 0x2BAF, "unknown", False),  # MM TM-506
    ("+CREG: 2,,", 2, None, None, "unknown", True),  # MM XU870 unregistered
    ('+CREG:002,001,"18d8","ffff"', 1, 0x18D8, 0xFFFF, "unknown", False),  # MM Iridium
    ("+CGREG: 1,3", 3, None, None, "unknown", False),  # MM cgreg1_solicited
    ("+CGREG: 3", 3, None, None, "unknown", True),  # MM cgreg1_unsolicited
    ('+CGREG: 2,1,"8BE3","00002B5D",3', 1, 0x8BE3, 0x2B5D, "gsm", False),  # MM F3607gw (EDGE)
    ('+CGREG: 1,"8BE3","00002B5D",3', 1, 0x8BE3, 0x2B5D, "gsm", True),  # MM F3607gw unsol.
    ('+CREG: 2,5,"0502","0404736D"', 5, 0x0502, 0x0404736D, "unknown", False),  # MM MD400
    ('+CGREG: 5,"0502","0404736D",2', 5, 0x0502, 0x0404736D, "umts", True),  # MM MD400
    ("+CGREG: 2,1, 81ED, 1A9CEB", 1, 0x81ED, 0x1A9CEB, "unknown", False),  # MM X220 spaces
    ('+CGREG: 1,"1422","00000142",3,"00"', 1, 0x1422, 0x0142, "gsm", True),  # MM with RAC
    # MM expects GSM from the non-standard " B" AcT; we call an unknown AcT unknown.
    ("+CREG: 2,1,000B,2816, B, C2816", 1, 0x000B, 0x2816, "unknown", False),  # MM S8500
    # MM reads LAC 0 from "  0 5"; we drop inner spaces and read 0x05.
    ("+CREG: 2,1,  0 5, 2715", 1, 0x05, 0x2715, "unknown", False),  # MM Gobi 1000
    # 27.007 forms for EPS and 5GS
    ('+CEREG: 2,1,"1A2B","01A2D001",7', 1, 0x1A2B, 0x01A2D001, "lte", False),
    ('+CEREG: 5,"1A2B","01A2D001",7', 5, 0x1A2B, 0x01A2D001, "lte", True),
    ("+CEREG: 0,4", 4, None, None, "unknown", False),
    ('+CEREG: 3,1,"00C3","0A1B2C3D",7,,', 1, 0xC3, 0x0A1B2C3D, "lte", False),
    ('+C5GREG: 2,1,"00A1B2","0000000ABCDE",11', 1, 0xA1B2, 0xABCDE, "nr5g", False),
    ('+C5GREG: 1,"00A1B2","0000000ABCDE",11', 1, 0xA1B2, 0xABCDE, "nr5g", True),
    ("+CEREG:  2 , 3 ", 3, None, None, "unknown", False),
    ('+CREG: 2,2,"FFFE","FFFFFFF",0', 2, 0xFFFE, 0xFFFFFFF, "gsm", False),
]


@pytest.mark.parametrize("reply,stat,lac,ci,tech,unsolicited", REGISTRATION)
def test_registration(reply, stat, lac, ci, tech, unsolicited):
    info = p.parse_registration(reply)
    assert (info.stat, info.lac, info.cell_id, info.access_tech, info.unsolicited) == (stat, lac, ci, tech, unsolicited)
    assert info.state == p.REGISTRATION_STATES[stat]
    assert p.registration_is_unsolicited(reply) is unsolicited


@pytest.mark.parametrize("stat,word", [(0, "idle"), (1, "home"), (2, "searching"), (3, "denied"),
                                       (4, "unknown"), (5, "roaming"), (6, "home-sms-only"),
                                       (7, "roaming-sms-only"), (8, "emergency-only")])
def test_registration_words(stat, word):
    assert p.parse_registration(f"+CEREG: 2,{stat}").state == word


@pytest.mark.parametrize("act,tech", [(0, "gsm"), (2, "umts"), (3, "gsm"), (6, "umts"), (7, "lte"),
                                      (9, "lte"), (11, "nr5g"), (12, "nr5g"), (13, "nr5g"), (42, "unknown")])
def test_access_tech(act, tech):
    assert p.parse_registration(f'+CEREG: 2,1,"1","2",{act}').access_tech == tech


def test_registration_rejects_garbage():
    with pytest.raises(ParseError):
        p.parse_registration("+CSQ: 1,2")
    with pytest.raises(ParseError):
        p.parse_registration("+CREG: x")


@pytest.mark.parametrize("lines,rssi,dbm", [
    ("+CSQ: 20,99", 20, -73), ("+CSQ: 0,0", 0, -113), ("+CSQ: 31,99", 31, -51),
    ("+CSQ: 99,99", 99, None), ("+CSQ:  7 , 99", 7, -99), ("+CSQ: 115,99", 115, None),
])
def test_csq(lines, rssi, dbm):
    csq = p.parse_csq([lines])
    assert (csq.rssi, csq.dbm) == (rssi, dbm)


def test_cesq():
    c = p.parse_cesq("+CESQ: 99,99,255,255,26,50")
    assert (c.rssi_dbm, c.ber, c.rscp_dbm, c.ecio_db, c.rsrq_db, c.rsrp_dbm) == (None, None, None, None, -7.0, -91)
    c = p.parse_cesq("+CESQ: 40,0,30,40,255,255")
    assert (c.rssi_dbm, c.ber, c.rscp_dbm, c.ecio_db, c.rsrq_db, c.rsrp_dbm) == (-71, 0, -91, -4.5, None, None)
    c = p.parse_cesq("+CESQ: 99,99,255,255,255,255,65,75,75")
    assert (c.ss_rsrq_db, c.ss_rsrp_dbm, c.ss_sinr_db) == (-10.5, -82, 14.5)
    with pytest.raises(ParseError):
        p.parse_cesq("+CESQ: 1,2")


@pytest.mark.parametrize("csq,cesq,reading", [
    ("+CSQ: 0,99", "+CESQ: 99,99,255,255,20,21", (-120, "rsrp")),  # below the CSQ floor: RSRP tells
    ("+CSQ: 14,99", "+CESQ: 99,99,255,255,255,255,65,75,75", (-82, "ss_rsrp")),
    ("+CSQ: 20,99", "+CESQ: 40,0,30,40,255,255", (-91, "rscp")),
    ("+CSQ: 20,99", "+CESQ: 40,0,255,255,255,255", (-73, "rssi")),  # GSM: no received power, CSQ's RSSI
    ("+CSQ: 99,99", "+CESQ: 40,0,255,255,255,255", (-71, "rssi")),  # ... or CESQ's RXLEV
    ("+CSQ: 14,99", None, (-85, "rssi")),
    ("+CSQ: 99,99", "+CESQ: 99,99,255,255,255,255", (None, None)),
    (None, None, (None, None)),
])
def test_the_signal_reading_prefers_the_received_power_of_cesq(csq, cesq, reading):
    assert p.signal_reading(csq and p.parse_csq(csq), cesq and p.parse_cesq(cesq)) == reading


@pytest.mark.parametrize("reply,state", [
    ("+CPIN: READY", "ready"), ("+CPIN: SIM PIN", "locked"), ("+CPIN: SIM PUK", "locked"),
    ("+CPIN: PH-SIM PIN", "locked"), ("+CPIN: SIM PIN2", "locked"), ("+CPIN: NOT INSERTED", "absent"),
    ('+CPIN: "READY"', "ready"), ("+CPIN: NOT READY", "unknown"),
])
def test_cpin(reply, state):
    assert p.parse_cpin([reply]).state == state


@pytest.mark.parametrize("code,text,state", [
    (10, "", "absent"), (13, "", "error"), (14, "", "busy"), (None, "SIM not inserted", "absent"),
    (None, "SIM busy", "busy"), (None, "SIM failure", "error"), (3, "", "unknown"),
])
def test_cpin_errors(code, text, state):
    assert p.sim_state_from_cme(code, text) == state


@pytest.mark.parametrize("lines,imei,luhn", [
    (["490154203237518"], "490154203237518", True),
    (['+CGSN: "490154203237518"'], "490154203237518", True),
    (["+GSN: 490154203237518"], "490154203237518", True),
    (["490154203237519"], "490154203237519", False),  # warning, not rejection
    (["235012412595195"], "235012412595195", False),  # MM Huawei E1550 +GSN
    (["129512359199159,SE393939TS"], "129512359199159", False),  # MM Option iCON 7.2 +GSN
    (['"626936926396996"'], "626936926396996", False),  # MM Motorola ROKR E2 +GSN
])
def test_imei(lines, imei, luhn):
    assert p.parse_imei(lines) == p.Imei(imei, luhn)


@pytest.mark.parametrize("bad", [["12de4fa6"], ["0x3B0C4B98"], ["4901542032375"], [], ["+CGSN: "]])
def test_imei_rejects(bad):
    with pytest.raises(ParseError):
        p.parse_imei(bad)


@pytest.mark.parametrize("raw,iccid", [
    ("89860318640220133897", "89860318640220133897"),
    ('"8986031864022013389"', "8986031864022013389"),
    ("8986 0318 6402 2013 3897", "89860318640220133897"),
    ("8901260487759545390F", "8901260487759545390"),
    ("98683081462002313398", "89860318640220133389"),  # raw EF_ICCID, nibble-swapped
    ("981062407857595493F0", "8901260487759545390"),  # swapped with F padding
    ("898603b8640220133897", "898603B8640220133897"),  # hex from the 7th char, upper-cased
    ("898604a9161990026012", "898604A9161990026012"),
])
def test_iccid_normalisation(raw, iccid):
    assert p.normalise_iccid(raw) == iccid


@pytest.mark.parametrize("raw", [
    "8986031864022013", "898603186402201338971234", "12345678901234567890", "89A60318640220133897",
    "8986031864022013389G", "89860b18640220133897", "9868308146201031339", "",
])
def test_iccid_rejects(raw):
    with pytest.raises(ParseError):
        p.normalise_iccid(raw)


@pytest.mark.parametrize("lines,tag,iccid", [
    (["+QCCID: 89860318640220133897"], "+QCCID", "89860318640220133897"),
    (["+ICCID: 8901260487759545390F"], "+ICCID:", "8901260487759545390"),
    (['+CCID: "89860318640220133897"'], "+CCID:", "89860318640220133897"),
    (["^ICCID: 98683081462002313398"], "^ICCID", "89860318640220133389"),
    (["#CCID: 89860318640220133897"], "#CCID", "89860318640220133897"),
    (['$MYCCID: "89860318640220133897"'], "$MYCCID", "89860318640220133897"),
    (["89860318640220133897"], "+QCCID:", "89860318640220133897"),  # firmware that drops the tag
    (['+SQNCCID: "8901260852290270222",""'], "+SQNCCID:", "8901260852290270222"),  # ICCID, operator
    (["%XICCID: 8944501611212321532F"], "%XICCID:", "8944501611212321532"),
    (["!ICCID: 89860318640220133897"], "!ICCID:", "89860318640220133897"),
    (["^SCID: 89860318640220133897"], "^SCID:", "89860318640220133897"),
    (["+ZGETICCID: 89860042190733578148"], "+ZGETICCID:", "89860042190733578148"),
])
def test_vendor_iccid(lines, tag, iccid):
    assert p.parse_iccid(lines, tag) == iccid


def test_crsm_iccid():
    assert p.parse_crsm_iccid(['+CRSM: 144,0,"98683081462002313398"']) == "89860318640220133389"
    with pytest.raises(ParseError):
        p.parse_crsm_iccid(['+CRSM: 148,4,""'])


def test_imsi():
    assert p.parse_imsi(["460001234567890"]) == "460001234567890"
    assert p.parse_imsi(['+CIMI: "460001234567890"']) == "460001234567890"
    with pytest.raises(ParseError):
        p.parse_imsi(["ERROR?"])


@pytest.mark.parametrize("line,mode,name,tech", [
    ('+COPS: 0,0,"CHINA MOBILE",7', 0, "CHINA MOBILE", "lte"),
    ('+COPS: 0,2,"46000",7', 0, "46000", "lte"),
    ("+COPS: 0", 0, None, "unknown"),
    ('+COPS: 1,1,"CMCC"', 1, "CMCC", "unknown"),
    ('+COPS: 0,0,"T-Mobile",12', 0, "T-Mobile", "nr5g"),
])
def test_cops(line, mode, name, tech):
    op = p.parse_cops([line])
    assert (op.mode, op.name, op.access_tech) == (mode, name, tech)


def test_cfun_cgatt():
    assert p.parse_cfun(["+CFUN: 4"]) == 4
    assert p.parse_cfun(["+CFUN: 1,0"]) == 1
    assert p.parse_cgatt(["+CGATT: 1"]) is True
    assert p.parse_cgatt(["+CGATT: 0"]) is False
    with pytest.raises(ParseError):
        p.parse_cfun(["OK"])


def test_info_and_ati():
    assert p.parse_info_value(["Quectel"], "+CGMI") == "Quectel"
    assert p.parse_info_value(['+CGMI: "SIMCOM INCORPORATED"'], "+CGMI") == "SIMCOM INCORPORATED"
    assert p.parse_info_value(["+GMR: LX265V05, 50571"], "+CGMR") == "LX265V05, 50571"
    ati = p.parse_ati(["Quectel", "EC25", "Revision: EC25EFAR06A06M4G"])
    assert ati == p.AtiInfo("Quectel", "EC25", "EC25EFAR06A06M4G")
    # MM Huawei E1550 ATI
    ati = p.parse_ati(["Manufacturer: huawei", "Model: E1550", "Revision: 11.608.09.01.21",
                       "IMEI: 235012412595195", "+GCAP: +CGSM,+FCLASS,+DS"])
    assert ati == p.AtiInfo("huawei", "E1550", "11.608.09.01.21")


def test_network_time():
    t = p.parse_network_time('+CTZE: "+32",0,"2024/01/02,11:04:05"')  # local time
    assert t.utc_offset_minutes == 480 and t.dst == 0
    assert t.time == datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert t.time.utcoffset() == timedelta(hours=8)
    t = p.parse_network_time('+CTZEU: "+32",0,"2024/01/02,03:04:05"')  # universal time
    assert t.time == datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc) and t.utc_offset_minutes == 480
    t = p.parse_network_time('+CCLK: "24/01/02,11:04:05+32"')
    assert t.time == datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    t = p.parse_network_time('+CCLK: "24/01/02,11:04:05-08"')
    assert t.utc_offset_minutes == -120
    assert p.parse_network_time("+CTZV: +32").utc_offset_minutes == 480
    t = p.parse_network_time("+CTZV: 24/01/02,11:04:05,+32,0")
    assert t.time == datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc) and t.dst == 0
    for bad in ('+CCLK: "garbage"', "+CTZE: x", "+CSQ: 1,1", '+CCLK: "24/13/40,11:04:05+32"'):
        with pytest.raises(ParseError):
            p.parse_network_time(bad)


@pytest.mark.parametrize("line", ['+CTZE: 122', '+CTZV: 122', '+CTZEU: "+200",0,"2026/01/01,00:00:00"', '+CTZE: "-49",0,"2026/01/01,00:00:00"'])
def test_a_time_zone_out_of_range_is_a_parse_error(line):
    """Outside input: `+CTZE: 122` raised ValueError from datetime (issue 10)."""
    with pytest.raises(ParseError, match="time zone out of range"):
        p.parse_network_time(line)


# -- hostile answers: a module (or line noise) may send anything ---------------------------------
# str.isdigit() holds for "²", which int() refuses; int() and a Unicode \d take "٤"; int() of
# thousands of digits raises. Every parser answers such a field with ParseError or "unknown",
# never another exception, and no value it returns is unbounded or made of non-ASCII digits.
ARABIC_IMEI = "٨٦٤٥٠٥٠٤٠٠٠٠٠١٣"


@pytest.mark.parametrize("parse", [
    lambda: p.normalise_iccid("89٤٤٤٤1111111111111"),
    lambda: p.parse_imei(ARABIC_IMEI),
    lambda: p.parse_imei(f'+CGSN: "{ARABIC_IMEI}"'),
    lambda: p.parse_imsi("٤٦٠٠١١٢٣٤٥٦٧٨٩"),
    lambda: p.parse_csq("+CSQ: ٢٠,99"),
    lambda: p.parse_csq("+CSQ: " + "9" * 5000 + ",99"),
    lambda: p.parse_cfun("+CFUN: ²"),
    lambda: p.parse_network_time('+CTZE: "+٣٢",0,"2026/11/29,10:00:00"'),
    lambda: p.parse_network_time('+CCLK: "26/11/29,1٠:00:00+32"'),
], ids=["iccid", "imei", "tagged imei", "imsi", "csq digits", "csq huge", "cfun", "ctze zone", "cclk"])
def test_non_ascii_or_unbounded_numbers_are_a_parse_error(parse):
    with pytest.raises(ParseError):
        parse()


def test_an_access_technology_that_is_no_number_reads_unknown():
    assert p.parse_cops('+COPS: 0,0,"OP",²') == p.parse_cops('+COPS: 0,0,"OP",x')
    assert p.parse_cops('+COPS: 0,0,"OP",²').access_tech == "unknown"
    assert p.parse_registration('+CEREG: 2,1,"00A1","01A2D001",²').access_tech == "unknown"
    assert p.parse_registration('+CREG: 2,²,"8BE3","2B5D"').unsolicited  # "²" is no <stat>: not an <n>,<stat> answer


def test_an_absurd_area_or_cell_code_is_left_out_not_published():
    reg = p.parse_registration('+CEREG: 2,1,"' + "F" * 4000 + '","01A2D001",7')
    assert (reg.lac, reg.cell_id) == (None, 0x01A2D001)
    json.dumps({"lac": reg.lac, "cell_id": reg.cell_id})  # an int of 4,800 digits would raise here
    assert p.parse_registration('+CEREG: 2,1,"00A1","٠١",7').cell_id is None
