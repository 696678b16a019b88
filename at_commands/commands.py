"""The AT command vocabulary: how a command line is split, normalised and classified.
One home for it; the client, the modem API, the radio gate and the callers' rules (who
may send what: ``agent.core.at_rules``) all ask here. Vendor commands come from ``profiles``.

A command line is normalised first (V.250: case and blanks outside quoted strings do not
matter, the ``AT`` prefix starts the line, ``;`` joins extended commands), then each of
its commands is classified:

* *query*: ``AT`` alone; read forms ``AT+X?`` (also ``^ # $`` prefixes) and S-register
  reads ``ATSn?``; test forms ``AT+X=?``; the action commands in ``READ_ONLY_ACTIONS``
  (identity, IMSI, signal, error report, configuration display) and every profile's
  ICCID and extra signal commands; ``+CRSM`` with a read instruction (176 READ BINARY,
  178 READ RECORD, 192 GET RESPONSE, 242 STATUS); ``+CGSN=<0..3>`` (serial number reads).
  A line is a query when every command is one and none is a network scan.
* *network scan* (``is_network_scan``): ``+COPS=?`` *anywhere* in the line. It only reads
  but holds the module's one channel for minutes.
* *abortable* (``is_abortable``): *every* command of the line is one V.250 lets the DTE
  abort. An abort byte stops the whole line, and a character that arrives while a
  non-abortable part executes has no defined effect, so ``AT+CFUN=1;+COPS=?`` is not
  abortable (though it is a scan).
* *harmless write* (``is_harmless_write``): cannot bring a card onto the network — radio
  off, detach, deregister, URC/format/error settings, echo, PIN entry, every profile's
  hot-swap enable command. Everything else that is not a query may.
* *IMEI rewrite* (``is_imei_rewrite``): in any profile's dialect.
* *session breaking* (``breaks_the_session``): V0, Q1, S3=, S4= change how answers are
  framed.
* *secrets* (``redact_secrets``): the arguments of commands that carry PINs, passwords or
  APN credentials, and the answer lines that show credentials back. What leaves the box
  (a support bundle, a recorded transcript) goes through it.
"""

from __future__ import annotations

import re

from . import profiles

__all__ = ["ABORTABLE_COMMANDS", "NETWORK_SCAN_COMMANDS", "READ_ONLY_ACTIONS", "normalise", "split_line",
           "is_command_line", "is_abortable", "is_network_scan", "is_query", "is_harmless_write",
           "is_imei_rewrite", "breaks_the_session", "SECRET_COMMANDS", "CREDENTIAL_ANSWERS", "REDACTED",
           "redact_secrets"]

# 27.007 §7.3: "+COPS=? ... can be aborted" (the operator list is a network search that
# takes seconds to minutes). Normalised form: upper case, no blanks, no AT prefix.
ABORTABLE_COMMANDS: frozenset[str] = frozenset({"+COPS=?"})
# Commands that search the air interface and may hold the channel for minutes.
NETWORK_SCAN_COMMANDS: frozenset[str] = frozenset({"+COPS=?"})

_QUOTED = re.compile(r'"[^"]*"?')
_COMMAND = re.compile(r'(?:[^;"]|"[^"]*"?)+')  # one command: up to a ";" outside quotes


def normalise(command_line: str) -> str:
    """Upper case, blanks removed, outside quoted strings (kept verbatim)."""
    out, last = [], 0
    for m in _QUOTED.finditer(command_line):
        out.append(re.sub(r"\s+", "", command_line[last:m.start()]).upper())
        out.append(m.group(0))
        last = m.end()
    out.append(re.sub(r"\s+", "", command_line[last:]).upper())
    return "".join(out)


def is_command_line(command_line: str) -> bool:
    """True when the (normalised) line starts with the ``AT`` prefix."""
    return normalise(command_line).startswith("AT")


def split_line(command_line: str, *, keep_quoted: bool = False) -> list[str]:
    """``'at +csq; +cops = ?'`` -> ``['+CSQ', '+COPS=?']`` (``['']`` for a bare ``AT``);
    characters before the ``AT`` prefix dropped. Quoted strings are emptied unless
    ``keep_quoted`` (their content is data, never a command)."""
    text = normalise(command_line)
    if not keep_quoted:
        text = _QUOTED.sub('""', text)
    start = text.find("AT")
    body = text[start + 2:] if start >= 0 else text
    return _COMMAND.findall(body) or [""]


def is_network_scan(command_line: str) -> bool:
    """True if any command of the line is a network scan (``+COPS=?``), however joined:
    after ``;`` or after basic commands (``ATE0+COPS=?``)."""
    return any(scan in part for part in split_line(command_line) for scan in NETWORK_SCAN_COMMANDS)


