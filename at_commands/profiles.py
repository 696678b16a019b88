"""Vendor profiles: what we know about each module family, as data.

Modelled on ModemManager's plugins: a profile declares how to find the module (USB IDs
and AT interface numbers, vendor strings), how to read its ICCID, how it announces SIM
hot-swap and boot, and which commands must never be sent (IMEI rewrite). Code that
needs vendor knowledge reads it from here; it does not branch on vendor names. The fake
modem (simagent_lab.fakemodem) speaks each dialect from the same data.

Sources (cited per entry below):
  [MM-Q]  ModemManager src/plugins/quectel/77-mm-quectel-port-types.rules
  [MM-S]  ModemManager src/plugins/simtech/77-mm-simtech-port-types.rules
  [MM-T]  ModemManager src/plugins/telit/77-mm-telit-port-types.rules
  [MM-U]  ModemManager src/plugins/ublox/77-mm-ublox-port-types.rules
  [MM-F]  ModemManager src/plugins/fibocom/77-mm-fibocom-port-types.rules
  [MM-M]  ModemManager src/plugins/meig/77-mm-meig-port-types.rules (MeiG SLM770A, as
          carried by trackIT-Systems/modemmanager-meig-asr)
  [LNX]   Linux drivers/usb/serial/option.c device table (MeiG 2dee:4d22, Neoway 2949:8700)
  [QAT]   Quectel EC2x/EG2x AT manuals: AT+QCCID, AT+QSIMDET, AT+QSIMSTAT, RDY, +QIND
  [SAT]   SIMCom SIM7500/SIM7600 AT manual: AT+CICCID (+ICCID:), AT+UIMHOTSWAPON,
          +SIMCARD: NOT AVAILABLE, RDY / SMS DONE / PB DONE, AT+SIMEI
  [HAT]   Huawei ME909s AT command interface spec: AT^ICCID?, ^SIMST, ^SYSSTART, AT^CIMEI
  [TAT]   Telit AT reference (LE910 / ME910): AT#CCID, AT#SIMDET, AT#QSS / #QSS: URC
          (also used by oFono's telit plugin), AT#IMEI
  [UAT]   u-blox AT manual: AT+CCID, AT+UDCONF=50 (SIM hot insertion), AT+USIMSTAT /
          +UUSIMSTAT, +READY (TOBY-L4, see [MM-U])
  [NAT]   Neoway N720/N723 AT manual: AT$MYCCID
  [MM-SW] ModemManager src/plugins/sierra/77-mm-sierra.rules (1199:9071, 1199:9091: if#3
          AT primary) and src/plugins/sierra/mm-sim-sierra.c (AT!ICCID?, "!ICCID:" answer)
  [MM-C]  ModemManager src/plugins/cinterion/77-mm-cinterion-port-types.rules (PLS8
          1e2d:0061, PLS62 1e2d:005b: if#0 AT primary, if#2 AT secondary)
  [CAT]   Cinterion/Thales AT command sets (PLS8, PLS62, ELS61): AT^SCID (^SCID:),
          AT^SCKS=1 / ^SCKS: <state> (0 = card removed, 1 = inserted), ^SYSSTART at boot
  [NRF]   Nordic nRF91 AT Commands Reference: %XICCID (the raw ICCID, F-padded to 20),
          %XSIM=1 / %XSIM: <state> (0 = UICC not initialised, 1 = ready), +CESQ; no +CSQ.
          Field code reading it: "%XICCID: 8944501611212321532F"
  [ZTE]   ZTE ME3630 AT manual: AT+ZGETICCID (+ZGETICCID: <iccid>; ERROR without a card),
          as read by field drivers
  [SQN]   Sequans Monarch (GM01Q / Monarch 2) AT manual: AT+SQNCCID ->
          +SQNCCID: "<iccid>","<operator>" (field capture: +SQNCCID: "8901260852290270222","")
  [3GPP]  3GPP TS 27.007 (each command's "Test command" row) and TS 27.005 (+CNMI): the
          syntax, with the values the fake implements (a subset of 27.007's). Every
          profile answers these where no vendor line below is cited: the other vendor
          ranges are not yet confirmed against the manuals.
  [QAT-T] Quectel EC25&EC21 AT Commands Manual V1.3, the "Test Command" rows
          (+CTZU: (0,1,3) also in the Quectel LTE Standard AT manual §6.6; +CNMI's
          range as Quectel documents it is also quoted in gammu's test vectors)
  [MM-CTZU] ModemManager src/mm-modem-helpers.c mm_parse_ctzu_test_response(): a
          +CTZU test answer it parses is "+CTZU: (0,1)" or "+CTZU: (0,1,3)"
Where a fact could not be confirmed the field is left empty/None and the reason is in
``notes``: the agent then falls back to 3GPP behaviour (+CRSM for the ICCID, polling
+CPIN? for SIM presence).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# 27.007 §8.33 READ BINARY of EF_ICCID (2FE2 = 12258): every 3GPP module answers it, so
# it ends every profile's ICCID commands (the generic profile has only this one).
CRSM_READ_ICCID = "AT+CRSM=176,12258,0,0,10"
CRSM_TAG = "+CRSM:"


@dataclass(frozen=True)
class UrcRule:
    """One row of a URC table: a line matching ``pattern`` (case-insensitive) means
    ``kind`` (``sim_inserted``, ``sim_removed`` or ``boot``). ``follows_radio`` marks a
    27.007 SIM report a module also prints when its own radio changes (``+CPIN: READY``
    after +CFUN=1): it may be the same card coming back, not a swap."""

    pattern: str
    kind: str
    follows_radio: bool = False


# 27.007 +CPIN reports, recognised whatever the profile (the generic profile's table).
STANDARD_URC_RULES: tuple[UrcRule, ...] = (
    UrcRule(r"^\+CPIN:\s*NOT READY$", "sim_removed", follows_radio=True),
    UrcRule(r"^\+CPIN:\s*NOT INSERTED$", "sim_removed"),
    UrcRule(r"^\+CPIN:\s*READY$", "sim_inserted", follows_radio=True),
)
# Unsolicited lines of modules no profile describes yet, seen in the field (vendor
# manuals, ModemManager's test vectors): lines starting with these are never taken for
# a command's answer. The profiles add their own (``Profile.urc_prefixes``).
UNPROFILED_URC_PREFIXES: tuple[str, ...] = (
    "+ICCID_CHANGED", "+STIN:", "+MATREADY", "*ATREADY", "+PBREADY", "+PACSP",
)
UNPROFILED_URC_WORDS: tuple[str, ...] = ("CALL READY", "SMS READY", "SIM READY", "POWERED DOWN",
                                         "NORMAL POWER DOWN")


@dataclass(frozen=True)
class TestForm:
    """What a module answers to ``AT<command>=?``: the information lines before ``OK``
    (none: a bare ``OK``, as 27.007 gives for +CPIN=? and +CIMI=?), and where that range
    comes from."""

    command: str
    lines: tuple[str, ...]
    source: str


def _forms(source: str, table: dict[str, tuple[str, ...]]) -> tuple[TestForm, ...]:
    return tuple(TestForm(command, lines, source) for command, lines in table.items())


# 27.007 / 27.005 test forms of every command the fake modem implements ([3GPP]); the
# ranges are the ones the fake accepts. A profile lists the vendor's own lines in
# ``test_forms``; a command it does not list answers this table's line.
STANDARD_TEST_FORMS: tuple[TestForm, ...] = _forms("[3GPP]", {
    "+CGMI": (), "+GMI": (), "+CGMM": (), "+GMM": (), "+CGMR": (), "+GMR": (),
    "+CGSN": ("+CGSN: (0-3)",), "+GSN": (), "+CIMI": (), "+CPIN": (), "+CNUM": (), "+GCAP": (),
    "+CCID": (), "+CRSM": (), "+CSIM": (),
    "+CMEE": ("+CMEE: (0-2)",),
    "+CSQ": ("+CSQ: (0-31,99),(0-7,99)",),
    "+CESQ": ("+CESQ: (0-63,99),(0-7,99),(0-96,255),(0-49,255),(0-34,255),(0-97,255)",),
    "+CREG": ("+CREG: (0-2)",), "+CGREG": ("+CGREG: (0-2)",), "+CEREG": ("+CEREG: (0-2)",),
    "+COPS": (),  # a network search: the operator list is built from the fake's state
    "+CFUN": ("+CFUN: (0,1,4),(0-1)",),
    "+CGATT": ("+CGATT: (0-1)",),
    "+CTZU": ("+CTZU: (0,1)",),
    "+CTZR": ("+CTZR: (0-2)",),
    "+CCLK": (),
    "+WS46": ("+WS46: (12,22,25,28,29,30,31)",),
    "+CSCS": ('+CSCS: ("GSM","IRA","UCS2")',),
    "+CLCK": ('+CLCK: ("SC","AO","OI","OX","AI","IR","AB","AG","AC","PN","PU","PP","PC","FD")',),
    "+CGDCONT": ('+CGDCONT: (1-15),"IP",,,(0-2),(0-4)', '+CGDCONT: (1-15),"IPV6",,,(0-2),(0-4)',
                 '+CGDCONT: (1-15),"IPV4V6",,,(0-2),(0-4)'),
    "+CUSD": ("+CUSD: (0-2)",),
    "+CNMI": ("+CNMI: (0-2),(0-3),(0,2),(0-2),(0,1)",),
    "+CPOL": ("+CPOL: (1-40),(0-2)",),
    "+CPLS": ("+CPLS: (0-2)",),
    "+CEMODE": ("+CEMODE: (0-3)",),
})


@dataclass(frozen=True)
class UsbLayout:
    """One USB composition: VID:PID and which interface numbers carry AT ports."""

    vid: int
    pid: int
    primary_if: int
    secondary_if: int | None = None
    model: str = ""
    source: str = ""

    @property
    def id(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}"


# MediaTek-style NV write of the IMEI (+EGMR=1,7): answered by Quectel, Fibocom, MeiG
# and many white-label modules, so every profile refuses it.
_EGMR_IMEI = r"^AT\+EGMR\s*=\s*1\s*,\s*7\b"

@dataclass(frozen=True)
class Profile:
    name: str
    # Regexes (case-insensitive) matched against +CGMI / ATI output for auto-detection.
    vendor_patterns: tuple[str, ...] = ()
    usb: tuple[UsbLayout, ...] = ()
    # Vendor ICCID query and the tag its answer carries (e.g. SIMCom AT+CICCID -> +ICCID:).
    # None: use +CRSM=176,12258,0,0,10 (EF_ICCID), which every 3GPP module answers.
    iccid_command: str | None = None
    iccid_tag: str | None = None
    # How the module prints its ICCID answer (what the fake serves): {tag} the tag above,
    # {iccid} the ICCID, {iccid_f} the ICCID padded with F to 20 characters.
    iccid_answer: str = "{tag} {iccid}"
    # 27.007 commands the module does not implement (it answers ERROR), e.g. nRF91's +CSQ.
    unsupported: tuple[str, ...] = ()
    # Commands that switch on SIM hot-swap reporting, and regexes of the URCs that
    # report insertion / removal. Without hot-swap URCs the agent polls +CPIN?.
    # Empty hotswap_enable with URCs set means the module reports them unasked.
    hotswap_enable: tuple[str, ...] = ()
    sim_inserted_urcs: tuple[str, ...] = ()
    sim_removed_urcs: tuple[str, ...] = ()
    # One concrete URC line each for insertion and removal (what the fake modem prints;
    # the profile test checks they match the regexes above).
    sim_inserted_sample: str | None = None
    sim_removed_sample: str | None = None
    # URCs a module prints when it has (re)booted and is ready for commands (regexes),
    # the concrete lines it prints at boot, and those it adds once a SIM is ready.
    boot_urcs: tuple[str, ...] = ()
    boot_lines: tuple[str, ...] = ()
    boot_sim_lines: tuple[str, ...] = ()
    # Regexes of commands that rewrite the IMEI: always refused, whoever asks.
    imei_rewrite_commands: tuple[str, ...] = (_EGMR_IMEI,)
    # Commands that make the module boot with RF off (None: no known way).
    boot_rf_off: tuple[str, ...] | None = None
    # The +CFUN level the module is in after power-on.
    boot_cfun: int = 1
    extra_signal_commands: tuple[str, ...] = ()
    # Other unsolicited lines the module prints (tags and whole-line words): never taken
    # for a command's answer, whichever command is pending.
    urc_prefixes: tuple[str, ...] = ()
    urc_words: tuple[str, ...] = ()
    echo_default: bool = True
    # What the module answers to +CGMI / +CGMM / +CGMR (used by the fake modem; detect()
    # must map sample_manufacturer back to this profile).
    sample_manufacturer: str = ""
    sample_model: str = ""
    sample_revision: str = ""
    # The vendor's own answers to test forms (cited per entry), over STANDARD_TEST_FORMS;
    # the overall capabilities (+GCAP) and the <n>s of +WS46's test form it reports.
    test_forms: tuple[TestForm, ...] = ()
    gcap: str = "+GCAP: +CGSM"
    notes: str = ""

    def matches_vendor(self, text: str) -> bool:
        return any(re.search(p, text, re.IGNORECASE) for p in self.vendor_patterns)

    @property
    def iccid_commands(self) -> tuple[tuple[str, str], ...]:
        """How this module's ICCID is read, in order: (command, tag of its answer). The
        vendor's own command first, then 27.007's +CRSM read of EF_ICCID."""
        own = ((self.iccid_command, self.iccid_tag),) if self.iccid_command and self.iccid_tag else ()
        return own + ((CRSM_READ_ICCID, CRSM_TAG),)

    @property
    def urc_rules(self) -> tuple[UrcRule, ...]:
        """This module's URC table: 27.007's +CPIN reports (first: a vendor that also
        declares one, as SIMCom does +CPIN: READY, gets the standard meaning), then its
        own SIM and boot URCs."""
        return (STANDARD_URC_RULES
                + tuple(UrcRule(p, "sim_removed") for p in self.sim_removed_urcs)
                + tuple(UrcRule(p, "sim_inserted") for p in self.sim_inserted_urcs)
                + tuple(UrcRule(p, "boot") for p in self.boot_urcs))

    @property
    def reports_sim_changes(self) -> bool:
        """True when the module announces both SIM changes and its own reboots by URC.
        Otherwise SIM presence is polled: a module without boot URCs loses its hot-swap
        reporting in a silent reset."""
        return bool((self.sim_removed_urcs or self.sim_inserted_urcs) and self.boot_urcs)

    def is_imei_rewrite(self, command: str) -> bool:
        return any(re.search(p, command.strip(), re.IGNORECASE) for p in self.imei_rewrite_commands)

    def iccid_line(self, iccid: str) -> str | None:
        """The module's answer line to its own ICCID command (None: it has none)."""
        if not self.iccid_command:
            return None
        return self.iccid_answer.format(tag=self.iccid_tag, iccid=iccid, iccid_f=iccid.ljust(20, "F"))

    def test_form(self, command: str) -> TestForm | None:
        """The answer to ``AT<command>=?`` (``command`` like ``+CTZU``): the vendor's
        line, else 27.007's; None when the module does not implement the command."""
        if command in self.unsupported:
            return None
        for form in (*self.test_forms, *STANDARD_TEST_FORMS):
            if form.command == command:
                return form
        return None

    def layout_for(self, vid: int, pid: int) -> UsbLayout | None:
        return next((u for u in self.usb if u.vid == vid and u.pid == pid), None)



