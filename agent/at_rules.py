"""Which AT command lines a caller (technician, platform) may send, and when.

One home for the rules the control socket, the platform commands, the CLI and the radio
gate apply to a caller's line (the modem's own vocabulary — tags, profiles, abortable
commands — lives in `at_commands`):

* A line may hold several commands joined by ``;`` (``AT+CSQ;+CREG?``); it is a *query*
  only when every one of them is.
* Queries: ``AT`` alone; read forms ``AT+X?`` (also ``^ # $`` prefixes) and S-register
  reads ``ATSn?``; test forms ``AT+X=?``; the action commands in ``READ_ONLY_ACTIONS``
  (identity, IMSI, signal, ICCID, error report, configuration display) and every
  profile's ICCID and extra signal commands (vendor knowledge is data); ``+CRSM`` with a
  read instruction (176 READ BINARY, 178 READ RECORD, 192 GET RESPONSE, 242 STATUS);
  ``+CGSN=<0..3>`` (serial number reads).
* A network scan (``AT+COPS=?``) is not a query although it only reads: it holds the
  module's one AT channel for up to minutes, so it needs what a write needs (root and
  ``--unsafe`` on the control socket, a token from the platform). It is abortable, so
  even then it never delays the radio gate.
* Everything else is a *write* and needs ``--unsafe``: any other set form (``=value``),
  any other action (``ATZ``, ``AT&W``, ``ATD``, ``ATH``...) and unknown commands.
* Commands that rewrite the IMEI (every profile's ``imei_rewrite_commands``) are refused
  always, ``--unsafe`` or not, and so are lines with control characters (a Ctrl-Z would
  turn a command into a payload).
* While the radio gate holds the radio off, only *harmless* writes go through
  (`is_harmless_write`: the ones that cannot bring a card onto the network — radio off,
  detach, deregister, URC and format settings, PIN entry); everything else, ``+CFUN=1``,
  ``+CFUN=1,1``, ``+CGATT=1``, ``+COPS=0`` and any write not known to be harmless, is
  refused to every caller, root included (`agent.enforcer`).
"""

from __future__ import annotations

import re
from typing import Any

from at_commands import profiles
from at_commands.commands import is_abortable, is_network_scan
from at_commands.client import Response
from at_commands.modem import ICCID_FALLBACKS
from at_commands.protocol import FinalResult, ResultKind

# 27.007 / V.250 action commands that only report (normalised: upper case, after "AT").
_BASE_READ_ONLY = (
    "I", "&V", "+CGMI", "+CGMM", "+CGMR", "+CGSN", "+GMI", "+GMM", "+GMR", "+GSN", "+CIMI",
    "+CSQ", "+CESQ", "+CNUM", "+CEER", "+CLAC", "+CPAS",
)
_QUERY_FORMS = (
    re.compile(r"I\d"),  # ATI0..ATI9: identification pages
    re.compile(r"[+^#$%*][A-Z][A-Z0-9]*(\?|=\?)"),  # read and test forms
    re.compile(r"S\d+\?"),  # S-register read
    re.compile(r"\+CRSM=(176|178|192|242)(,.*)?"),  # SIM file reads
    re.compile(r"\+CGSN=[0-3]"),  # serial number reads (IMEI, IMEISV, SVN)
)
# Writes that cannot bring a card onto the network (normalised, after "AT"): radio off
# (27.007 +CFUN 0/4, without the reset flag), detach, deregister or only the operator
# name format, URC/format/error settings, echo, PIN entry (the radio stays as it is),
# and every profile's hot-swap enable command.
_HARMLESS_WRITES = (
    re.compile(r"\+CFUN=[04](,0)?"),
    re.compile(r"\+CGATT=0"),
    re.compile(r"\+COPS=[23](,.*)?"),
    re.compile(r"\+C(5G|E|G)?REG=[0-5]"),
    re.compile(r"\+(CMEE|CTZR|CTZU|CMGF|CSCS|CNMI|CSCON)=.*"),
    re.compile(r"E[01]?|V1|Q0"),
    re.compile(r"\+CPIN=.*"),
)


