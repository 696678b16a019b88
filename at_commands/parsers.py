"""Typed, pure parsers for AT responses (3GPP TS 27.007 / V.250 and common vendor forms).

Every function takes response text (the intermediate lines of one command, or one URC
line) and returns a value or raises ``ParseError``. No I/O, no state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable, Sequence


class ParseError(ValueError):
    """A response did not have the expected form."""


# --------------------------------------------------------------------------- helpers

def _fields(payload: str) -> list[str]:
    """Comma-separated fields, spaces and quotes stripped (quotes never hold commas in
    the responses we parse)."""
    return [f.strip().strip('"').strip() for f in payload.split(",")]


def _tagged(lines: Iterable[str] | str, *tags: str) -> str | None:
    """The payload after the first line carrying one of ``tags`` (``+CSQ`` matches
    ``+CSQ:``, ``+CSQ :``, ``+csq:``)."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    for line in lines:
        text = line.strip()
        for tag in tags:
            if text.upper().startswith(tag.upper()):
                rest = text[len(tag):].lstrip()
                if rest.startswith(":"):
                    return rest[1:].strip()
    return None


def _require(lines: Iterable[str] | str, *tags: str) -> str:
    payload = _tagged(lines, *tags)
    if payload is None:
        raise ParseError(f"no {'/'.join(tags)} line in {lines!r}")
    return payload


_NUMBER = re.compile(r"[+-]?[0-9]{1,9}")  # a field of an AT answer; int() alone would take "٤", "1_0" and 5,000 digits


def _int(text: str, what: str) -> int:
    if not _NUMBER.fullmatch(text.strip()):
        raise ParseError(f"{what}: expected a number, got {text[:40]!r}")
    return int(text)