GENERIC = Profile(
    name="generic",
    imei_rewrite_commands=(_EGMR_IMEI,),
    sample_manufacturer="Generic",
    sample_model="3GPP TS 27.007 modem",
    sample_revision="FAKE-1.0",
    notes="3GPP TS 27.007 only: ICCID via +CRSM, SIM presence by polling +CPIN?, "
    "no boot URC; +CFUN=4 is not persistent, so the module boots with RF on.",
)

QUECTEL = Profile(
    name="quectel",
    vendor_patterns=(r"\bquectel\b",),
    usb=tuple(
        UsbLayout(0x2C7C, pid, 2, 3, model, "[MM-Q] if#2 AT primary, if#3 AT secondary")
        for pid, model in (
            (0x0125, "EC25/EG25/EC20 R2.1"),
            (0x0121, "EC21"),
            (0x0191, "EG91"),
            (0x0195, "EG95"),
            (0x0296, "BG96"),
            (0x0306, "EG06/EP06"),
            (0x0512, "EG12/EG18"),
            (0x0800, "RM500Q/RM502Q"),
        )
    ),
    iccid_command="AT+QCCID",
    iccid_tag="+QCCID:",
    # [QAT] QSIMDET=<enable>,<insert_level>: detection on, card present when the detect
    # pin is low (the usual socket wiring; boards wired the other way need =1,1).
    hotswap_enable=("AT+QSIMDET=1,0", "AT+QSIMSTAT=1"),
    sim_inserted_urcs=(r"^\+QSIMSTAT:\s*1\s*,\s*1\b",),
    sim_removed_urcs=(r"^\+QSIMSTAT:\s*1\s*,\s*0\b",),
    sim_inserted_sample="+QSIMSTAT: 1,1",
    sim_removed_sample="+QSIMSTAT: 1,0",
    boot_urcs=(r"^RDY$",),
    boot_lines=("RDY",),
    boot_sim_lines=("+CPIN: READY", "+QUSIM: 1", "+QIND: SMS DONE", "+QIND: PB DONE"),
    imei_rewrite_commands=(_EGMR_IMEI,),
    boot_rf_off=None,
    extra_signal_commands=("AT+QCSQ", 'AT+QENG="servingcell"'),
    urc_prefixes=("+QIND:", "+QUSIM:", "+QSIMSTAT:"),
    urc_words=("RDY",),
    sample_manufacturer="Quectel",
    sample_model="EC25",
    sample_revision="EC25EFAR06A06M4G",
    test_forms=(
        # [QAT-T] and [MM-CTZU]: 3 = update the RTC as well; a bare OK crashed MM 1.20.
        TestForm("+CTZU", ("+CTZU: (0,1,3)",), "[QAT-T] +CTZU test command; [MM-CTZU]"),
        TestForm("+CNMI", ("+CNMI: (0-2),(0-3),(0,2),(0-2),(0,1)",), "[QAT-T] +CNMI test command"),
    ),
    notes="AT+CFUN=4 is not kept across power cycles; no documented NV setting to boot "
    "with RF off, so a window exists between RDY and the agent's CFUN=4.",
)

