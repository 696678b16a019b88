"""Time stamps for evidence and events, and whether the wall clock can be trusted.

Terminals often have no RTC: after a cold boot the wall clock may read 1970 until NTP
or the network sets it. Every stamp therefore carries the wall time, whether it was
trustworthy (SPEC §5), the monotonic time since boot and the boot id, so a reader can
order entries within a boot even when the wall clock was wrong.

Network time (+CTZE/+CTZEU/+CCLK) is input from outside: a rogue cell can send any date.
`offer_network_time` takes it only inside a plausibility window: never before the build
date or the trusted floor, and never further than `MAX_DRIFT` from the time the agent
already trusts in this boot (an NTP-synchronised kernel clock, or network time accepted
earlier, carried forward by the monotonic clock) and, without NTP, from the first network time
of the boot carried forward (widening at `MAX_RATE`: steps each under `MAX_DRIFT` cannot
add up); the first network time of a boot
without NTP may be at most `MAX_OFFLINE` past the floor. A stamp is *agreed* when two
sources say the same within `AGREE_SLACK` (the NTP-synchronised kernel clock and network
time; a verified token's `iat` corroborates in `agent.core.tokens`): only agreed time ratchets
the trusted floor that token expiry falls back on (`agent.core.store`).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import functools
import time
from typing import Any
from dataclasses import dataclass
from pathlib import Path

from agent import BUILD_DATE

_TIME_ERROR = 5  # adjtimex() result while STA_UNSYNC (or STA_CLOCKERR) is set
_BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
BUILD_EPOCH = dt.datetime.fromisoformat(BUILD_DATE).replace(tzinfo=dt.timezone.utc).timestamp()
AGREE_SLACK = 120.0  # seconds two sources may differ and still agree (NITZ has second resolution, cells lag)
MAX_DRIFT = 300.0  # how far network time may move the trusted time of this boot
# How fast network time may move away from the first network time taken this boot, carried
# forward by the monotonic clock: a crystal's drift (tens of ppm), never a cell's creep.
MAX_RATE = 200e-6
MAX_OFFLINE = 400 * 86_400.0  # how far past the floor the first network time of a boot may be
MAX_FLOOR_AHEAD = 15 * 365 * 86_400.0  # a floor further past the build date was poisoned


@dataclass(frozen=True)
class Stamp:
    wall: float  # seconds since the epoch, as well as this device knows
    trusted: bool  # wall time came from a synchronised clock
    mono: float  # CLOCK_BOOTTIME seconds: uptime, including suspend
    boot_id: str
    agreed: bool = False  # two sources said this time (it may raise the trusted floor)

    def iso(self) -> str:
        return format_utc(self.wall)


def format_utc(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@functools.cache
def _adjtimex() -> Any:
    # The interpreter's own symbols include the C library's (dlopen(NULL)): no
    # ctypes.util.find_library, which runs ldconfig in a subprocess and imports shutil,
    # tempfile, bz2 and lzma into the daemon for good.
    try:
        return ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None


def kernel_clock_synchronised() -> bool:
    """True when the kernel says NTP (or PTP, chrony, ...) keeps the clock in sync."""
    adjtimex = _adjtimex()
    if adjtimex is None:
        return False
    timex = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
    state = adjtimex(timex)
    return state not in (-1, _TIME_ERROR)


def read_boot_id() -> str:
    try:
        return _BOOT_ID_PATH.read_text().strip()
    except OSError:
        return "unknown"


class Clock:
    """Produces stamps. Network time from the modem makes the wall time trustworthy
    without touching the system clock: it is kept as an offset to the monotonic clock."""

    def __init__(self, *, kernel_synchronised=kernel_clock_synchronised, build_epoch: float = BUILD_EPOCH,
                 wall=time.time) -> None:
        self._kernel_synchronised = kernel_synchronised
        self._wall = wall  # the system's wall clock (a seam: tests put it at 1970 and step it)
        self.build_epoch = build_epoch
        self._network_offset: float | None = None
        # (offset, monotonic time) of the first network time taken: each later one is held
        # to it, not to the last one taken, or many steps just under MAX_DRIFT would walk
        # the trusted time anywhere.
        self._network_anchor: tuple[float, float] | None = None
        self.boot_id = read_boot_id()

    @staticmethod
    def monotonic() -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def offer_network_time(self, utc_epoch: float, floor: float | None) -> str | None:
        """Takes network time when it is plausible; returns None, or why it was rejected."""
        mono = self.monotonic()
        lower = max(self.build_epoch, floor or 0.0)
        if utc_epoch < lower - AGREE_SLACK:
            which = "trusted floor" if floor is not None and floor > self.build_epoch else "build date"
            return f"{format_utc(utc_epoch)} is before the {which} {format_utc(lower)}"
        trusted = self._trusted_wall(mono)
        if trusted is not None and abs(utc_epoch - trusted) > MAX_DRIFT:
            return f"{format_utc(utc_epoch)} is {utc_epoch - trusted:+.0f} s from the trusted time {format_utc(trusted)}"
        if trusted is None and utc_epoch > lower + mono + MAX_OFFLINE:
            return f"{format_utc(utc_epoch)} is too far past the trusted floor {format_utc(lower)}"
        if self._network_anchor is not None and not self._kernel_synchronised():
            anchor_offset, anchor_mono = self._network_anchor
            allowed = MAX_DRIFT + (mono - anchor_mono) * MAX_RATE
            if abs(utc_epoch - (anchor_offset + mono)) > allowed:
                return (f"{format_utc(utc_epoch)} is {utc_epoch - (anchor_offset + mono):+.0f} s from the network time first "
                        f"taken this boot, carried forward ({allowed:.0f} s allowed)")
        self._network_offset = utc_epoch - mono
        if self._network_anchor is None or self._kernel_synchronised():
            # Checked against NTP just now: an anchor an earlier, wrong network time set
            # (NTP has since corrected the trusted time) must not outlive NTP.
            self._network_anchor = (self._network_offset, mono)
        return None

    def set_network_time(self, utc_epoch: float) -> None:
        """Takes network time unchecked (tests and tools; the agent uses offer_network_time)."""
        self._network_offset = utc_epoch - self.monotonic()

    def _trusted_wall(self, mono: float) -> float | None:
        if self._kernel_synchronised():
            return self._wall()
        if self._network_offset is not None:
            return mono + self._network_offset
        return None

    def now(self) -> Stamp:
        mono = self.monotonic()
        network = None if self._network_offset is None else mono + self._network_offset
        if self._kernel_synchronised():
            wall = self._wall()
            return Stamp(wall, True, mono, self.boot_id, network is not None and abs(network - wall) <= AGREE_SLACK)
        if network is not None:
            return Stamp(network, True, mono, self.boot_id)
        return Stamp(self._wall(), False, mono, self.boot_id)

    def floor_repair(self, floor: float | None) -> float | None:
        """A trusted floor no rule of this version could have set (an earlier version
        ratcheted it on one forged network time): the value to put in its place, or None
        when it is plausible."""
        if floor is None:
            return None
        upper = self._wall() + AGREE_SLACK if self._kernel_synchronised() else self.build_epoch + MAX_FLOOR_AHEAD
        if floor <= upper:
            return None
        return max(self.build_epoch, upper if self._kernel_synchronised() else self.build_epoch)
