"""Vendor profiles: what we know about each module family, as data.

Modelled on ModemManager's plugins: a profile declares how to find the module (USB IDs
and AT interface numbers, vendor strings), how to read its ICCID, how it announces SIM
hot-swap and boot, and which commands must never be sent (IMEI rewrite). Code that
needs vendor knowledge reads it from here; it does not branch on vendor names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class UsbLayout:
    """One USB composition: VID:PID and which interface numbers carry AT ports."""

    vid: int
    pid: int
    primary_if: int
    secondary_if: int | None = None
    model: str = ""


@dataclass(frozen=True)
class Profile:
    name: str
    # Regexes (case-insensitive) matched against +CGMI / ATI output for auto-detection.
    vendor_patterns: tuple[str, ...] = ()
    usb: tuple[UsbLayout, ...] = ()
    # Vendor ICCID query and the tag its answer carries (e.g. SIMCom AT+CICCID -> +ICCID:).
    iccid_command: str | None = None
    iccid_tag: str | None = None
    # Commands that switch on SIM hot-swap reporting, and regexes of the URCs that
    # report insertion / removal. Without hot-swap URCs the agent polls +CPIN?.
    hotswap_enable: tuple[str, ...] = ()
    sim_inserted_urcs: tuple[str, ...] = ()
    sim_removed_urcs: tuple[str, ...] = ()
    # URCs a module prints when it has (re)booted and is ready for commands.
    boot_urcs: tuple[str, ...] = ()
    # Regexes of commands that rewrite the IMEI: always refused, whoever asks.
    imei_rewrite_commands: tuple[str, ...] = ()
    # Commands that make the module boot with RF off (None: the module cannot be told).
    boot_rf_off: tuple[str, ...] | None = None
    extra_signal_commands: tuple[str, ...] = ()
    # Fake-modem dialect details.
    echo_default: bool = True
    notes: str = ""

    _compiled: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def matches_vendor(self, text: str) -> bool:
        return any(re.search(p, text, re.IGNORECASE) for p in self.vendor_patterns)


GENERIC = Profile(name="generic", notes="3GPP TS 27.007 only; ICCID via +CRSM or +CCID.")

PROFILES: dict[str, Profile] = {p.name: p for p in (GENERIC,)}


def get(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown modem profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