SIMCOM = Profile(
    name="simcom",
    vendor_patterns=(r"\bsim\s?com", r"\bsimtech\b"),
    usb=(
        UsbLayout(0x1E0E, 0x9001, 2, 3, "SIM7000/SIM7100/SIM7600", "[MM-S] if#2 primary, if#3 secondary"),
        UsbLayout(0x1E0E, 0x9205, 2, None, "SIM7070/SIM7080/SIM7090", "[MM-S] if#2 primary, if#3 PPP"),
        UsbLayout(0x1E0E, 0x9206, 2, None, "SIM7070/SIM7080/SIM7090 alt", "[MM-S] if#2 primary"),
        UsbLayout(0x1E0E, 0x9011, 4, None, "A7600E-H/A7602E-H", "[MM-S] if#4 primary, if#5 PPP"),
    ),
    iccid_command="AT+CICCID",
    iccid_tag="+ICCID:",
    hotswap_enable=("AT+UIMHOTSWAPON=1",),
    # [SAT] on insertion the module re-initialises the card and reports +CPIN: READY.
    sim_inserted_urcs=(r"^\+CPIN:\s*READY$",),
    sim_removed_urcs=(r"^\+SIMCARD:\s*NOT AVAILABLE$",),
    sim_inserted_sample="+CPIN: READY",
    sim_removed_sample="+SIMCARD: NOT AVAILABLE",
    boot_urcs=(r"^RDY$", r"^PB DONE$"),
    boot_lines=("RDY",),
    boot_sim_lines=("+CPIN: READY", "SMS DONE", "PB DONE"),
    imei_rewrite_commands=(_EGMR_IMEI, r"^AT\+SIMEI\s*="),
    boot_rf_off=None,
    extra_signal_commands=("AT+CPSI?",),
    urc_prefixes=("+SIMCARD:",),
    urc_words=("RDY", "SMS DONE", "PB DONE"),
    sample_manufacturer="SIMCOM INCORPORATED",
    sample_model="SIMCOM_SIM7600G-H",
    sample_revision="LE20B04SIM7600G22",
    notes="CFUN=0 powers the card down and prints +SIMCARD: NOT AVAILABLE. No known "
    "persistent RF-off boot setting.",
)

