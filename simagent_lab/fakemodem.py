"""A fake cellular modem on a real pseudo-terminal (SPEC §9).

Two layers:

* ``FakeModemState`` — the modem itself, free of I/O: ``handle_line(line)`` returns the
  bytes the modem writes back (echo, information lines, final result); ``poll()``
  returns output that has come due (registration after CFUN=1, delayed replies);
  control operations (``sim_remove``, ``reboot``, ``fault`` …) return their URCs. The
  clock is injected, so the state machine is tested without a pty or sleeping.
* ``FakeModem`` — the I/O shell: ONE thread running a ``selectors`` loop over the pty
  master, the control socket and a wake-up pipe. Every state change happens in that
  thread; in-process callers (the pytest plugin) submit operations through a queue and
  wait on a future, so no locks guard the state.

Command line: ``simagent-fakemodem --link PATH ...`` serves until SIGTERM/SIGINT;
``simagent-fakemodem ctl --control SOCK OP ...`` sends one control operation.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import fcntl
import json
import os
import queue
import re
import selectors
import struct
import signal
import socket
import sys
import termios
import threading
import time
import traceback
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from at_commands import profiles, transcript as at_transcript
from at_commands.client import TIOCGEXCL
from at_commands.profiles import Profile
from simagent_lab.replay import ReplayState

# --- identities -----------------------------------------------------------------------


def luhn_check_digit(digits: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:  # these positions get doubled once the check digit is appended
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


DEFAULT_IMEI = "86740003000001" + luhn_check_digit("86740003000001")
DEFAULT_ICCID = "89860012345678901234"
DEFAULT_IMSI = "460001234567890"
DEFAULT_MSISDN = "+8613800138000"
DEFAULT_SPN = "CMCC"

_IMEI_RE = re.compile(r"^\d{15}$")
# Issuer ranges of Chinese operators use hex digits after the 6th character (SPEC §3).
_ICCID_RE = re.compile(r"^89\d{4}[0-9A-F]{13,14}$")
_IMSI_RE = re.compile(r"^\d{6,15}$")


def check_imei(value: str) -> str:
    if not _IMEI_RE.match(value):
        raise ValueError(f"imei: expected 15 digits, got {value!r}")
    return value


def check_iccid(value: str) -> str:
    iccid = value.strip().upper()
    if not _ICCID_RE.match(iccid) or not 19 <= len(iccid.rstrip("F")) <= 20:
        raise ValueError(f"iccid: expected 19-20 characters starting 89 (hex A-F from the 7th), got {value!r}")
    return iccid.rstrip("F")


def check_imsi(value: str) -> str:
    if not _IMSI_RE.match(value):
        raise ValueError(f"imsi: expected 6-15 digits, got {value!r}")
    return value


def _swapped_bcd(digits: str, nbytes: int) -> str:
    """Digits as a card stores them (TS 31.102): BCD, low nibble first, padded with F."""
    padded = digits + "F" * (2 * nbytes - len(digits))
    return "".join(padded[i + 1] + padded[i] for i in range(0, 2 * nbytes, 2))


def ef_iccid_hex(iccid: str) -> str:
    """EF_ICCID as stored on the card: BCD with swapped nibbles, padded with F."""
    return _swapped_bcd(iccid, 10)


def ef_imsi_hex(imsi: str) -> str:
    """EF_IMSI (TS 31.102 §4.2.2): length byte, then the parity nibble (9 odd, 1 even)
    and the digits as swapped BCD."""
    return "08" + _swapped_bcd(("9" if len(imsi) % 2 else "1") + imsi, 8)


def ef_ad_hex(mnc_digits: int) -> str:
    """EF_AD (TS 31.102 §4.2.18): normal operation, no OFM, MNC length in byte 4."""
    return f"000000{mnc_digits:02X}"


def ef_spn_hex(spn: str) -> str:
    """EF_SPN (TS 31.102 §4.2.12): display condition, then the name in the GSM default
    alphabet (ASCII letters and digits are the same octets), padded with FF to 16."""
    return "01" + spn.encode("ascii")[:16].hex().upper().ljust(32, "F")


def ef_msisdn_hex(msisdn: str | None, alpha_len: int = 14) -> str:
    """One EF_MSISDN record (TS 31.102 §4.2.26 / 51.011 EF_ADN): alpha identifier,
    BCD length, TON/NPI (91 international, 81 unknown), 10 bytes of number, CCP, EXT."""
    if not msisdn:
        return "F" * (2 * (alpha_len + 14))
    digits = msisdn.lstrip("+")
    ton = "91" if msisdn.startswith("+") else "81"
    return "F" * (2 * alpha_len) + f"{1 + (len(digits) + 1) // 2:02X}" + ton + _swapped_bcd(digits, 10) + "FFFF"


# --- protocol constants ---------------------------------------------------------------

CME_TEXT = {
    3: "operation not allowed",
    4: "operation not supported",
    10: "SIM not inserted",
    11: "SIM PIN required",
    13: "SIM failure",
    14: "SIM busy",
    16: "incorrect password",
    30: "no network service",
    50: "Incorrect parameters",
    100: "unknown",
}

# 27.007 <stat> values.
REG_IDLE, REG_HOME, REG_SEARCHING, REG_DENIED, REG_UNKNOWN, REG_ROAMING = 0, 1, 2, 3, 4, 5
REGISTER_TARGETS = {"home": REG_HOME, "roaming": REG_ROAMING, "denied": REG_DENIED, "searching": REG_SEARCHING}
REG_NAMES = {REG_IDLE: "idle", REG_HOME: "home", REG_SEARCHING: "searching", REG_DENIED: "denied",
             REG_UNKNOWN: "unknown", REG_ROAMING: "roaming"}

FAULT_KINDS = ("delay", "drop", "garbage", "error", "busy", "hang", "late-reply")
# V.250 S-registers the fake answers (reads only), with V.250's defaults: the client's
# resynchronisation probes read 3, 4 and 5.
S_REGISTERS = {3: 13, 4: 10, 5: 8}
DEFAULT_SCAN_SECONDS = 3.0  # AT+COPS=? (real modules take 10-180 s; tests set their own)
# What an aborted command answers. V.250 says an aborted command ends with a result code
# but names none for commands other than dialling (NO CARRIER); the vendor manuals we
# could find (Huawei MU509/EM770W "Abort attribute": any character after 125 ms aborts,
# no result code named; Quectel/SIMCom: nothing found) do not name one either, so the
# fake answers plain ERROR, the generic failure every client must handle.
ABORTED_REPLY = "ERROR"
# What a confused module puts on the line: NULs, high bytes, half a line.
GARBAGE = b"\x00\x00\xfe\xff\x13~#@!\r\n+CSQ: 1\x00"

CRLF = "\r\n"

# Read forms of the simple settings the fake keeps (27.007 defaults where it gives one).
POWER_ON_SETTINGS = {"+CSCS": '"GSM"', "+CNMI": "0,0,0,0,0", "+CUSD": "0", "+CPLS": "0", "+CEMODE": "2",
                     "+WS46": "25"}
# The card's files the fake answers +CRSM READ BINARY (176) for, by file id (TS 31.102).
EF_ICCID, EF_IMSI, EF_AD, EF_SPN, EF_MSISDN = 0x2FE2, 0x6F07, 0x6FAD, 0x6F46, 0x6F40
# ISO 7816-4 status words the fake's card gives (+CRSM <sw1>,<sw2>; +CSIM appends them).
SW_OK, SW_NOT_FOUND, SW_INS_UNKNOWN, SW_WRONG_P1P2 = (144, 0), (106, 130), (109, 0), (106, 134)
PIN_TRIES, PUK_TRIES = 3, 10


def _frame(line: str) -> bytes:
    return f"{CRLF}{line}{CRLF}".encode("latin-1", "replace")


class CommandError(Exception):
    """A command failed with +CME ERROR <code> (or plain ERROR when code is None)."""

    def __init__(self, code: int | None = None):
        super().__init__(code)
        self.code = code


@dataclass
class Fault:
    kind: str
    seconds: float = 0.0
    count: int = 1


@dataclass
class _Timer:
    due: float
    seq: int
    action: str  # "emit" | "register"
    payload: bytes = b""


@dataclass
class FakeModemState:
    """The modem's behaviour, no I/O. All times come from ``clock``."""

    # The control operations this state serves (a replay serves fewer: ReplayState).
    CONTROL_OPS: ClassVar[frozenset[str]] = frozenset({
        "state", "sim-remove", "sim-insert", "set", "register", "reboot", "unplug", "replug", "fault", "urc"})

    profile: Profile = profiles.GENERIC
    imei: str = DEFAULT_IMEI
    iccid: str | None = DEFAULT_ICCID
    imsi: str = DEFAULT_IMSI
    pin: str | None = None
    msisdn: str | None = DEFAULT_MSISDN  # the card's EF_MSISDN (+CNUM); None: empty record
    spn: str | None = DEFAULT_SPN  # the card's EF_SPN; None: the card has no EF_SPN
    signal_dbm: int | None = -85
    register_target: int = REG_HOME
    register_delay: float = 0.3
    operator: str = "CHINA MOBILE"
    tz_quarters: int = 32  # UTC+8
    scan_seconds: float = DEFAULT_SCAN_SECONDS  # AT+COPS=? runs this long (abortable)
    clock: Callable[[], float] = time.monotonic
    wallclock: Callable[[], float] = time.time

    # power-on state, reset by reboot()
    echo: bool = field(init=False, default=True)
    cmee: int = field(init=False, default=0)
    cfun: int = field(init=False, default=1)
    sim_powered: bool = field(init=False, default=True)
    pin_ok: bool = field(init=False, default=False)
    reg_n: dict[str, int] = field(init=False, default_factory=dict)
    reg_stat: int = field(init=False, default=REG_IDLE)
    ps_attached_wanted: bool = field(init=False, default=True)
    cops_deregistered: bool = field(init=False, default=False)
    ctzu: int = field(init=False, default=0)
    ctzr: int = field(init=False, default=0)
    settings: dict[str, str] = field(init=False, default_factory=dict)  # +CSCS, +CNMI, ...
    # PDP contexts (+CGDCONT): kept in the module's NV, so across reboots
    contexts: dict[int, tuple[str, str]] = field(init=False, default_factory=lambda: {1: ("IPV4V6", "")})
    network_time: bool = field(init=False, default=False)
    hotswap_sent: set[str] = field(init=False, default_factory=set)
    faults: list[Fault] = field(init=False, default_factory=list)
    hung: bool = field(init=False, default=False)
    boot_time: float = field(init=False, default=0.0)

    # kept across reboots: what the fake has seen (for test assertions)
    counters: dict[str, int] = field(init=False, default_factory=dict)
    commands: dict[str, int] = field(init=False, default_factory=dict)
    attaches: list[dict[str, Any]] = field(init=False, default_factory=list)
    _timers: list[_Timer] = field(init=False, default_factory=list)
    _seq: int = field(init=False, default=0)
    _held: list[_Timer] = field(init=False, default_factory=list)
    # URCs a command causes, written right after its final result code
    _pending_urcs: list[bytes] = field(init=False, default_factory=list)
    # The busy channel: the command still executing (a scan, a delayed reply), whether
    # input aborts it, and the command lines that arrived meanwhile (answered in order).
    _executing: _Timer | None = field(init=False, default=None)
    _executing_abortable: bool = field(init=False, default=False)
    _queued: list[str] = field(init=False, default_factory=list)
    _scan_requested: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        check_imei(self.imei)
        if self.iccid is not None:
            self.iccid = check_iccid(self.iccid)
        check_imsi(self.imsi)
        self.counters = {"commands": 0, "reboots": 0, "imei_rewrite_attempts": 0, "unknown_commands": 0,
                         "aborted": 0}
        self._power_on()

    # ---- derived state -----------------------------------------------------------

    @property
    def sim_present(self) -> bool:
        return self.iccid is not None

    @property
    def sim_readable(self) -> bool:
        return self.sim_present and self.sim_powered

    @property
    def sim_ready(self) -> bool:
        return self.sim_readable and (self.pin is None or self.pin_ok)

    @property
    def hotswap_active(self) -> bool:
        has_urcs = bool(self.profile.sim_removed_sample or self.profile.sim_inserted_sample)
        return has_urcs and all(_norm(c) in self.hotswap_sent for c in self.profile.hotswap_enable)

    @property
    def ps_stat(self) -> int:
        if self.reg_stat in (REG_HOME, REG_ROAMING) and not self.ps_attached_wanted:
            return REG_IDLE
        return self.reg_stat

    def snapshot(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "imei": self.imei,
            "iccid": self.iccid,
            "imsi": self.imsi if self.sim_present else None,
            "sim_present": self.sim_present,
            "sim_readable": self.sim_readable,
            "cfun": self.cfun,
            "registration": REG_NAMES[self.reg_stat],
            "register_target": REG_NAMES[self.register_target],
            "attached": self.ps_stat in (REG_HOME, REG_ROAMING),
            "signal_dbm": self.signal_dbm,
            "echo": self.echo,
            "cmee": self.cmee,
            "hotswap_active": self.hotswap_active,
            "hung": self.hung,
            "executing": self._executing is not None,
            "executing_abortable": self._executing is not None and self._executing_abortable,
            "scan_seconds": self.scan_seconds,
            "faults": [f.kind for f in self.faults],
            "counters": dict(self.counters),
            "commands": dict(self.commands),
            "attaches": list(self.attaches),
        }

    # ---- timers --------------------------------------------------------------------

    def _schedule(self, delay: float, action: str, payload: bytes = b"") -> _Timer:
        self._seq += 1
        timer = _Timer(self.clock() + delay, self._seq, action, payload)
        self._timers.append(timer)
        return timer

    def next_due(self) -> float | None:
        return min((t.due for t in self._timers), default=None)

    def poll(self) -> list[bytes]:
        """Output whose time has come (call when ``clock() >= next_due()``)."""
        now = self.clock()
        out: list[bytes] = []
        # One timer at a time: ending an execution answers queued lines, and a line sends
        # (and so takes away) held late replies that may be due in this same poll.
        while due := [t for t in self._timers if t.due <= now]:
            timer = min(due, key=lambda t: (t.due, t.seq))
            self._timers.remove(timer)
            if timer in self._held:
                self._held.remove(timer)
            if timer.action == "emit":
                out.append(timer.payload)
            elif timer.action == "finish":  # the executing command ends
                out.append(timer.payload)
                out += self._end_execution()
            elif timer.action == "register":
                out += self._set_registration(self._reachable_stat())
        return out

    # ---- power -----------------------------------------------------------------------

    def _power_on(self) -> None:
        self.echo = self.profile.echo_default
        self.cmee = 0
        self.cfun = self.profile.boot_cfun
        self.sim_powered = True
        self.pin_ok = False
        self.reg_n = {"+CREG": 0, "+CGREG": 0, "+CEREG": 0}
        self.reg_stat = REG_IDLE
        self.ps_attached_wanted = True
        self.cops_deregistered = False
        self.ctzu = self.ctzr = 0
        self.settings = dict(POWER_ON_SETTINGS)
        self.network_time = False
        self.hotswap_sent = set()
        self.faults = []
        self.hung = False
        self._timers = []
        self._held = []
        self._executing = None
        self._executing_abortable = False
        self._queued = []
        self.boot_time = self.clock()
        self._start_registration()

    def boot_output(self) -> list[bytes]:
        """What the module prints right after power-on."""
        lines = list(self.profile.boot_lines)
        if self.sim_ready:
            lines += self.profile.boot_sim_lines
        return [_frame(line) for line in lines]

    def reboot(self) -> list[bytes]:
        self.counters["reboots"] += 1
        self._power_on()
        return self.boot_output()

    # ---- registration ---------------------------------------------------------------

    def _reachable_stat(self) -> int:
        if self.cfun != 1 or not self.sim_ready or self.cops_deregistered:
            return REG_IDLE
        return self.register_target

    def _start_registration(self) -> list[bytes]:
        """Radio on with a usable SIM: search now, settle after register_delay."""
        self._timers = [t for t in self._timers if t.action != "register"]
        target = self._reachable_stat()
        if target == REG_IDLE:
            return self._set_registration(REG_IDLE)
        out = self._set_registration(REG_SEARCHING)
        if target != REG_SEARCHING:
            self._schedule(self.register_delay, "register")
        return out

    def _set_registration(self, stat: int) -> list[bytes]:
        old_cs, old_ps = self.reg_stat, self.ps_stat
        self.reg_stat = stat
        out: list[bytes] = []
        if self.reg_stat != old_cs and self.reg_n["+CREG"]:
            out.append(_frame(self._reg_line("+CREG", self.reg_stat, solicited=False)))
        if self.ps_stat != old_ps:
            for tag in ("+CGREG", "+CEREG"):
                if self.reg_n[tag]:
                    out.append(_frame(self._reg_line(tag, self.ps_stat, solicited=False)))
        if stat in (REG_HOME, REG_ROAMING) and old_cs not in (REG_HOME, REG_ROAMING):
            out += self._on_registered()
        return out

    def _on_registered(self) -> list[bytes]:
        # Operators bind ICCID to IMEI on the first attach: record every attach so a
        # test can prove a foreign card never reached the network from this IMEI.
        if self.ps_attached_wanted:
            self.attaches.append({"iccid": self.iccid, "imei": self.imei, "t": self.clock()})
        out: list[bytes] = []
        if self.ctzu:
            self.network_time = True
        if self.ctzr == 1:
            out.append(_frame(f"+CTZV: {self._tz()}"))
        elif self.ctzr == 2:
            local = time.gmtime(self.wallclock() + self.tz_quarters * 900)
            out.append(_frame(f'+CTZE: "{self._tz()}",0,"{time.strftime("%Y/%m/%d,%H:%M:%S", local)}"'))
        return out

    def _tz(self) -> str:
        return f"{self.tz_quarters:+03d}"

    def _reg_line(self, tag: str, stat: int, *, solicited: bool) -> str:
        n = self.reg_n[tag]
        fields = [str(stat)]
        if n >= 2 and stat in (REG_HOME, REG_ROAMING):
            area = '"1A2B"' if tag != "+CEREG" else '"5F3C"'
            fields += [area, '"0C8A1F02"', "7"]
        if solicited:
            fields.insert(0, str(n))
        return f"{tag}: {','.join(fields)}"

    # ---- control operations (return the URCs they cause) ---------------------------

    def sim_remove(self) -> list[bytes]:
        was_present = self.sim_present
        self.iccid = None
        self.pin_ok = False
        out: list[bytes] = []
        if was_present and self.hotswap_active and self.profile.sim_removed_sample:
            out.append(_frame(self.profile.sim_removed_sample))
        return out + self._start_registration()

    def sim_insert(self, iccid: str, imsi: str | None = None, pin: str | None = None) -> list[bytes]:
        iccid = check_iccid(iccid)  # validate before touching the tray: bad input loses nothing
        imsi = self.imsi if imsi is None else check_imsi(imsi)
        out = self.sim_remove() if self.sim_present else []
        self.iccid, self.imsi = iccid, imsi
        self.pin = pin
        self.pin_ok = False
        self.sim_powered = self.cfun != 0
        if self.hotswap_active and self.profile.sim_inserted_sample:
            out.append(_frame(self.profile.sim_inserted_sample))
        return out + self._start_registration()

    def set_values(self, **values: Any) -> list[bytes]:
        parsers: dict[str, Callable[[Any], Any]] = {
            "signal": lambda v: None if v in (None, "none", "unknown") else int(v),
            "imei": lambda v: check_imei(str(v)),
            "imsi": lambda v: check_imsi(str(v)),
            "operator": str,
            "register_delay": float,
            "scan_seconds": lambda v: _non_negative(float(v)),
            "pin": lambda v: None if v in (None, "", "none") else str(v),
        }
        parsed = {}
        for key, value in values.items():  # all or nothing: validate every value first
            if key not in parsers:
                raise ValueError(f"set: unknown key {key!r} ({', '.join(parsers)})")
            try:
                parsed[key] = parsers[key](value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"set {key}: {exc}") from None
        for key, value in parsed.items():
            setattr(self, "signal_dbm" if key == "signal" else key, value)
        if "pin" in parsed:
            self.pin_ok = False
        return []

    def register(self, target: str) -> list[bytes]:
        try:
            self.register_target = REGISTER_TARGETS[target]
        except KeyError:
            raise ValueError(f"register: expected one of {', '.join(REGISTER_TARGETS)}, got {target!r}") from None
        return self._start_registration()

    def fault(self, kind: str, seconds: float | None = None, count: int = 1) -> list[bytes]:
        if kind == "clear":
            self.faults, self.hung = [], False
            return []
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault: expected one of {', '.join(FAULT_KINDS)} or clear, got {kind!r}")
        if kind == "hang":
            self.hung = True
            return []
        default = {"delay": 1.0, "late-reply": 1.0}.get(kind, 0.0)
        self.faults.append(Fault(kind, default if seconds is None else float(seconds), int(count)))
        return []

    # ---- the AT interpreter ----------------------------------------------------------

    # ---- the busy channel --------------------------------------------------------------

    @property
    def abortable_running(self) -> bool:
        """An abortable command (a network scan) is executing: any input aborts it
        (unless the module hangs: then it ignores input altogether)."""
        return self._executing is not None and self._executing_abortable and not self.hung

    def abort(self) -> list[bytes]:
        """A character arrived while an abortable command executes (V.250): it stops at
        once and answers ``ABORTED_REPLY``; the character is consumed."""
        if not self.abortable_running:
            return []
        assert self._executing is not None
        self._timers.remove(self._executing)
        self.counters["aborted"] += 1
        return [_frame(ABORTED_REPLY)] + self._end_execution()

    def _start_execution(self, seconds: float, reply: bytes, *, abortable: bool) -> None:
        self._executing = self._schedule(seconds, "finish", reply)
        self._executing_abortable = abortable

    def _end_execution(self) -> list[bytes]:
        """The channel is free again: answer the lines that waited, in order."""
        self._executing = None
        self._executing_abortable = False
        queued, self._queued = self._queued, []
        out: list[bytes] = []
        for line in queued:  # a line that starts another long command queues the rest again
            out += self.handle_line(line)
        return out

    # ---- the AT interpreter ----------------------------------------------------------

    def handle_line(self, raw: str) -> list[bytes]:
        """One command line (without its terminating CR) in, the modem's bytes out."""
        if self.hung:
            return []
        if self._executing is not None:  # busy: the line waits for the command to finish
            self._queued.append(raw)
            return []
        out: list[bytes] = [(raw + "\r").encode("latin-1", "replace")] if self.echo else []
        line = raw.strip()
        if not line:
            return out
        # A late reply still pending goes out before anything newer (that is the trap).
        for timer in list(self._held):
            self._timers.remove(timer)
            self._held.remove(timer)
            out.append(timer.payload)
        self._scan_requested = False
        reply = self._execute(line)
        scan, self._scan_requested = self._scan_requested, False
        fault = self._take_fault()
        if fault is None:
            if scan:  # the network search takes scan_seconds; input aborts it
                self._start_execution(self.scan_seconds, reply, abortable=True)
                return out
            return out + [reply]
        if fault.kind == "drop":
            return out
        if fault.kind == "error":
            return out + [_frame("ERROR")]
        if fault.kind == "busy":  # SIM or module still initialising: +CME ERROR: 14
            return out + [_frame(self._error_text(14))]
        if fault.kind == "garbage":
            return out + [GARBAGE + reply]
        if fault.kind == "delay":  # still executing: later lines wait (a busy channel)
            self._start_execution(fault.seconds + (self.scan_seconds if scan else 0.0), reply, abortable=scan)
            return out
        # late-reply: the module has moved on; the old reply goes out before the next answer
        self._held.append(self._schedule(fault.seconds, "emit", reply))
        return out

    def _take_fault(self) -> Fault | None:
        if not self.faults:
            return None
        fault = self.faults[0]
        fault.count -= 1
        if fault.count <= 0:
            self.faults.pop(0)
        return fault

    def _execute(self, line: str) -> bytes:
        prefix = line.upper().find("AT")  # V.250: characters before the AT prefix are ignored
        if prefix < 0:
            return _frame("ERROR")
        line = line[prefix:]
        self.counters["commands"] += 1
        key = _norm(line)
        self.commands[key] = self.commands.get(key, 0) + 1
        info: list[str] = []
        try:
            for command in _split_commands(line[2:]):
                info += self._one(command)
        except CommandError as exc:
            urcs = b"".join(self._pending_urcs)
            self._pending_urcs = []
            return b"".join(_frame(i) for i in info) + _frame(self._error_text(exc.code)) + urcs
        urcs = b"".join(self._pending_urcs)
        self._pending_urcs = []
        return b"".join(_frame(i) for i in info) + _frame("OK") + urcs

    def _error_text(self, code: int | None) -> str:
        if code is None or self.cmee == 0:
            return "ERROR"
        if self.cmee == 1:
            return f"+CME ERROR: {code}"
        return f"+CME ERROR: {CME_TEXT.get(code, 'unknown')}"

    def _one(self, command: str) -> list[str]:
        """Execute one command (text after AT, or after ';'); return information lines."""
        upper = _upper_outside_quotes(command.strip())
        full = "AT" + upper
        if self.profile.is_imei_rewrite(full):
            # Answer like a module that accepted it, change nothing: tests use the counter
            # to prove the agent never sends these.
            self.counters["imei_rewrite_attempts"] += 1
            return []
        if _norm(full) in {_norm(c) for c in self.profile.hotswap_enable}:
            self.hotswap_sent.add(_norm(full))
            return []
        for enable in self.profile.hotswap_enable:  # the same setting with another value: detection off
            name = _norm(enable).split("=")[0]
            if "=" in _norm(full) and "?" not in full and _norm(full).split("=")[0] == name:
                self.hotswap_sent.discard(_norm(enable))
                return []
        if self.profile.iccid_command and _norm(full) == _norm(self.profile.iccid_command):
            return [self.profile.iccid_line(self._read_iccid()) or ""]
        if upper == "":
            return []
        m = re.fullmatch(r"E([01]?)", upper)
        if m:
            self.echo = m.group(1) == "1"
            return []
        if re.fullmatch(r"(Z0?|&F0?|&W0?|V1|Q0|&C1|&D[0-2]|X[0-4]?)", upper):
            return []
        m = re.fullmatch(r"S(\d+)\?", upper)
        if m:
            if int(m.group(1)) not in S_REGISTERS:
                raise CommandError(None)
            return [f"{S_REGISTERS[int(m.group(1))]:03d}"]
        if upper in ("I", "I0"):
            p = self.profile
            return [p.sample_manufacturer, p.sample_model, f"Revision: {p.sample_revision}"]
        m = re.fullmatch(r"(\+[A-Z]+|[+^#$][A-Z0-9]+)(\?|=\?|=(.*))?", upper)
        if not m:
            self.counters["unknown_commands"] += 1
            raise CommandError(None)
        name, suffix, arg = m.group(1), m.group(2) or "", m.group(3)
        handler = None if name in self.profile.unsupported else self._HANDLERS.get(name)
        if handler is None:
            self.counters["unknown_commands"] += 1
            raise CommandError(None)
        if suffix == "=?":
            if name == "+COPS":  # a network search: runs scan_seconds (see handle_line)
                self._scan_requested = True
                return [self._operator_list()]
            form = self.profile.test_form(name)
            if form is None:  # a handler without a documented range: a test guards this
                raise CommandError(4)
            return list(form.lines)
        mode = "read" if suffix == "?" else "set" if suffix.startswith("=") else "exec"
        return handler(self, name, mode, _args(arg) if arg is not None else [])

    # ---- command handlers --------------------------------------------------------

    def _operator_list(self) -> str:
        """The 27.007 +COPS=? answer: (stat,long,short,numeric,AcT) per network found,
        then the supported modes and formats."""
        if self.cfun != 1:
            return "+COPS: ,,(0,1,2,3,4),(0,1,2)"
        own = 2 if self.reg_stat in (REG_HOME, REG_ROAMING) else 1
        return (f'+COPS: ({own},"{self.operator}","{self.operator[:8]}","46000",7),'
                '(1,"CHN-UNICOM","UNICOM","46001",7),(3,"CHN-CT","CT","46011",7),,(0,1,2,3,4),(0,1,2)')

    def _read_iccid(self) -> str:
        self._need_sim(pin=False)
        return self.iccid or ""

    def _need_sim(self, *, pin: bool = True) -> None:
        if not self.sim_readable:
            raise CommandError(10)
        if pin and not self.sim_ready:
            raise CommandError(11)

    def _h_ident(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode != "exec":
            raise CommandError(4)
        p = self.profile
        return [{"+CGMI": p.sample_manufacturer, "+GMI": p.sample_manufacturer, "+CGMM": p.sample_model,
                 "+GMM": p.sample_model, "+CGMR": p.sample_revision, "+GMR": p.sample_revision}[name]]

    def _h_cgsn(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode == "exec":
            return [self.imei]
        if mode == "set" and name == "+CGSN" and args[:1] in (["0"], ["1"]):
            return [f'+CGSN: "{self.imei}"']
        raise CommandError(50 if mode == "set" else 4)

    def _h_cimi(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode != "exec":
            raise CommandError(4)
        self._need_sim()
        return [self.imsi]

    def _h_ccid(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode not in ("exec", "read"):
            raise CommandError(4)
        return [f"+CCID: {self._read_iccid()}"]

    def _h_crsm(self, name: str, mode: str, args: list[str]) -> list[str]:
        """27.007 §8.18 restricted SIM access: READ BINARY (176) of EF_ICCID, EF_IMSI,
        EF_AD, EF_SPN and READ RECORD (178) of EF_MSISDN, from the card's data; any
        other file is not on the card (6A82). Only EF_ICCID is readable before the PIN
        (the others answer 6982, security status not satisfied)."""
        if mode != "set" or len(args) < 2 or not all(a.isdigit() for a in args[:5]):
            raise CommandError(50)
        self._need_sim(pin=False)
        command, fileid, *params = (int(a) for a in args[:5])
        p1, p2, p3 = (params + [0, 0, 0])[:3]
        data = self._card_file(command, fileid, p1, p2)
        if data is None:
            sw1, sw2 = SW_NOT_FOUND
            return [f'+CRSM: {sw1},{sw2},""']
        if fileid != EF_ICCID and not self.sim_ready:
            return ['+CRSM: 105,130,""']
        if p3:
            data = data[:2 * p3]
        sw1, sw2 = SW_OK
        return [f'+CRSM: {sw1},{sw2},"{data}"']

    def _card_file(self, command: int, fileid: int, p1: int, p2: int) -> str | None:
        if command == 176 and (p1, p2) == (0, 0):
            mnc_digits = 3 if self.imsi[:3] in ("310", "311", "312", "313", "316", "405") else 2
            files = {EF_ICCID: ef_iccid_hex(self.iccid or ""), EF_IMSI: ef_imsi_hex(self.imsi),
                     EF_AD: ef_ad_hex(mnc_digits), EF_SPN: ef_spn_hex(self.spn) if self.spn else None}
            return files.get(fileid)
        if command == 178 and fileid == EF_MSISDN and (p1, p2) == (1, 4):  # record 1, absolute
            return ef_msisdn_hex(self.msisdn)
        return None

    def _h_csim(self, name: str, mode: str, args: list[str]) -> list[str]:
        """27.007 §8.17 generic SIM access, for the PIN status APDUs clients send (TS 102
        221 §11.1.9 VERIFY PIN / §11.1.13 UNBLOCK PIN without data): the card answers
        63Cx, x tries left, for PIN1/PIN2 (P2 01/81) and their PUKs. Other instructions
        are unknown to the fake's card (6D00)."""
        if mode != "set" or len(args) != 2 or not args[0].isdigit() or int(args[0]) != len(args[1]):
            raise CommandError(50)
        self._need_sim(pin=False)
        apdu = args[1].upper()
        ins, p2, rest = apdu[2:4], apdu[6:8], apdu[8:]
        if apdu[:2] == "00" and ins in ("20", "2C") and p2 in ("01", "81") and rest in ("", "00"):
            status = f"63C{(PIN_TRIES if ins == '20' else PUK_TRIES):X}"
        else:
            status = "%02X%02X" % SW_INS_UNKNOWN
        return [f'+CSIM: 4,"{status}"']

    def _h_cnum(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode != "exec":
            raise CommandError(4)
        self._need_sim()
        if not self.msisdn:
            return []
        return [f'+CNUM: ,"{self.msisdn}",{145 if self.msisdn.startswith("+") else 129}']

    def _h_gcap(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode != "exec":
            raise CommandError(4)
        return [self.profile.gcap]

    def _h_clck(self, name: str, mode: str, args: list[str]) -> list[str]:
        """Facility lock: only the status query (<mode> 2) is implemented. SC (the SIM
        PIN) is locked when the card asks for a PIN; no other facility is locked."""
        if mode != "set" or len(args) < 2:
            raise CommandError(50)
        facility = args[0].upper()
        if facility not in (self._allowed(name, 0) or ()):
            raise CommandError(50)
        if args[1] != "2":
            raise CommandError(4)
        self._need_sim(pin=facility != "SC")
        return [f"+CLCK: {int(facility == 'SC' and self.pin is not None)}"]

    def _h_cgdcont(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode == "read":
            return [f'+CGDCONT: {cid},"{pdp}","{apn}","",0,0' for cid, (pdp, apn) in sorted(self.contexts.items())]
        if mode != "set" or not args or not args[0].isdigit() or not 1 <= int(args[0]) <= 15:
            raise CommandError(50)
        cid = int(args[0])
        if len(args) == 1:  # 27.007: a context given by <cid> alone is undefined
            self.contexts.pop(cid, None)
            return []
        if args[1].upper() not in ("IP", "IPV6", "IPV4V6"):
            raise CommandError(50)
        self.contexts[cid] = (args[1].upper(), args[2] if len(args) > 2 else "")
        return []

    def _h_setting(self, name: str, mode: str, args: list[str]) -> list[str]:
        """Settings that only change what the module reports (+CSCS, +CNMI, +CUSD's <n>,
        +CPLS, +CEMODE, +WS46): the read form gives them back; a set is checked against
        the ranges of the profile's test form."""
        if mode == "read":
            return [f"{name}: {self.settings[name]}"]
        if mode != "set" or not args:
            raise CommandError(50)
        if name == "+CUSD" and len(args) > 1:  # a USSD request: no USSD service in the fake
            raise CommandError(4)
        for i, value in enumerate(args):
            allowed = self._allowed(name, i)
            if value and allowed is not None and value.upper() not in allowed:
                raise CommandError(50)
        quoted = name == "+CSCS"
        self.settings[name] = ",".join(f'"{a.upper()}"' if quoted else a for a in args)
        return []

    def _h_cpol(self, name: str, mode: str, args: list[str]) -> list[str]:
        """The preferred operator list: the fake's card has none. Only the format
        (``AT+CPOL=,<format>``) can be set."""
        if mode == "read":
            self._need_sim()
            return []
        if mode == "set" and len(args) == 2 and args[0] == "" and args[1] in ("0", "1", "2"):
            return []
        raise CommandError(4 if mode == "exec" else 50)

    def _allowed(self, name: str, index: int) -> set[str] | None:
        """The values the profile's test form lists for parameter ``index`` of ``name``
        (None when it gives no list there): the fake accepts what it advertises."""
        form = self.profile.test_form(name)
        if form is None or not form.lines:
            return None
        groups = re.findall(r"\(([^()]*)\)", form.lines[0])
        return _range_values(groups[index]) if index < len(groups) else None

    def _h_cpin(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode == "read":
            self._need_sim(pin=False)
            return ["+CPIN: READY" if self.sim_ready else "+CPIN: SIM PIN"]
        if mode == "set" and args:
            self._need_sim(pin=False)
            if self.sim_ready:
                raise CommandError(3)
            if args[0] != self.pin:
                raise CommandError(16)
            self.pin_ok = True
            self._pending_urcs = [_frame("+CPIN: READY"), *self._start_registration()]
            return []
        raise CommandError(50)

    def _h_cmee(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode == "read":
            return [f"+CMEE: {self.cmee}"]
        if mode == "set" and args and args[0] in ("0", "1", "2"):
            self.cmee = int(args[0])
            return []
        raise CommandError(50)

    def _h_signal(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode != "exec":
            raise CommandError(4)
        known = self.signal_dbm is not None and self.cfun == 1
        dbm = self.signal_dbm if known else None
        if name == "+CSQ":
            rssi = 99 if dbm is None else max(0, min(31, (dbm + 113) // 2))
            return [f"+CSQ: {rssi},99"]
        # +CESQ: the set signal is used as LTE RSRP (RSRP = -141 + n), RSRQ -10 dB.
        if dbm is None:
            return ["+CESQ: 99,99,255,255,255,255"]
        rsrp = max(0, min(97, dbm + 141))
        return [f"+CESQ: 99,99,255,255,20,{rsrp}"]

    def _h_reg(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode == "read":
            stat = self.reg_stat if name == "+CREG" else self.ps_stat
            return [self._reg_line(name, stat, solicited=True)]
        if mode == "set" and args and args[0] in ("0", "1", "2"):
            self.reg_n[name] = int(args[0])
            return []
        raise CommandError(50)

    def _h_cops(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode == "read":
            if self.reg_stat in (REG_HOME, REG_ROAMING):
                return [f'+COPS: 0,0,"{self.operator}",7']
            return ["+COPS: 2" if self.cops_deregistered else "+COPS: 0"]
        if mode == "set" and args and args[0] in ("0", "2"):
            self.cops_deregistered = args[0] == "2"
            self._pending_urcs = self._start_registration()
            return []
        raise CommandError(50)

    def _h_cfun(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode == "read":
            return [f"+CFUN: {self.cfun}"]
        if mode != "set" or not args or args[0] not in ("0", "1", "4"):
            raise CommandError(50)
        if len(args) > 1 and args[1] == "1":  # reset: answer OK, then boot again
            self._pending_urcs = self.reboot()
            return []
        self.cfun = int(args[0])
        # CFUN=0 powers the card down (a removal, as far as the host can tell); 1 and 4
        # keep it powered, so ICCID and +CPIN? stay readable at CFUN=4.
        self.sim_powered = self.cfun != 0
        if not self.sim_powered:
            self.pin_ok = False
        self._pending_urcs = self._start_registration()
        return []

    def _h_cgatt(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode == "read":
            return [f"+CGATT: {int(self.ps_stat in (REG_HOME, REG_ROAMING))}"]
        if mode == "set" and args and args[0] in ("0", "1"):
            if args[0] == "1" and self.reg_stat not in (REG_HOME, REG_ROAMING):
                raise CommandError(30)
            old_ps = self.ps_stat
            self.ps_attached_wanted = args[0] == "1"
            urcs = [_frame(self._reg_line(t, self.ps_stat, solicited=False))
                    for t in ("+CGREG", "+CEREG") if self.reg_n[t] and self.ps_stat != old_ps]
            if self.ps_attached_wanted and old_ps != self.ps_stat:
                self.attaches.append({"iccid": self.iccid, "imei": self.imei, "t": self.clock()})
            self._pending_urcs = urcs
            return []
        raise CommandError(50)

    def _h_ctz(self, name: str, mode: str, args: list[str]) -> list[str]:
        attr = "ctzu" if name == "+CTZU" else "ctzr"
        if mode == "read":
            return [f"{name}: {getattr(self, attr)}"]
        if mode == "set" and args and args[0] in (self._allowed(name, 0) or ()):
            setattr(self, attr, int(args[0]))
            return []
        raise CommandError(50)

    def _h_cclk(self, name: str, mode: str, args: list[str]) -> list[str]:
        if mode != "read":
            raise CommandError(4)
        if self.network_time:
            stamp, tz = self.wallclock() + self.tz_quarters * 900, self.tz_quarters
        else:  # RTC running from the module's epoch since power-on: not a real time
            stamp, tz = 315964800 + (self.clock() - self.boot_time), 0
        return [f'+CCLK: "{time.strftime("%y/%m/%d,%H:%M:%S", time.gmtime(stamp))}{tz:+03d}"']

    _HANDLERS: ClassVar[dict[str, Callable[..., list[str]]]] = {
        **dict.fromkeys(("+CGMI", "+GMI", "+CGMM", "+GMM", "+CGMR", "+GMR"), _h_ident),
        "+CGSN": _h_cgsn,
        "+GSN": _h_cgsn,
        "+CIMI": _h_cimi,
        "+CCID": _h_ccid,
        "+CRSM": _h_crsm,
        "+CPIN": _h_cpin,
        "+CMEE": _h_cmee,
        "+CSQ": _h_signal,
        "+CESQ": _h_signal,
        "+CREG": _h_reg,
        "+CGREG": _h_reg,
        "+CEREG": _h_reg,
        "+COPS": _h_cops,
        "+CFUN": _h_cfun,
        "+CGATT": _h_cgatt,
        "+CTZU": _h_ctz,
        "+CTZR": _h_ctz,
        "+CCLK": _h_cclk,
        "+CSIM": _h_csim,
        "+CNUM": _h_cnum,
        "+GCAP": _h_gcap,
        "+CLCK": _h_clck,
        "+CGDCONT": _h_cgdcont,
        "+CPOL": _h_cpol,
        **dict.fromkeys(("+CSCS", "+CNMI", "+CUSD", "+CPLS", "+CEMODE", "+WS46"), _h_setting),
    }


def _range_values(group: str) -> set[str]:
    """The values of one test-form group: ``0,1,3`` and ``0-2`` (ranges expanded) and
    ``"GSM","IRA"`` (quotes dropped), upper case."""
    values: set[str] = set()
    for item in (x.strip().strip('"').upper() for x in group.split(",")):
        low, dash, high = item.partition("-")
        if dash and low.isdigit() and high.isdigit():
            values.update(str(n) for n in range(int(low), int(high) + 1))
        elif item:
            values.add(item)
    return values


def _non_negative(value: float) -> float:
    if value < 0:
        raise ValueError(f"expected a number >= 0, got {value}")
    return value


def _norm(command: str) -> str:
    """Canonical form for comparing commands: upper case, no blanks."""
    return re.sub(r"\s+", "", command).upper()


def _upper_outside_quotes(text: str) -> str:
    parts = text.split('"')
    return '"'.join(p if i % 2 else p.upper() for i, p in enumerate(parts))


def _split_commands(body: str) -> list[str]:
    """'+CMEE=2;+CREG=2' -> ['+CMEE=2', '+CREG=2'] (';' inside quotes kept)."""
    parts, current, quoted = [], "", False
    for ch in body:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p for p in parts if p.strip()] or [""]


def _args(text: str) -> list[str]:
    return [a.strip().strip('"') for a in text.split(",")]


# --- line assembly ----------------------------------------------------------------------

MAX_LINE = 4096


class LineAssembler:
    """Bytes from the host -> command lines. CR ends a command (S3); LF is ignored."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[str]:
        lines = []
        for byte in data:
            if byte == 0x0D:
                lines.append(self._buf.decode("latin-1"))
                self._buf.clear()
            elif byte not in (0x0A, 0x00) and len(self._buf) < MAX_LINE:
                self._buf.append(byte)
        return lines


# --- transcript -----------------------------------------------------------------------


class Transcript:
    """Every line in and out, with monotonic time and direction; optionally a JSON-lines file."""

    def __init__(self, path: str | os.PathLike | None = None, clock: Callable[[], float] = time.monotonic):
        self.entries: list[dict[str, Any]] = []
        self._clock = clock
        self._file = open(path, "a", encoding="utf-8", buffering=1) if path else None

    def add(self, direction: str, text: str) -> None:
        entry = {"t": round(self._clock(), 6), "dir": direction, "line": text}
        self.entries.append(entry)
        if self._file:
            self._file.write(json.dumps(entry) + "\n")

    def add_output(self, data: bytes) -> None:
        for line in re.split(r"[\r\n]+", data.decode("latin-1")):
            if line:
                self.add("out", line)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def read_transcript(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- the I/O shell -----------------------------------------------------------------------


def _opened_elsewhere(slave: int) -> bool:
    """Whether a process other than this one has the tty that `slave` is open on (from
    /proc/*/fd). Compared by device, not by name: a container's own devpts has the same
    /dev/pts/N names for other terminals."""
    mine = os.fstat(slave)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    st = os.stat(fd)
                    if (st.st_rdev, st.st_dev) == (mine.st_rdev, mine.st_dev):
                        return True
        except OSError:  # gone, or not ours to look at
            continue
    return False


class _CloseWatch:
    """inotify on the pty's device node: an event each time some process closes it."""

    _IN_CLOSE = 0x00000008 | 0x00000010  # IN_CLOSE_WRITE | IN_CLOSE_NOWRITE
    _libc = ctypes.CDLL(None, use_errno=True)

    def __init__(self, path: str) -> None:
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or self._libc.inotify_add_watch(self.fd, path.encode(), self._IN_CLOSE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {path}")

    def drain(self) -> bool:
        """True when at least one close happened since the last call."""
        seen = False
        while True:
            try:
                seen |= bool(os.read(self.fd, 4096))
            except BlockingIOError:
                return seen

    def close(self) -> None:
        os.close(self.fd)


class FakeModem:
    """Serve a FakeModemState on a pty (symlinked at ``link``) from one background thread."""

    def __init__(
        self,
        link: str | os.PathLike,
        state: FakeModemState | ReplayState | None = None,
        control_path: str | os.PathLike | None = None,
        transcript_path: str | os.PathLike | None = None,
    ):
        self.link = Path(link)
        self.state = state or FakeModemState()
        self.control_path = Path(control_path) if control_path else None
        self.transcript = Transcript(transcript_path)
        self._sel = selectors.DefaultSelector()
        self._master: int | None = None
        self._slave: int | None = None
        self._assembler = LineAssembler()
        self._ops: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        self._listener: socket.socket | None = None
        self._clients: dict[socket.socket, bytearray] = {}
        self._thread: threading.Thread | None = None
        self._running = False
        self.crash: str | None = None  # the traceback that stopped the loop, if one did

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> FakeModem:
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        if self.control_path:
            self._listen()
        self._plug()
        self._write(b"".join(self.state.boot_output()))
        self._running = True
        self._thread = threading.Thread(target=self._serve, name=f"fakemodem:{self.link.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread and self._thread.is_alive():
            self._running = False
            os.write(self._wake_w, b"x")
            self._thread.join(5)
        self._unplug()
        if self._listener:
            self._listener.close()
            if self.control_path:
                self.control_path.unlink(missing_ok=True)
        for client in list(self._clients):
            client.close()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.transcript.close()

    def __enter__(self) -> FakeModem:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        assert self._thread
        self._thread.join()

    # ---- control (thread-safe: runs the operation in the modem thread) -------------

    def control(self, op: str, **args: Any) -> dict[str, Any]:
        if threading.current_thread() is self._thread:
            return self._apply(op, args)
        if self.crash:
            raise RuntimeError(f"the fake modem's loop stopped:\n{self.crash}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._ops.put((op, args, future))
        os.write(self._wake_w, b"x")
        return future.result(timeout=10)

    def _apply(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            self._dispatch(op, dict(args))
        except (ValueError, TypeError, KeyError) as exc:
            self.transcript.add("ctl", f"{op} {json.dumps(args)} -> error: {exc}")
            return {"ok": False, "error": str(exc)}
        self.transcript.add("ctl", f"{op} {json.dumps(args)}" if args else op)
        return {"ok": True, "state": self.snapshot()}

    def _dispatch(self, op: str, args: dict[str, Any]) -> None:
        s = self.state
        if op not in CTL_OPS:
            raise ValueError(f"unknown operation {op!r}")
        if op not in s.CONTROL_OPS:
            raise ValueError(f"{op}: not served by this fake" + (" (a replay: the transcript is the whole truth)"
                                                                  if isinstance(s, ReplayState) else ""))
        if op == "state":
            return
        if isinstance(s, ReplayState):
            self._dispatch_replay(s, op, args)
            return
        if op == "sim-remove":
            self._write(b"".join(s.sim_remove()))
        elif op == "sim-insert":
            self._write(b"".join(s.sim_insert(str(args.pop("iccid")), **args)))
        elif op == "set":
            s.set_values(**args)
        elif op == "register":
            self._write(b"".join(s.register(str(args["state"]))))
        elif op == "reboot":
            self._write(b"".join(s.reboot()))
        elif op == "urc":
            self._write(b"".join(_urc_output(args)))
        elif op == "fault":
            s.fault(str(args["kind"]), args.get("seconds"), int(args.get("count", 1)))
        elif op == "unplug":
            self._unplug()
        elif op == "replug":
            if self._master is None:
                self._plug()
                self._write(b"".join(s.reboot()))
        else:
            raise ValueError(f"unknown operation {op!r}")

    def _dispatch_replay(self, s: ReplayState, op: str, args: dict[str, Any]) -> None:
        if op == "replay-urc":
            self._write(b"".join(s.replay_urc(bool(args.get("all", False)))))
        elif op == "urc":
            self._write(b"".join(_urc_output(args)))
        elif op == "reboot":
            self._write(b"".join(s.reboot()))
        elif op == "unplug":
            self._unplug()
        elif op == "replug" and self._master is None:
            self._plug()
            self._write(b"".join(s.reboot()))

    def snapshot(self) -> dict[str, Any]:
        snap = self.state.snapshot()
        snap["plugged"] = self._master is not None
        snap["port"] = str(self.link)
        snap["pty"] = os.ttyname(self._slave) if self._slave is not None else None
        return snap

    # ---- pty -----------------------------------------------------------------------

    def _plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no line discipline: bytes pass unchanged, no echo by the tty
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self._closes = _CloseWatch(os.ttyname(slave))
        self._sel.register(self._closes.fd, selectors.EVENT_READ, "closed")
        tmp = self.link.with_name(self.link.name + ".new")
        tmp.unlink(missing_ok=True)
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, self.link)
        self._assembler = LineAssembler()
        self._sel.register(master, selectors.EVENT_READ, "pty")
        self.transcript.add("ctl", f"plugged {os.ttyname(slave)}")

    def _unplug(self) -> None:
        if self._master is None:
            return
        self._sel.unregister(self._master)
        self._sel.unregister(self._closes.fd)
        self._closes.close()
        self.link.unlink(missing_ok=True)
        # Closing the master hangs the line up: readers of the slave get EIO / EOF.
        os.close(self._master)
        os.close(self._slave)
        self._master = self._slave = None
        self.transcript.add("ctl", "unplugged")

    def _write(self, data: bytes) -> None:
        if not data or self._master is None:
            return
        self.transcript.add_output(data)
        view = memoryview(data)
        deadline = time.monotonic() + 2.0
        while view:
            try:
                n = os.write(self._master, view)
                view = view[n:]
            except BlockingIOError:  # nobody reads and the pty buffer is full
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)
            except OSError:
                return

    # ---- the loop --------------------------------------------------------------------

    def _serve(self) -> None:
        """The loop, and if a bug stops it, a fake that says so: the traceback on stderr and
        in ``crash``, and the control socket closed (callers are refused, not left waiting)."""
        try:
            self._loop()
        except Exception:
            self.crash = traceback.format_exc()
            self._running = False
            print(f"simagent-fakemodem: the loop stopped:\n{self.crash}", file=sys.stderr, flush=True)
            if self._listener:
                self._listener.close()
                self._listener = None
                if self.control_path:
                    self.control_path.unlink(missing_ok=True)

    def _loop(self) -> None:
        while self._running:
            due = self.state.next_due()
            timeout = None if due is None else max(0.0, due - self.state.clock())
            for key, _ in self._sel.select(timeout):
                # An event of this batch may concern a pty that an earlier one (a control
                # request: unplug, replug) has closed since: only the current pty's count.
                if key.data == "wake":
                    os.read(self._wake_r, 4096)
                elif key.data == "pty":
                    if key.fileobj == self._master:
                        self._on_pty()
                elif key.data == "closed":
                    if self._slave is not None and key.fileobj == self._closes.fd:
                        self._on_client_closed()
                elif key.data == "listen":
                    self._accept()
                else:
                    self._on_client(key.fileobj)
            while not self._ops.empty():
                op, args, future = self._ops.get()
                try:
                    future.set_result(self._apply(op, args))
                except Exception as exc:  # report to the caller rather than kill the modem
                    future.set_exception(exc)
            if self.state.next_due() is not None and self.state.next_due() <= self.state.clock():
                self._write(b"".join(self.state.poll()))

    def _on_client_closed(self) -> None:
        """A USB tty forgets TIOCEXCL when its last user closes it; a pty whose master we
        hold never would, so a client killed with the flag set would lock its successor
        out. Once no other process has the port open, clear the flag."""
        if self._closes.drain() and self._slave is not None and not _opened_elsewhere(self._slave):
            flag = fcntl.ioctl(self._slave, TIOCGEXCL, struct.pack("i", 0))
            fcntl.ioctl(self._slave, termios.TIOCNXCL)
            # A program that opened the port between the look and the clear may have set
            # the flag itself (as root its open ignores a stale one): put it back for it.
            if struct.unpack("i", flag)[0] and _opened_elsewhere(self._slave):
                fcntl.ioctl(self._slave, termios.TIOCEXCL)

    def _on_pty(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError:  # EIO: no process has the slave open (we hold it, so rare)
            return
        if data and self.state.abortable_running:
            # V.250: a character received while an abortable command executes aborts it;
            # that character is consumed, the rest is the next command line.
            self.transcript.add("abort", repr(data[:1]))
            self._write(b"".join(self.state.abort()))
            data = data[1:]
        for line in self._assembler.feed(data):
            self.transcript.add("in", line)
            self._write(b"".join(self.state.handle_line(line)))

    # ---- control socket --------------------------------------------------------------

    def _listen(self) -> None:
        assert self.control_path
        self.control_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.control_path))
        os.chmod(self.control_path, 0o600)
        listener.listen(8)
        listener.setblocking(False)
        self._listener = listener
        self._sel.register(listener, selectors.EVENT_READ, "listen")

    def _accept(self) -> None:
        assert self._listener
        conn, _ = self._listener.accept()
        conn.setblocking(False)
        self._clients[conn] = bytearray()
        self._sel.register(conn, selectors.EVENT_READ, "client")

    def _on_client(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._sel.unregister(conn)
            self._clients.pop(conn, None)
            conn.close()
            return
        buf = self._clients[conn]
        buf += data
        while b"\n" in buf:
            raw, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            try:
                request = json.loads(raw)
                if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                    raise ValueError('expected a JSON object with "op"')
                args = {k: v for k, v in request.items() if k != "op"}
                reply = self._apply(request["op"], args)
            except ValueError as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            conn.setblocking(True)
            conn.sendall(json.dumps(reply).encode() + b"\n")
            conn.setblocking(False)


def _urc_output(args: dict[str, Any]) -> list[bytes]:
    line = str(args["line"])
    if not line or "\r" in line or "\n" in line:
        raise ValueError("urc: expected one non-empty line")
    return [_frame(line)]


# --- control client ----------------------------------------------------------------------


def control_request(path: str | os.PathLike, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("fake modem closed the control connection")
            buf += chunk
    return json.loads(buf)


def parse_ctl_words(op: str, words: list[str]) -> dict[str, Any]:
    """CLI words -> control request. ``fault delay=2`` -> {"op":"fault","kind":"delay","seconds":2}."""
    request: dict[str, Any] = {"op": op}
    positional = [w for w in words if "=" not in w]
    pairs = dict(w.split("=", 1) for w in words if "=" in w)
    if op == "sim-insert":
        if len(positional) != 1:
            raise ValueError("sim-insert needs exactly one ICCID")
        request["iccid"] = positional[0]
        request.update(pairs)
    elif op == "urc":
        if not words:
            raise ValueError("urc needs the line to emit, e.g. '+CPIN: NOT READY'")
        request["line"] = " ".join(words)
    elif op == "replay-urc":
        if words not in ([], ["all"]):
            raise ValueError("replay-urc takes nothing (the next recorded URC) or 'all'")
        if words:
            request["all"] = True
    elif op == "register":
        if len(positional) != 1:
            raise ValueError("register needs one of home, roaming, denied, searching")
        request["state"] = positional[0]
    elif op == "set":
        if positional or not pairs:
            raise ValueError("set takes KEY=VALUE pairs, e.g. signal=-85")
        request.update(pairs)
    elif op == "fault":
        kinds = [k for k in (*positional, *pairs) if k in (*FAULT_KINDS, "clear")]
        if len(kinds) != 1:
            raise ValueError(f"fault needs one of {', '.join(FAULT_KINDS)}, clear")
        request["kind"] = kinds[0]
        seconds = pairs.get(kinds[0], pairs.get("seconds"))
        if seconds is not None:
            request["seconds"] = float(seconds)
        if "count" in pairs:
            request["count"] = int(pairs["count"])
    elif words:
        raise ValueError(f"{op} takes no arguments")
    return request


CTL_OPS = ("sim-remove", "sim-insert", "set", "register", "reboot", "unplug", "replug", "fault", "urc", "replay-urc",
           "state")


def _ctl_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="simagent-fakemodem ctl", description="Send one control operation.")
    parser.add_argument("--control", required=True, help="control socket of a running fake modem")
    parser.add_argument("op", choices=CTL_OPS)
    parser.add_argument("words", nargs="*", help="e.g. ICCID, home, signal=-85, delay=2")
    args = parser.parse_args(argv)
    try:
        request = parse_ctl_words(args.op, args.words)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        reply = control_request(args.control, request)
    except OSError as exc:
        print(f"simagent-fakemodem ctl: {args.control}: {exc}", file=sys.stderr)
        return 69
    if not reply.get("ok"):
        print(f"simagent-fakemodem ctl: {args.op}: {reply.get('error')}", file=sys.stderr)
        return 1
    state = reply["state"]
    print(json.dumps(state, indent=2, sort_keys=True) if args.op == "state" else f"{args.op}: done; {state_line(state)}")
    return 0


def state_line(state: dict[str, Any]) -> str:
    """The fake's state in one line (`ctl state` prints all of it as JSON)."""
    if "replay" in state:
        return f"replaying {state['replay']}, {state['urcs_left']} of {state['urcs_recorded']} URCs left"
    sim = state["iccid"] if state["sim_present"] else "none"
    parts = [f"SIM {sim}", f"CFUN={state['cfun']}", f"registration {state['registration']}",
             "signal unknown" if state["signal_dbm"] is None else f"signal {state['signal_dbm']} dBm"]
    if state["faults"]:
        parts.append(f"faults {','.join(state['faults'])}")
    if not state["plugged"]:
        parts.append("unplugged")
    return ", ".join(parts)


def _serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="simagent-fakemodem",
        description="Serve a fake cellular modem on a pseudo-terminal. "
        "'simagent-fakemodem ctl --help' for the control client.",
    )
    parser.add_argument("--link", required=True, help="symlink to create for the pty (the 'port')")
    parser.add_argument("--profile", default="generic", choices=sorted(profiles.PROFILES))
    parser.add_argument("--imei", default=DEFAULT_IMEI)
    sim = parser.add_mutually_exclusive_group()
    sim.add_argument("--iccid", default=DEFAULT_ICCID)
    sim.add_argument("--no-sim", action="store_true", help="start with the SIM tray empty")
    parser.add_argument("--imsi", default=DEFAULT_IMSI)
    parser.add_argument("--pin", help="SIM PIN the card asks for (default: none)")
    parser.add_argument("--register-delay", type=float, default=0.3, help="seconds from CFUN=1 to registered")
    parser.add_argument("--scan-seconds", type=float, default=DEFAULT_SCAN_SECONDS,
                        help="how long AT+COPS=? searches (abortable by any input)")
    parser.add_argument("--control", help="Unix socket for JSON-lines control")
    parser.add_argument("--transcript", help="append every line in/out as JSON lines")
    parser.add_argument("--replay", metavar="FILE",
                        help="answer as the AT transcript FILE recorded (simagent at --record); "
                        "the modem options above do not apply")
    args = parser.parse_args(argv)
    if args.replay:
        given = [f"--{name.replace('_', '-')}" for name, default in REPLAY_EXCLUDES.items()
                 if getattr(args, name) != default]
        if given:
            parser.error(f"--replay: the transcript is the modem; {', '.join(given)} do not apply")
        try:
            replay = ReplayState(at_transcript.load(args.replay), source=args.replay)
        except (OSError, at_transcript.TranscriptError) as exc:
            parser.error(f"--replay {args.replay}: {exc}")
        return _serve(FakeModem(args.link, replay, control_path=args.control, transcript_path=args.transcript))
    try:
        state = FakeModemState(
            profile=profiles.get(args.profile), imei=args.imei, iccid=None if args.no_sim else args.iccid,
            imsi=args.imsi, pin=args.pin, register_delay=args.register_delay, scan_seconds=args.scan_seconds,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return _serve(FakeModem(args.link, state, control_path=args.control, transcript_path=args.transcript))


# The modem options --replay refuses (their defaults: an option left at it was not given).
REPLAY_EXCLUDES = {"profile": "generic", "imei": DEFAULT_IMEI, "iccid": DEFAULT_ICCID, "no_sim": False,
                   "imsi": DEFAULT_IMSI, "pin": None, "register_delay": 0.3, "scan_seconds": DEFAULT_SCAN_SECONDS}


def _serve(modem: FakeModem) -> int:
    """Serves until SIGTERM/SIGINT; the exit code."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    modem.start()
    print(f"READY {modem.link} -> {os.readlink(modem.link)}", flush=True)
    while not stop.wait(0.2) and modem.crash is None:
        pass
    modem.stop()
    return 70 if modem.crash else 0  # EX_SOFTWARE: a bug in the fake


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ctl"]:
        return _ctl_main(argv[1:])
    return _serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
