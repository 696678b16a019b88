"""Child process for the monitor test: system python3 with PyGObject drives umockdev's
Testbed (hot-plug, uevents) while at_commands.discovery.watch() listens on the asyncio
loop. Run as ``umockdev-wrapper /usr/bin/python3 watch_events.py REPO DATA_DIR``.

PyGObject is not a simagent dependency, so the venv has none; this script therefore runs
under the system interpreter (python3-gi) and imports pyudev from the venv's
site-packages and the code under test from the repository. Prints one JSON line per event.
"""

import asyncio
import glob
import json
import sys

REPO, DATA = sys.argv[1], sys.argv[2]
sys.path[:0] = [REPO, *glob.glob(f"{REPO}/.venv/lib/python3*/site-packages")]

import gi  # noqa: E402

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402

import pyudev  # noqa: E402

from at_commands import discovery  # noqa: E402
from at_commands.profiles import Profile, UsbLayout  # noqa: E402

QUECTEL_SECONDARY_TTY = "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.3/ttyUSB3/tty/ttyUSB3"
PROFILES = [
    Profile("quectel", usb=(UsbLayout(0x2C7C, 0x0125, primary_if=2, secondary_if=3),)),
    Profile("ublox", usb=(UsbLayout(0x1546, 0x1141, primary_if=0),)),
]


def emit(label: str, event: discovery.PortEvent) -> None:
    print(json.dumps({"step": label, "action": event.action, "devnode": event.port.devnode, "role": event.port.role, "profile": event.port.profile_name}), flush=True)


async def main() -> None:
    testbed = UMockdev.Testbed.new()
    testbed.add_from_file(f"{DATA}/ublox-acm.umockdev")  # present before watching: no event
    events = discovery.watch(PROFILES, pyudev.Context())
    first = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(0.2)  # let watch() subscribe before the hot-plug
    testbed.add_from_file(f"{DATA}/uart.umockdev")  # not a modem: no event
    testbed.add_from_file(f"{DATA}/quectel-ec25.umockdev")  # modem plugged in
    emit("plug", await asyncio.wait_for(first, 10))
    emit("plug", await asyncio.wait_for(events.__anext__(), 10))
    testbed.uevent(QUECTEL_SECONDARY_TTY, "remove")
    emit("unplug", await asyncio.wait_for(events.__anext__(), 10))
    testbed.uevent("/sys/devices/pci0000:00/0000:00:14.0/usb1/1-4/1-4:1.0/tty/ttyACM0", "remove")
    emit("unplug-present", await asyncio.wait_for(events.__anext__(), 10))
    await events.aclose()


asyncio.run(main())