HUAWEI = Profile(
    name="huawei",
    vendor_patterns=(r"\bhuawei\b",),
    usb=(
        # MM's huawei plugin finds PCUI/modem ports from interface descriptors, not
        # fixed numbers; these are the numbers commonly reported for the default
        # (ECM) configuration: ttyUSB2 = PCUI. Not verified on hardware.
        UsbLayout(0x12D1, 0x15C1, 2, 0, "ME909s-120/ME906s", "community reports; unverified"),
    ),
    iccid_command="AT^ICCID?",
    iccid_tag="^ICCID:",
    # [HAT] ^SIMST: <sim_state>[,<lock_state>] is unsolicited by default: 255 = no card,
    # 1 = valid card, 0 = invalid, 2..4 = invalid for CS/PS.
    hotswap_enable=(),
    sim_inserted_urcs=(r"^\^SIMST:\s*(?:1|2|3|4)\b",),
    sim_removed_urcs=(r"^\^SIMST:\s*255\b",),
    sim_inserted_sample="^SIMST: 1",
    sim_removed_sample="^SIMST: 255",
    boot_urcs=(r"^\^SYSSTART$",),
    boot_lines=("^SYSSTART",),
    imei_rewrite_commands=(_EGMR_IMEI, r"^AT\^CIMEI\s*="),
    boot_rf_off=None,
    extra_signal_commands=("AT^HCSQ?",),
    urc_prefixes=("^SIMST:", "^SRVST:", "^MODE:", "^RSSI:", "^HCSQ:", "^SYSSTART"),
    sample_manufacturer="Huawei Technologies Co., Ltd.",
    sample_model="ME909s-120",
    sample_revision="11.617.01.00.00",
    notes="USB interface numbers unverified. No known persistent RF-off boot setting.",
)

