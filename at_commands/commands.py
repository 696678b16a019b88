"""The AT command vocabulary the rest of simagent classifies command lines with: which
commands V.250 lets the DTE abort, which are network scans. Data in one place; the
client, the modem API and the CLI's gate all import it from here.

A command line is normalised first (V.250: case and blanks outside quoted strings do not
matter, the ``AT`` prefix starts the line, ``;`` joins extended commands), then:

* ``is_network_scan`` — the line contains a scan *anywhere* (``AT+CSQ;+COPS=?`` scans).
* ``is_abortable`` — *every* command of the line is abortable. An abort byte stops the
  whole line, and a character that arrives while a non-abortable part executes has no
  defined effect, so ``AT+CFUN=1;+COPS=?`` is not abortable (though it is a scan).
"""

from __future__ import annotations

import re

__all__ = ["ABORTABLE_COMMANDS", "NETWORK_SCAN_COMMANDS", "normalise", "split_line", "is_abortable",
           "is_network_scan"]

# 27.007 §7.3: "+COPS=? ... can be aborted" (the operator list is a network search that
# takes seconds to minutes). Normalised form: upper case, no blanks, no AT prefix.
ABORTABLE_COMMANDS: frozenset[str] = frozenset({"+COPS=?"})
# Commands that search the air interface and may hold the channel for minutes.
NETWORK_SCAN_COMMANDS: frozenset[str] = frozenset({"+COPS=?"})

_QUOTED = re.compile(r'"[^"]*"?')


def normalise(command_line: str) -> str:
    """Upper case, blanks removed, outside quoted strings (kept verbatim)."""
    out, last = [], 0
    for m in _QUOTED.finditer(command_line):
        out.append(re.sub(r"\s+", "", command_line[last:m.start()]).upper())
        out.append(m.group(0))
        last = m.end()
    out.append(re.sub(r"\s+", "", command_line[last:]).upper())
    return "".join(out)


def split_line(command_line: str) -> list[str]:
    """``'at +csq; +cops = ?'`` -> ``['+CSQ', '+COPS=?']``; quoted strings emptied (their
    content is data, never a command); characters before the ``AT`` prefix dropped."""
    text = _QUOTED.sub('""', normalise(command_line))
    start = text.find("AT")
    body = text[start + 2:] if start >= 0 else text
    return [part for part in body.split(";") if part]


def is_network_scan(command_line: str) -> bool:
    """True if any command of the line is a network scan (``+COPS=?``), however joined:
    after ``;`` or after basic commands (``ATE0+COPS=?``)."""
    return any(scan in part for part in split_line(command_line) for scan in NETWORK_SCAN_COMMANDS)


def is_abortable(command_line: str) -> bool:
    """True if every command of the line is one V.250/27.007 lets the DTE abort."""
    parts = split_line(command_line)
    return bool(parts) and all(part in ABORTABLE_COMMANDS for part in parts)