class Refused(Exception):
    """A command that must not be sent. ``code`` is the control-socket error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _normalise(line: str) -> str:
    """Upper case and no blanks, except inside double quotes."""
    parts = line.strip().split('"')
    return '"'.join(p if i % 2 else re.sub(r"\s+", "", p).upper() for i, p in enumerate(parts))


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def split_commands(line: str) -> list[str] | None:
    """The commands of one line, each as ``AT...`` in normal form; None when the line is
    not an AT command line."""
    text = _normalise(line)
    if not text.startswith("AT"):
        return None
    parts = [p for p in _split_outside_quotes(text[2:], ";") if p]
    return ["AT" + p for p in parts] or ["AT"]


def _profile_reads() -> frozenset[str]:
    commands = [p.iccid_command for p in profiles.PROFILES.values() if p.iccid_command]
    commands += [c for p in profiles.PROFILES.values() for c in p.extra_signal_commands]
    commands += [c for c, _tag in ICCID_FALLBACKS]
    return frozenset(_normalise(c)[2:] for c in commands)


READ_ONLY_ACTIONS: frozenset[str] = frozenset(_BASE_READ_ONLY) | _profile_reads()
_HOTSWAP_ENABLES: frozenset[str] = frozenset(
    _normalise(c if c.upper().startswith("AT") else "AT" + c)[2:] for p in profiles.PROFILES.values() for c in p.hotswap_enable)


def _is_query_command(body: str) -> bool:
    return body == "" or body in READ_ONLY_ACTIONS or any(p.fullmatch(body) for p in _QUERY_FORMS)


def is_query(command: str) -> bool:
    """True when every command of the line only reads and none is a network scan."""
    commands = split_commands(command)
    return (commands is not None and not is_network_scan(command)
            and all(_is_query_command(c[2:]) for c in commands))


def is_harmless_write(command: str) -> bool:
    """True when no command of the line can bring a card onto the network (the gate lets
    it through while it holds the radio off)."""
    commands = split_commands(command)
    return commands is not None and all(
        _is_query_command(c[2:]) or c[2:] in _HOTSWAP_ENABLES or any(p.fullmatch(c[2:]) for p in _HARMLESS_WRITES)
        for c in commands)


def is_imei_rewrite(command: str) -> bool:
    """True when any command of the line would rewrite the IMEI, in any profile's dialect."""
    candidates = {command.strip(), *(split_commands(command) or ())}
    return any(p.is_imei_rewrite(c) for p in profiles.PROFILES.values() for c in candidates)


# Settings that change how the module frames its answers (numeric result codes, no
# result codes, another line terminator): the AT session could no longer tell one
# answer from the next, so no caller may send them.
_SESSION_BREAKING = re.compile(r"V0|Q1|S[34]=")


def breaks_the_session(command: str) -> bool:
    """True when a basic command of the line (V.250 chains them: ``ATE0V0``) would change
    the framing of the module's answers."""
    commands = split_commands(command)
    basic = (re.split(r"[+^#$%*]", c[2:], maxsplit=1)[0] for c in commands or ())
    return any(_SESSION_BREAKING.search(part) for part in basic)


def check_command(command: str, unsafe: bool) -> None:
    """Raises ``Refused`` unless ``command`` may be sent (with ``unsafe`` for writes)."""
    if any(not 32 <= ord(c) < 127 for c in command.strip()):
        raise Refused("bad_request", "refused: control or non-ASCII characters in the command")
    if split_commands(command) is None:
        raise Refused("bad_request", "refused: not an AT command (a command line starts with AT)")
    if is_imei_rewrite(command):
        raise Refused("imei_rewrite_refused", "refused: this command rewrites the IMEI; simagent never sends it")
    if breaks_the_session(command):
        raise Refused("bad_request", "refused: this setting changes how the modem frames its answers (V0, Q1, S3=, S4=); "
                                     "simagent's AT session depends on them")
    if is_network_scan(command) and not is_abortable(command):
        # Joined to another command the scan cannot be aborted (V.250 defines the abort
        # for the abortable command alone), so it would hold the radio gate back.
        raise Refused("bad_request", "refused: send a network scan on a line of its own (AT+COPS=?), "
                      "so that the radio gate can abort it")
    if not unsafe and not is_query(command):
        what = "this network scan holds the modem for minutes" if is_network_scan(command) else "this command changes the modem"
        raise Refused("unsafe_required", f"refused: {what}; repeat it with --unsafe")


def final_line(final: FinalResult) -> str:
    if final.kind is ResultKind.CME_ERROR:
        return f"+CME ERROR: {final.text}"
    if final.kind is ResultKind.CMS_ERROR:
        return f"+CMS ERROR: {final.text}"
    return final.text


def at_result(response: Response) -> dict[str, Any]:
    """The JSON result of one AT command (also the daemon's `at` op result)."""
    return {"lines": list(response.lines), "final": final_line(response.final), "ok": response.final.ok}