UBLOX = Profile(
    name="ublox",
    vendor_patterns=(r"\bu-?blox\b",),
    usb=(
        UsbLayout(0x1546, 0x1107, 0, 2, "TOBY-R2", "[MM-U] if#0 primary, if#2 secondary"),
        UsbLayout(0x1546, 0x110A, 0, 2, "LARA-R2", "[MM-U] if#0 primary, if#2 secondary"),
        UsbLayout(0x1546, 0x1102, 0, 2, "LISA-U2/SARA-U2", "[MM-U] if#0 primary, if#2 secondary"),
        UsbLayout(0x1546, 0x1104, 0, None, "LISA-U2/SARA-U2 alt", "[MM-U] if#0 primary"),
        UsbLayout(0x1546, 0x1010, 6, None, "TOBY-L4", "[MM-U] if#6 primary (if#2 ignored)"),
    ),
    iccid_command="AT+CCID",
    iccid_tag="+CCID:",
    # [UAT] UDCONF=50,1 turns SIM hot insertion detection on (takes effect after reboot
    # on some series); USIMSTAT=1 enables +UUSIMSTAT: <state>, 0 = card not present.
    hotswap_enable=("AT+UDCONF=50,1", "AT+USIMSTAT=1"),
    sim_inserted_urcs=(r"^\+UUSIMSTAT:\s*(?!0\b)\d+",),
    sim_removed_urcs=(r"^\+UUSIMSTAT:\s*0\b",),
    sim_inserted_sample="+UUSIMSTAT: 6",
    sim_removed_sample="+UUSIMSTAT: 0",
    # [MM-U] TOBY-L4 announces readiness with +READY; other series print nothing unless
    # the greeting (+CSGT) is configured.
    boot_urcs=(r"^\+READY$",),
    boot_lines=("+READY",),
    imei_rewrite_commands=(_EGMR_IMEI,),
    boot_rf_off=None,
    extra_signal_commands=("AT+UCGED?",),
    urc_prefixes=("+UUSIMSTAT:", "+READY"),
    sample_manufacturer="u-blox",
    sample_model="TOBY-L4006",
    sample_revision="15.90",
    notes="Whether +CFUN=4 survives a reboot differs per series and firmware; not relied on.",
)