def _small(text: str) -> int | None:
    """An optional unsigned field (an access technology, a mode): None unless ASCII digits."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 3 else None


def _plain_lines(lines: Iterable[str] | str) -> list[str]:
    if isinstance(lines, str):
        lines = lines.splitlines()
    return [line.strip() for line in lines if line.strip()]


# --------------------------------------------------------------------------- identity

def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch)
        if i % 2 == 1:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return total % 10 == 0


@dataclass(frozen=True)
class Imei:
    imei: str
    luhn_ok: bool  # False is a warning (some modules ship odd IMEIs), not a rejection


def parse_imei(lines: Iterable[str] | str) -> Imei:
    """+CGSN / +GSN answer: bare, ``+CGSN: "…"`` or ``+GSN: …``; 15 digits."""
    plain = _plain_lines(lines)
    payload = _tagged(plain, "+CGSN", "+GSN")
    if payload is None:
        if not plain:
            raise ParseError("empty IMEI response")
        # An untagged answer is the line that looks like one: line noise may come first.
        payload = next((p for p in plain if re.fullmatch(r"[0-9]{15}", _imei_field(p))), plain[0])
    value = _imei_field(payload)
    if not re.fullmatch(r"[0-9]{15}", value):
        raise ParseError(f"IMEI must be 15 digits, got {value[:40]!r}")
    return Imei(value, luhn_ok(value))


def _imei_field(payload: str) -> str:
    # Some modules append a serial number: "129512359199159,SE393939TS".
    return _fields(payload)[0].replace(" ", "")


def parse_imsi(lines: Iterable[str] | str) -> str:
    plain = _plain_lines(lines)
    payload = _tagged(plain, "+CIMI")
    if payload is None:  # untagged: the digits line, whatever line noise came before it
        payload = next((p for p in plain if re.fullmatch(r"[0-9]{6,15}", p.strip('" '))), plain[0] if plain else "")
    value = payload.strip('" ')
    if not re.fullmatch(r"[0-9]{6,15}", value):
        raise ParseError(f"IMSI must be 6-15 digits, got {value[:40]!r}")
    return value


def normalise_iccid(raw: str) -> str:
    """Normalise an ICCID as SPEC §3 says: strip quotes/spaces; ``98…`` is a raw
    nibble-swapped EF_ICCID (swap each pair); drop one trailing ``F``; 19 or 20
    characters starting ``89``; hex A–F allowed from the 7th character (some Chinese
    issuers use it), upper-cased; anything else is an error."""
    value = raw.replace('"', "").replace(" ", "").strip().upper()
    if value.startswith("98"):
        if len(value) % 2:
            raise ParseError(f"raw EF_ICCID must have an even length: {raw!r}")
        value = "".join(value[i + 1] + value[i] for i in range(0, len(value), 2))
    if value.endswith("F"):
        value = value[:-1]
    if not re.fullmatch(r"89[0-9]{4}[0-9A-F]{13,14}", value):
        raise ParseError(f"not an ICCID: {raw[:40]!r}")
    return value


def parse_iccid(lines: Iterable[str] | str, tag: str) -> str:
    """A vendor ICCID answer tagged ``tag`` (the profile's ``iccid_tag``: ``+QCCID: …``,
    ``+CCID: "…"``, ``^ICCID: …``, ``+SQNCCID: "…","<operator>"``) or a bare line (some
    firmware drops the tag)."""
    plain = _plain_lines(lines)
    payload = _tagged(plain, tag.rstrip(":"))
    if payload is None:
        if not plain:
            raise ParseError("empty ICCID response")
        payload = plain[0]
    # Sequans adds the operator after a comma: +SQNCCID: "89…","". The ICCID is the first field.
    return normalise_iccid(payload.split(",")[0])


def parse_crsm_iccid(lines: Iterable[str] | str) -> str:
    """``+CRSM: 144,0,"98…"`` — READ BINARY of EF_ICCID (2FE2 = 12258)."""
    fields = _fields(_require(lines, "+CRSM"))
    if len(fields) < 3:
        raise ParseError(f"+CRSM without data: {fields!r}")
    sw1, sw2 = _int(fields[0], "sw1"), _int(fields[1], "sw2")
    if (sw1, sw2) != (144, 0):
        raise ParseError(f"+CRSM status {sw1},{sw2} (expected 144,0)")
    return normalise_iccid(fields[2])


def parse_info_value(lines: Iterable[str] | str, tag: str) -> str:
    """+CGMI/+CGMM/+CGMR (or +GMI/+GMM/+GMR): optional tag, optional quotes."""
    plain = _plain_lines(lines)
    payload = _tagged(plain, tag, "+" + tag.lstrip("+").lstrip("C"))
    value = payload if payload is not None else (plain[0] if plain else "")
    value = value.strip().strip('"').strip()
    if not value:
        raise ParseError(f"empty {tag} response")
    return value


@dataclass(frozen=True)
class AtiInfo:
    manufacturer: str | None
    model: str | None
    revision: str | None


def parse_ati(lines: Iterable[str] | str) -> AtiInfo:
    """ATI: either ``Manufacturer:/Model:/Revision:`` keys (Huawei, Sierra, …) or, as
    Quectel/SIMCom print it, vendor and model lines followed by ``Revision: …``."""
    plain = _plain_lines(lines)
    keyed: dict[str, str] = {}
    loose: list[str] = []
    for line in plain:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("manufacturer", "model", "revision"):
            keyed[key.strip().lower()] = value.strip()
        elif not line.startswith("+"):
            loose.append(line)
    return AtiInfo(
        keyed.get("manufacturer") or (loose[0] if loose else None),
        keyed.get("model") or (loose[1] if len(loose) > 1 else None),
        keyed.get("revision") or (loose[2] if len(loose) > 2 else None),
    )


# --------------------------------------------------------------------------- SIM

SIM_STATES = ("ready", "absent", "locked", "error", "unknown")


@dataclass(frozen=True)
class SimStatus:
    state: str  # one of SIM_STATES, or "busy" (retry)
    code: str  # the +CPIN code or the error text


def parse_cpin(lines: Iterable[str] | str) -> SimStatus:
    """+CPIN: READY / SIM PIN / SIM PUK / PH-… → ready/locked; NOT INSERTED → absent.
    ``NOT READY`` (seen while booting or with the SIM powered down) is ``unknown``."""
    code = _require(lines, "+CPIN").strip('" ').upper()
    if code == "READY":
        return SimStatus("ready", code)
    if code.startswith(("SIM PIN", "SIM PUK", "PH-", "PH ")):
        return SimStatus("locked", code)
    if code in ("NOT INSERTED", "SIM NOT INSERTED", "NO SIM"):
        return SimStatus("absent", code)
    return SimStatus("unknown", code)


# 27.007 §9.2.1 CME error codes and their verbose texts.
_CME_SIM = {10: "absent", 13: "error", 14: "busy", 11: "locked", 12: "locked", 15: "error",
            16: "locked", 17: "locked", 18: "locked"}
_CME_SIM_TEXT = {"SIM NOT INSERTED": "absent", "SIM FAILURE": "error", "SIM BUSY": "busy",
                 "SIM WRONG": "error", "SIM PIN REQUIRED": "locked", "SIM PUK REQUIRED": "locked"}


def sim_state_from_cme(code: int | None, text: str = "") -> str:
    """The SIM state a ``+CME ERROR`` answer to ``+CPIN?`` means (``busy``: retry)."""
    if code is not None and code in _CME_SIM:
        return _CME_SIM[code]
    return _CME_SIM_TEXT.get(text.strip().upper(), "unknown")


# --------------------------------------------------------------------------- signal

@dataclass(frozen=True)
class Csq:
    rssi: int
    ber: int
    dbm: int | None  # 2·rssi − 113; None for 99 (unknown) or out of range


def parse_csq(lines: Iterable[str] | str) -> Csq:
    fields = _fields(_require(lines, "+CSQ"))
    if len(fields) < 2:
        raise ParseError(f"+CSQ needs rssi,ber: {fields!r}")
    rssi, ber = _int(fields[0], "rssi"), _int(fields[1], "ber")
    return Csq(rssi, ber, 2 * rssi - 113 if 0 <= rssi <= 31 else None)


@dataclass(frozen=True)
class Cesq:
    rssi_dbm: int | None  # −111 + rxlev (rxlev 0..63, 99 unknown)
    ber: int | None
    rscp_dbm: int | None  # −121 + n (0..96)
    ecio_db: float | None  # −24.5 + n/2 (0..49)
    rsrq_db: float | None  # −20 + n/2 (0..34)
    rsrp_dbm: int | None  # −141 + n (0..97)
    ss_rsrq_db: float | None = None  # NR: −43 + n/2 (0..127)
    ss_rsrp_dbm: int | None = None  # NR: −157 + n (0..127)
    ss_sinr_db: float | None = None  # NR: −23 + n/2 (0..127)


def _scaled(raw: str, top: int, base: float, step: float) -> float | None:
    n = _int(raw, "+CESQ field")
    if not 0 <= n <= top:
        return None
    value = base + n * step
    return int(value) if step == 1 else value


def parse_cesq(lines: Iterable[str] | str) -> Cesq:
    f = _fields(_require(lines, "+CESQ"))
    if len(f) < 6:
        raise ParseError(f"+CESQ needs 6 fields: {f!r}")
    nr = f[6:9] if len(f) >= 9 else None
    return Cesq(
        rssi_dbm=_scaled(f[0], 63, -111, 1),
        ber=None if _int(f[1], "ber") == 99 else _int(f[1], "ber"),
        rscp_dbm=_scaled(f[2], 96, -121, 1),
        ecio_db=_scaled(f[3], 49, -24.5, 0.5),
        rsrq_db=_scaled(f[4], 34, -20, 0.5),
        rsrp_dbm=_scaled(f[5], 97, -141, 1),
        ss_rsrq_db=_scaled(nr[0], 127, -43, 0.5) if nr else None,
        ss_rsrp_dbm=_scaled(nr[1], 127, -157, 1) if nr else None,
        ss_sinr_db=_scaled(nr[2], 127, -23, 0.5) if nr else None,
    )


# What a signal level measures: received power of the reference/pilot signal per
# technology, or the wideband RSSI (a different scale: LTE RSSI is some 20-30 dB above RSRP).
SIGNAL_MEASURES = ("rsrp", "ss_rsrp", "rscp", "rssi")


def signal_reading(csq: Csq | None, cesq: Cesq | None) -> tuple[int | None, str | None]:
    """(dBm, measure) to show: +CESQ's received power of the serving technology when the
    module gives one (27.007 §8.69: LTE RSRP, NR SS-RSRP, UMTS RSCP; 1 dB steps down to
    -140 / -156 / -120 dBm), else +CSQ's RSSI (§8.5: 2 dB steps, floor -113 dBm, so a
    weaker cell would read -113), else +CESQ's GSM RXLEV (LTE-only modules often answer
    +CSQ: 99,99); (None, None) when nothing is known."""
    if cesq is not None:
        for dbm, measure in ((cesq.rsrp_dbm, "rsrp"), (cesq.ss_rsrp_dbm, "ss_rsrp"), (cesq.rscp_dbm, "rscp")):
            if dbm is not None:
                return dbm, measure
    dbm = csq.dbm if csq is not None else None
    if dbm is None and cesq is not None:
        dbm = cesq.rssi_dbm
    return dbm, None if dbm is None else "rssi"


# --------------------------------------------------------------------------- registration

# <stat> → ModemManager's MMModem3gppRegistrationState nick.
REGISTRATION_STATES = {
    0: "idle", 1: "home", 2: "searching", 3: "denied", 4: "unknown", 5: "roaming",
    6: "home-sms-only", 7: "roaming-sms-only", 8: "emergency-only",
    9: "home-csfb-not-preferred", 10: "roaming-csfb-not-preferred", 11: "attached-rlos",
}
REGISTERED_STATES = frozenset({"home", "roaming", "home-sms-only", "roaming-sms-only",
                               "home-csfb-not-preferred", "roaming-csfb-not-preferred"})

# <AcT> (27.007 §7.2) → the access technology words of SPEC §8.
ACCESS_TECH = {
    0: "gsm", 1: "gsm", 2: "umts", 3: "gsm", 4: "umts", 5: "umts", 6: "umts", 7: "lte",
    8: "gsm", 9: "lte", 10: "lte", 11: "nr5g", 12: "nr5g", 13: "nr5g",
}
REGISTRATION_TAGS = ("+CREG", "+CGREG", "+CEREG", "+C5GREG")


@dataclass(frozen=True)
class RegistrationInfo:
    tag: str  # "+CREG", "+CGREG", "+CEREG" or "+C5GREG"
    n: int | None  # the URC mode (solicited form only)
    stat: int
    state: str  # ModemManager word
    lac: int | None
    cell_id: int | None
    access_tech: str  # gsm, umts, lte, nr5g, unknown
    unsolicited: bool

    @property
    def registered(self) -> bool:
        return self.state in REGISTERED_STATES


def _split_registration(line: str) -> tuple[str, list[str], list[bool]]:
    text = line.strip()
    for tag in REGISTRATION_TAGS:
        if text.upper().startswith(tag):
            rest = text[len(tag):].lstrip()
            if rest.startswith(":"):
                raw = rest[1:].split(",")
                quoted = [r.strip().startswith('"') for r in raw]
                fields = [r.strip().strip('"').replace(" ", "") for r in raw]
                return tag, fields, quoted
    raise ParseError(f"not a registration line: {line!r}")


def _shape_unsolicited(fields: Sequence[str], quoted: Sequence[bool]) -> bool:
    # Solicited answers start with <n>: "n,stat[,lac,ci[,act…]]"; unsolicited ones
    # with <stat>: "stat[,lac,ci[,act…]]". One and three fields are unambiguous; from
    # four on, the second field is <stat> (a small unquoted number) only when solicited.
    if len(fields) in (1, 3):
        return True
    if len(fields) == 2:
        return False
    second = fields[1]
    stat = _small(second)
    return quoted[1] or stat is None or stat > 11


def registration_is_unsolicited(line: str) -> bool:
    try:
        _, fields, quoted = _split_registration(line)
    except ParseError:
        return False
    return _shape_unsolicited(fields, quoted)


def _hex(value: str) -> int | None:
    # LAC/TAC and cell ids: at most 36 bits (an NR cell identity), zero-padded to at most 16
    # characters; anything else is not one.
    return int(value, 16) if len(value) <= 16 and re.fullmatch(r"0*[0-9A-Fa-f]{1,10}", value) else None


def parse_registration(line: str) -> RegistrationInfo:
    """Any solicited or unsolicited +CREG/+CGREG/+CEREG/+C5GREG line."""
    tag, fields, quoted = _split_registration(line)
    unsolicited = _shape_unsolicited(fields, quoted)
    n = None if unsolicited else _int(fields[0], f"{tag} <n>")
    rest = fields if unsolicited else fields[1:]
    stat = _int(rest[0], f"{tag} <stat>")
    lac = _hex(rest[1]) if len(rest) > 1 else None
    ci = _hex(rest[2]) if len(rest) > 2 else None
    act_raw = rest[3] if len(rest) > 3 else ""
    access_tech = ACCESS_TECH.get(_small(act_raw), "unknown")
    return RegistrationInfo(tag, n, stat, REGISTRATION_STATES.get(stat, "unknown"), lac, ci,
                            access_tech, unsolicited)


def parse_registration_response(lines: Iterable[str] | str, tag: str) -> RegistrationInfo:
    plain = _plain_lines(lines)
    for line in plain:
        if line.upper().startswith(tag.upper()):
            return parse_registration(line)
    raise ParseError(f"no {tag} line in {plain!r}")


# --------------------------------------------------------------------------- operator, radio

@dataclass(frozen=True)
class Operator:
    mode: int
    format: int | None
    name: str | None  # long/short alphanumeric or numeric MCCMNC, as the format says
    access_tech: str


def parse_cops(lines: Iterable[str] | str) -> Operator:
    """+COPS? → ``mode[,format,"oper"[,act]]``."""
    f = _fields(_require(lines, "+COPS"))
    mode = _int(f[0], "+COPS mode")
    fmt = _int(f[1], "+COPS format") if len(f) > 1 and f[1] else None
    name = f[2] if len(f) > 2 and f[2] else None
    act = ACCESS_TECH.get(_small(f[3]), "unknown") if len(f) > 3 else "unknown"
    return Operator(mode, fmt, name, act)


def parse_cfun(lines: Iterable[str] | str) -> int:
    return _int(_fields(_require(lines, "+CFUN"))[0], "+CFUN")


def parse_cgatt(lines: Iterable[str] | str) -> bool:
    return _int(_fields(_require(lines, "+CGATT"))[0], "+CGATT") == 1


# --------------------------------------------------------------------------- network time

@dataclass(frozen=True)
class NetworkTime:
    time: datetime | None  # timezone-aware, in the network's zone, when the line has one
    utc_offset_minutes: int | None
    dst: int | None


def _quarters(text: str) -> int:
    m = re.fullmatch(r"([+-]?)([0-9]{1,3})", text.strip().strip('"'))
    if not m:
        raise ParseError(f"time zone must be ±quarters: {text!r}")
    quarters = (-1 if m.group(1) == "-" else 1) * int(m.group(2))
    if not -48 <= quarters <= 56:  # UTC-12:00 .. UTC+14:00: anything else is not a time zone
        raise ParseError(f"time zone out of range (quarters of an hour, -48..+56): {text!r}")
    return quarters * 15


def _datetime(date: str, clock: str) -> datetime:
    m = re.fullmatch(r"([0-9]{2,4})/([0-9]{1,2})/([0-9]{1,2})", date.strip().strip('"'))
    t = re.fullmatch(r"([0-9]{1,2}):([0-9]{1,2}):([0-9]{1,2})", clock.strip().strip('"'))
    if not m or not t:
        raise ParseError(f"bad date/time {date!r},{clock!r}")
    year = int(m.group(1))
    year += 2000 if year < 100 else 0
    try:
        return datetime(year, int(m.group(2)), int(m.group(3)), *map(int, t.groups()))
    except ValueError as exc:
        raise ParseError(f"bad date/time {date!r},{clock!r}: {exc}") from None


def parse_network_time(line: str) -> NetworkTime:
    """+CTZE: "±tz",dst,"yyyy/MM/dd,hh:mm:ss" (local time: 27.007 §8.41 and Quectel's
    manuals), +CTZEU: the same with universal time, +CTZV: ±tz[,…] or
    +CTZV: yy/MM/dd,hh:mm:ss,±tz (SIMCom), +CCLK: "yy/MM/dd,hh:mm:ss±tz" (local time)."""
    text = line.strip()
    upper = text.upper()
    if upper.startswith("+CCLK"):
        payload = _require([text], "+CCLK").strip('"')
        m = re.fullmatch(r"([0-9]{2,4}/[0-9]{1,2}/[0-9]{1,2}),([0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2})([+-][0-9]{1,3})?", payload)
        if not m:
            raise ParseError(f"bad +CCLK: {line!r}")
        offset = _quarters(m.group(3)) if m.group(3) else None
        local = _datetime(m.group(1), m.group(2))
        zone = timezone(timedelta(minutes=offset)) if offset is not None else None
        return NetworkTime(local.replace(tzinfo=zone) if zone else local, offset, None)
    for tag, universal in (("+CTZEU", True), ("+CTZE", False)):
        if upper.startswith(tag):
            f = [x.strip().strip('"') for x in _require([text], tag).split(",")]
            offset = _quarters(f[0])
            zone = timezone(timedelta(minutes=offset))
            dst = _int(f[1], "dst") if len(f) > 1 and f[1] else None
            when = None
            if len(f) >= 4:
                stamp = _datetime(f[2], f[3])
                when = stamp.replace(tzinfo=timezone.utc).astimezone(zone) if universal else stamp.replace(tzinfo=zone)
            return NetworkTime(when, offset, dst)
    if upper.startswith("+CTZV"):
        f = [x.strip().strip('"') for x in _require([text], "+CTZV").split(",")]
        if len(f) >= 3 and "/" in f[0]:
            offset = _quarters(f[2])
            local = _datetime(f[0], f[1]).replace(tzinfo=timezone(timedelta(minutes=offset)))
            return NetworkTime(local, offset, _int(f[3], "dst") if len(f) > 3 and f[3] else None)
        return NetworkTime(None, _quarters(f[0]), None)
    raise ParseError(f"not a network time line: {line!r}")