def is_abortable(command_line: str) -> bool:
    """True if every command of the line is one V.250/27.007 lets the DTE abort."""
    return all(part in ABORTABLE_COMMANDS for part in split_line(command_line))


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
    re.compile(r'\+CLCK=("[A-Z0-9]{2}"|[A-Z0-9]{2}),2'),  # facility lock status (mode 2, no password)
)
# Writes that cannot bring a card onto the network: radio off (27.007 +CFUN 0/4, without
# the reset flag), detach, deregister or only the operator name format, URC/format/error
# settings, echo, PIN entry (the radio stays as it is).
_HARMLESS_WRITES = (
    re.compile(r"\+CFUN=[04](,0)?"),
    re.compile(r"\+CGATT=0"),
    re.compile(r"\+COPS=[23](,.*)?"),
    re.compile(r"\+C(5G|E|G)?REG=[0-5]"),
    re.compile(r"\+(CMEE|CTZR|CTZU|CMGF|CSCS|CNMI|CSCON)=.*"),
    re.compile(r"E[01]?|V1|Q0"),
    re.compile(r"\+CPIN=.*"),
)
# Settings that change how the module frames its answers (numeric result codes, no
# result codes, another line terminator).
_SESSION_BREAKING = re.compile(r"V0|Q1|S[34]=")


def _command_of(command: str) -> str:
    return split_line(command if is_command_line(command) else "AT" + command, keep_quoted=True)[0]


READ_ONLY_ACTIONS: frozenset[str] = frozenset(_BASE_READ_ONLY) | frozenset(
    _command_of(c) for p in profiles.PROFILES.values()
    for c in (*(command for command, _tag in p.iccid_commands), *p.extra_signal_commands))
_HOTSWAP_ENABLES: frozenset[str] = frozenset(
    _command_of(c) for p in profiles.PROFILES.values() for c in p.hotswap_enable)


def _is_query_command(command: str) -> bool:
    return command == "" or command in READ_ONLY_ACTIONS or any(p.fullmatch(command) for p in _QUERY_FORMS)


def is_query(command_line: str) -> bool:
    """True when every command of the line only reads and none is a network scan."""
    return (is_command_line(command_line) and not is_network_scan(command_line)
            and all(_is_query_command(c) for c in split_line(command_line, keep_quoted=True)))


def is_harmless_write(command_line: str) -> bool:
    """True when no command of the line can bring a card onto the network."""
    return is_command_line(command_line) and all(
        _is_query_command(c) or c in _HOTSWAP_ENABLES or any(p.fullmatch(c) for p in _HARMLESS_WRITES)
        for c in split_line(command_line, keep_quoted=True))


def is_imei_rewrite(command_line: str) -> bool:
    """True when any command of the line would rewrite the IMEI, in any profile's dialect."""
    candidates = {command_line.strip(), *("AT" + c for c in split_line(command_line, keep_quoted=True))}
    return any(p.is_imei_rewrite(c) for p in profiles.PROFILES.values() for c in candidates)


def breaks_the_session(command_line: str) -> bool:
    """True when a basic command of the line (V.250 chains them: ``ATE0V0``) would change
    the framing of the module's answers."""
    basic = (re.split(r"[+^#$%*]", c, maxsplit=1)[0] for c in split_line(command_line))
    return any(_SESSION_BREAKING.search(part) for part in basic)


# Commands whose arguments carry a PIN, a password or APN credentials (27.007 +CPIN,
# +CPIN2, +CPWD, +CLCK, +CGAUTH; vendor APN set-up: Quectel +QICSGP, SIMCom +CSTT and
# +CNCFG, Fibocom +MIPCALL, Cinterion ^SICS). Everything after their "=" is secret, the
# test form "=?" aside (errs towards removing too much: +CLCK="SC",2 loses its facility too).
SECRET_COMMANDS: tuple[str, ...] = ("CPIN2", "CPIN", "CPWD", "CLCK", "CGAUTH", "QICSGP", "CSTT", "MIPCALL",
                                    "SICS", "CNCFG")
# Of those, the ones whose read answer shows the credentials back (+QICSGP: 1,"apn","user","pw",1).
CREDENTIAL_ANSWERS: tuple[str, ...] = ("CGAUTH", "QICSGP", "CSTT", "MIPCALL", "SICS", "CNCFG")
REDACTED = "[redacted]"
_SECRET_ARGUMENTS = re.compile(
    rf"((?:\bAT\s*|;\s*)[+^$#]?(?:{'|'.join(SECRET_COMMANDS)})\s*=)(?!\s*\?)[^\r\n]*", re.IGNORECASE)
# An answer line: at a line's start or after a blank (a log line's "12:00:01 < +QICSGP: ...").
_CREDENTIAL_ANSWER = re.compile(rf"((?:^|(?<=\s))[+^$#](?:{'|'.join(CREDENTIAL_ANSWERS)})\s*:)[^\r\n]*",
                                re.IGNORECASE | re.MULTILINE)


def redact_secrets(text: str) -> str:
    """``text`` (a command line, an answer line or free text) without the secrets above:
    the arguments of a secret command (in a chain too: ``AT+CSQ;+CPIN=1234``) and the
    rest of a credential answer line become ``REDACTED``."""
    text = _SECRET_ARGUMENTS.sub(lambda m: m.group(1) + REDACTED, text)
    return _CREDENTIAL_ANSWER.sub(lambda m: m.group(1) + REDACTED, text)