TELIT = Profile(
    name="telit",
    vendor_patterns=(r"\btelit\b",),
    usb=(
        UsbLayout(0x1BC7, 0x1031, 1, 2, "LE910C1-EUX", "[MM-T] if#1 primary, if#2 secondary"),
        UsbLayout(0x1BC7, 0x1201, 4, 5, "LE910C1", "[MM-T] if#4 primary, if#5 secondary"),
        UsbLayout(0x1BC7, 0x1040, 4, 5, "LE922/LM9x0", "[MM-T] if#4 primary, if#5 secondary"),
        UsbLayout(0x1BC7, 0x1050, 4, 5, "FN980", "[MM-T] if#4 primary, if#5 secondary"),
        UsbLayout(0x1BC7, 0x1070, 4, 5, "FN990", "[MM-T] if#4 primary, if#5 secondary"),
    ),
    iccid_command="AT#CCID",
    iccid_tag="#CCID:",
    # [TAT] SIMDET=2: automatic SIMIN-pin detection; QSS=2: #QSS: <status> URC with
    # 0 = not inserted, 1 = inserted, 2 = inserted and PIN unlocked, 3 = ready.
    hotswap_enable=("AT#SIMDET=2", "AT#QSS=2"),
    sim_inserted_urcs=(r"^#QSS:\s*[123]\b",),
    sim_removed_urcs=(r"^#QSS:\s*0\b",),
    sim_inserted_sample="#QSS: 1",
    sim_removed_sample="#QSS: 0",
    boot_urcs=(),
    imei_rewrite_commands=(_EGMR_IMEI, r"^AT#IMEI\s*="),
    boot_rf_off=None,
    extra_signal_commands=("AT#RFSTS",),
    urc_prefixes=("#QSS:",),
    sample_manufacturer="Telit",
    sample_model="LE910C1-EUX",
    sample_revision="25.21.660",
    notes="No boot URC by default (the agent probes with AT after enumeration).",
)

