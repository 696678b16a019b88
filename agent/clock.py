"""Time stamps for evidence and events, and whether the wall clock can be trusted.

Terminals often have no RTC: after a cold boot the wall clock may read 1970 until NTP
or the network sets it. Every stamp therefore carries the wall time, whether it was
trustworthy (SPEC §5), the monotonic time since boot and the boot id, so a reader can
order entries within a boot even when the wall clock was wrong.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import functools
import time
from dataclasses import dataclass
from pathlib import Path

_TIME_ERROR = 5  # adjtimex() result while STA_UNSYNC (or STA_CLOCKERR) is set
_BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class Stamp:
    wall: float  # seconds since the epoch, as well as this device knows
    trusted: bool  # wall time came from a synchronised clock
    mono: float  # CLOCK_BOOTTIME seconds: uptime, including suspend
    boot_id: str

    def iso(self) -> str:
        return format_utc(self.wall)


def format_utc(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # find_library runs ldconfig: once per process, not once per stamp.
    libc_name = ctypes.util.find_library("c")
    return None if libc_name is None else ctypes.CDLL(libc_name, use_errno=True)


def kernel_clock_synchronised() -> bool:
    """True when the kernel says NTP (or PTP, chrony, ...) keeps the clock in sync."""
    libc = _libc()
    if libc is None:
        return False
    timex = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
    state = libc.adjtimex(timex)
    return state not in (-1, _TIME_ERROR)


def read_boot_id() -> str:
    try:
        return _BOOT_ID_PATH.read_text().strip()
    except OSError:
        return "unknown"


class Clock:
    """Produces stamps. Network time from the modem (+CTZE/+CCLK) makes the wall time
    trustworthy without touching the system clock: it is kept as an offset to the
    monotonic clock."""

    def __init__(self, *, kernel_synchronised=kernel_clock_synchronised) -> None:
        self._kernel_synchronised = kernel_synchronised
        self._network_offset: float | None = None
        self.boot_id = read_boot_id()

    @staticmethod
    def monotonic() -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def set_network_time(self, utc_epoch: float) -> None:
        self._network_offset = utc_epoch - self.monotonic()

    def now(self) -> Stamp:
        mono = self.monotonic()
        if self._kernel_synchronised():
            return Stamp(time.time(), True, mono, self.boot_id)
        if self._network_offset is not None:
            return Stamp(mono + self._network_offset, True, mono, self.boot_id)
        return Stamp(time.time(), False, mono, self.boot_id)
