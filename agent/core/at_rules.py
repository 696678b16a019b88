"""Which AT command lines a caller (technician, platform) may send, and when: the policy.
What a line *is* (query, write, network scan, IMEI rewrite...) is the AT vocabulary's
(`at_commands.commands`); this module only decides what each caller may do with it:

* Queries need nothing more.
* A network scan (``AT+COPS=?``) needs what a write needs (root and ``--unsafe`` on the
  control socket, a token from the platform), and it must stand alone on its line so
  that it stays abortable and never delays the radio gate.
* Everything else is a *write* and needs ``--unsafe``.
* IMEI rewrites are refused always, ``--unsafe`` or not, and so are lines with control
  characters (a Ctrl-Z would turn a command into a payload) and settings that break the
  AT session's framing.
* While the radio gate holds the radio off, only harmless writes go through; everything
  else, ``+CFUN=1``, ``+CFUN=1,1``, ``+CGATT=1``, ``+COPS=0`` and any write not known to be
  harmless, is refused to every caller, root included (`agent.service.enforcer`).
"""

from __future__ import annotations

from typing import Any

from at_commands.client import Response
from at_commands.commands import (breaks_the_session, is_abortable, is_command_line, is_imei_rewrite,
                                  is_network_scan, is_query)


class Refused(Exception):
    """A command that must not be sent. ``code`` is the control-socket error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_command(command: str, unsafe: bool) -> None:
    """Raises ``Refused`` unless ``command`` may be sent (with ``unsafe`` for writes)."""
    if any(not 32 <= ord(c) < 127 for c in command.strip()):
        raise Refused("bad_args", "refused: control or non-ASCII characters in the command")
    if not is_command_line(command):
        raise Refused("bad_args", "refused: not an AT command (a command line starts with AT)")
    if is_imei_rewrite(command):
        raise Refused("imei_rewrite_refused", "refused: this command rewrites the IMEI; simagent never sends it")
    if breaks_the_session(command):
        raise Refused("bad_args", "refused: this setting changes how the modem frames its answers (V0, Q1, S3=, S4=); "
                                     "simagent's AT session depends on them")
    if is_network_scan(command) and not is_abortable(command):
        # Joined to another command the scan cannot be aborted (V.250 defines the abort
        # for the abortable command alone), so it would hold the radio gate back.
        raise Refused("bad_args", "refused: send a network scan on a line of its own (AT+COPS=?), "
                      "so that the radio gate can abort it")
    if not unsafe and not is_query(command):
        what = "this network scan holds the modem for minutes" if is_network_scan(command) else "this command changes the modem"
        raise Refused("unsafe_required", f"refused: {what}; repeat it with --unsafe")


def at_result(response: Response) -> dict[str, Any]:
    """The JSON result of one AT command (also the daemon's `at` op result)."""
    return {"lines": list(response.lines), "final": response.final.line, "ok": response.final.ok}