FIBOCOM = Profile(
    name="fibocom",
    vendor_patterns=(r"\bfibocom\b",),
    usb=(
        UsbLayout(0x2CB7, 0x01A0, 2, 3, "NL668-AM", "[MM-F] if#2 primary, if#3 secondary"),
        UsbLayout(0x2CB7, 0x0104, 1, 2, "FM150", "[MM-F] if#1 primary, if#2 secondary"),
        UsbLayout(0x2CB7, 0x01A2, 2, 3, "FM101-GL (MBIM)", "[MM-F] if#2 primary, if#3 secondary"),
        UsbLayout(0x2CB7, 0x0106, 1, 2, "MA510-GL", "[MM-F] if#1 primary, if#2 secondary"),
        UsbLayout(0x1782, 0x4D10, 0, 5, "L610 (GTUSBMODE=31)", "[MM-F] if#0 primary, if#5 secondary"),
        UsbLayout(0x1782, 0x4D11, 2, 7, "L610 (ECM/RNDIS)", "[MM-F] if#2 primary, if#7 secondary"),
    ),
    # Qualcomm-based Fibocom modules answer AT+ICCID with +ICCID:; the Intel/UNISOC
    # ones use AT+CCID. +CRSM works on all.
    iccid_command="AT+ICCID",
    iccid_tag="+ICCID:",
    imei_rewrite_commands=(_EGMR_IMEI,),
    boot_rf_off=None,
    sample_manufacturer="Fibocom Wireless Inc.",
    sample_model="NL668-AM",
    sample_revision="17000.1000.00.01.01.04",
    notes="Hot-swap URCs and boot URCs not confirmed from public sources: the agent "
    "polls +CPIN?.",
)

MEIG = Profile(
    name="meig",
    vendor_patterns=(r"\bmeig\b", r"\bmeiglink\b"),
    usb=(
        UsbLayout(0x2DEE, 0x4D57, 3, 4, "SLM770A (RNDIS)", "[MM-M] if#3 AT primary, if#4 AT secondary"),
        UsbLayout(0x2DEE, 0x4D58, 3, 4, "SLM770A (ECM)", "[MM-M] if#3 AT primary, if#4 AT secondary"),
    ),
    imei_rewrite_commands=(_EGMR_IMEI,),
    boot_rf_off=None,
    sample_manufacturer="MEIG",
    sample_model="SLM770A",
    sample_revision="SLM770A_V1.0",
    notes="2dee:4d22 (SRM815/SRM825L) is bound by [LNX] but its AT interface numbers "
    "are not published; ICCID via +CRSM; SIM presence by polling.",
)

NEOWAY = Profile(
    name="neoway",
    vendor_patterns=(r"\bneoway\b",),
    iccid_command="AT$MYCCID",
    iccid_tag="$MYCCID:",
    imei_rewrite_commands=(_EGMR_IMEI,),
    boot_rf_off=None,
    sample_manufacturer="Neoway",
    sample_model="N723-EA",
    sample_revision="N723EA_V1.0",
    notes="USB 2949:8700 (N723-EA) is bound by [LNX], AT interface numbers unconfirmed, "
    "so no USB layout: use an explicit port. SIM presence by polling.",
)

SIERRA = Profile(
    name="sierra",
    vendor_patterns=(r"\bsierra\b",),
    usb=(
        UsbLayout(0x1199, 0x9071, 3, None, "MC7455/EM7455", "[MM-SW] if#3 AT primary (if#0 QCDM, if#2 GPS)"),
        UsbLayout(0x1199, 0x9091, 3, None, "EM7511/EM7565", "[MM-SW] if#3 AT primary (if#0 QCDM, if#2 GPS)"),
    ),
    iccid_command="AT!ICCID?",
    iccid_tag="!ICCID:",
    sample_manufacturer="Sierra Wireless, Incorporated",
    sample_model="MC7455",
    sample_revision="SWI9X30C_02.33.03.00",
    notes="One AT port per composition (the rest is QMI/QCDM/GPS), so simagent's port is the "
    "primary. Hot-swap and boot URCs not confirmed from public sources: SIM presence by polling. "
    "A field script greps 'ICCID:' without the '!' on some firmware; the agent's parser takes "
    "the first line then.",
)

NRF91 = Profile(
    name="nrf91",
    vendor_patterns=(r"\bnordic\b",),
    iccid_command="AT%XICCID",
    iccid_tag="%XICCID:",
    iccid_answer="{tag} {iccid_f}",
    unsupported=("+CSQ",),
    hotswap_enable=("AT%XSIM=1",),
    sim_inserted_urcs=(r"^%XSIM:\s*1\b",),
    sim_removed_urcs=(r"^%XSIM:\s*0\b",),
    sim_inserted_sample="%XSIM: 1",
    sim_removed_sample="%XSIM: 0",
    urc_prefixes=("%XSIM:",),
    sample_manufacturer="Nordic Semiconductor ASA",
    sample_model="nRF9160-SICA",
    sample_revision="mfw_nrf9160_1.3.5",
    notes="[NRF] A system-in-package on UART (no USB layout). No +CSQ: signal from +CESQ. No "
    "boot URC, so SIM presence is polled although %XSIM reports changes. The modem starts in "
    "+CFUN=0 under most application firmware; the fake boots with RF on like the others.",
)

CINTERION = Profile(
    name="cinterion",
    vendor_patterns=(r"\bcinterion\b", r"\bthales\b", r"\bgemalto\b"),
    usb=(
        UsbLayout(0x1E2D, 0x0061, 0, 2, "PLS8", "[MM-C] if#0 AT primary, if#2 AT secondary"),
        UsbLayout(0x1E2D, 0x005B, 0, 2, "PLS62 (non-MBIM)", "[MM-C] if#0 AT primary, if#2 AT secondary"),
    ),
    iccid_command="AT^SCID",
    iccid_tag="^SCID:",
    hotswap_enable=("AT^SCKS=1",),
    sim_inserted_urcs=(r"^\^SCKS:\s*1\b",),
    sim_removed_urcs=(r"^\^SCKS:\s*0\b",),
    sim_inserted_sample="^SCKS: 1",
    sim_removed_sample="^SCKS: 0",
    boot_urcs=(r"^\^SYSSTART$",),
    boot_lines=("^SYSSTART",),
    urc_prefixes=("^SCKS:", "^SYSSTART"),
    sample_manufacturer="Cinterion",
    sample_model="PLS8-E",
    sample_revision="REVISION 03.017",
    notes="[CAT] Thales (formerly Gemalto) modules still answer +CGMI with Cinterion.",
)

ZTE = Profile(
    name="zte",
    vendor_patterns=(r"\bzte\b",),
    iccid_command="AT+ZGETICCID",
    iccid_tag="+ZGETICCID:",
    sample_manufacturer="ZTE CORPORATION",
    sample_model="ME3630",
    sample_revision="ME3630E1CV1.0B11",
    notes="[ZTE] The ME3630's AT interface numbers are not in ModemManager's ZTE rules: no USB "
    "layout, use an explicit port. Hot-swap and boot URCs not documented: polling.",
)

SEQUANS = Profile(
    name="sequans",
    vendor_patterns=(r"\bsequans\b",),
    iccid_command="AT+SQNCCID",
    iccid_tag="+SQNCCID:",
    iccid_answer='{tag} "{iccid}",""',
    sample_manufacturer="SEQUANS Communications",
    sample_model="GM01Q",
    sample_revision="UE6.0.0.0",
    notes="[SQN] A UART module (no USB layout). Boot and SIM URCs not confirmed: polling.",
)

PROFILES: dict[str, Profile] = {
    p.name: p for p in (GENERIC, QUECTEL, SIMCOM, FIBOCOM, HUAWEI, UBLOX, TELIT, NEOWAY, MEIG,
                        SIERRA, NRF91, CINTERION, ZTE, SEQUANS)
}


def get(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown modem profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None


def urc_rules_for(profile: Profile) -> tuple[UrcRule, ...]:
    """The URC table the agent applies: the profile's own; for the generic profile (no
    vendor known) every profile's, so a vendor's SIM and boot URCs are still seen."""
    if profile is not GENERIC:
        return profile.urc_rules
    return tuple(dict.fromkeys(rule for p in PROFILES.values() for rule in p.urc_rules))


def known_urc_patterns() -> tuple[str, ...]:
    """Regexes of every unsolicited line any profile declares (its URC table, its other
    URC tags and words) and of those of unprofiled modules: the protocol core never
    takes such a line for a command's answer, before or after the profile is known."""
    patterns = [rule.pattern for p in PROFILES.values() for rule in p.urc_rules]
    prefixes = [x for p in PROFILES.values() for x in p.urc_prefixes] + list(UNPROFILED_URC_PREFIXES)
    words = [x for p in PROFILES.values() for x in p.urc_words] + list(UNPROFILED_URC_WORDS)
    patterns += ["^" + re.escape(prefix) for prefix in prefixes]
    patterns += ["^" + re.escape(word) + "$" for word in words]
    return tuple(dict.fromkeys(patterns))


def detect(vendor_text: str) -> Profile:
    """The profile whose vendor pattern matches +CGMI / ATI output; generic otherwise."""
    for profile in PROFILES.values():
        if profile.vendor_patterns and profile.matches_vendor(vendor_text):
            return profile
    return GENERIC


def by_usb(vid: int, pid: int) -> tuple[Profile, UsbLayout] | None:
    """The profile and USB layout for a VID:PID, or None when no profile knows it."""
    for profile in PROFILES.values():
        layout = profile.layout_for(vid, pid)
        if layout is not None:
            return profile, layout
    return None
