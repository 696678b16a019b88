"""Run ModemManager on a umockdev testbed whose USB modems' ttys are relayed to fake modems.

Runs under ``umockdev-wrapper`` with the system python3 (PyGObject and UMockdev's typelib
are not simagent dependencies). argv[1] is a JSON spec::

    {"modemmanager": PATH, "preload": SHIM_SO, "log": PATH,
     "devices": [{"busport": "1-1", "vid": 0x2c7c, "pid": 0x0125, "manufacturer": ..., "product": ...,
                  "ports": [{"interface": 2, "link": FAKE_PTY, "properties": {"ID_MM_PORT_IGNORE": "1"}}]}]}

Each tty gets what udev would give it on a real machine: ModemManager's candidate tag
(80-mm-candidate.rules), the USB identity properties, and the properties the test passes
(those of our own rule). Prints ``READY`` once ModemManager runs, relays bytes until
stdin closes, then stops ModemManager and prints ``EXIT <returncode>`` (negative: killed by
that signal, e.g. -11 for a crash).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tty

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402


def describe(device: dict, first_minor: int) -> tuple[str, list[tuple[str, str]]]:
    """umockdev text for one USB modem, and its (devnode, fake link) pairs."""
    busport, vid, pid = device["busport"], device["vid"], device["pid"]
    base = f"/devices/pci0000:00/0000:00:14.0/usb1/{busport}"
    identity = f"E: ID_VENDOR_ID={vid:04x}\nE: ID_MODEL_ID={pid:04x}\nE: ID_BUS=usb\n"
    blocks, pairs = [], []
    for n, port in enumerate(device["ports"]):
        ifnum, minor = port["interface"], first_minor + n
        name = f"ttyUSB{minor}"
        intf = f"{base}/{busport}:1.{ifnum}"
        extra = "".join(f"E: {k}={v}\n" for k, v in port.get("properties", {}).items())
        blocks += [
            f"P: {intf}/{name}/tty/{name}\nN: {name}\nE: DEVNAME=/dev/{name}\nE: SUBSYSTEM=tty\n"
            f"E: ID_MM_CANDIDATE=1\n{identity}E: ID_USB_INTERFACE_NUM={ifnum:02x}\n{extra}A: dev=188:{minor}\n",
            f"P: {intf}/{name}\nE: DRIVER=option1\nE: SUBSYSTEM=usb-serial\n",
            f"P: {intf}\nE: DEVTYPE=usb_interface\nE: DRIVER=option\nE: SUBSYSTEM=usb\n"
            f"A: bInterfaceNumber={ifnum:02x}\nA: bInterfaceClass=ff\n",
        ]
        pairs.append((f"/dev/{name}", port["link"]))
    blocks.append(f"P: {base}\nE: DEVTYPE=usb_device\nE: SUBSYSTEM=usb\nE: DRIVER=usb\n{identity}"
                  f"A: idVendor={vid:04x}\nA: idProduct={pid:04x}\nA: manufacturer={device['manufacturer']}\n"
                  f"A: product={device['product']}\nA: busnum=1\nA: devnum={2 + first_minor}\n")
    return "\n".join(blocks), pairs


def main() -> int:
    spec = json.loads(sys.argv[1])
    testbed = UMockdev.Testbed.new()
    sel = selectors.DefaultSelector()
    peer: dict[int, int] = {}
    minor = 0
    for device in spec["devices"]:
        text, pairs = describe(device, minor)
        minor += len(pairs)
        testbed.add_from_string(text)
        for devnode, link in pairs:
            inner = testbed.get_dev_fd(devnode)  # the master side of the testbed's tty
            fake = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            tty.setraw(fake)
            os.set_blocking(inner, False)
            peer[inner], peer[fake] = fake, inner
            sel.register(inner, selectors.EVENT_READ)
            sel.register(fake, selectors.EVENT_READ)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ)
    # The testbed sets UMOCKDEV_DIR in the C environment only; the child needs it too. The
    # shim answers TIOCEXCL, which umockdev 0.17 does not emulate on its ttys.
    env = dict(os.environ, UMOCKDEV_DIR=testbed.get_root_dir(),
               LD_PRELOAD=f"{spec['preload']} {os.environ.get('LD_PRELOAD', '')}".strip())
    with open(spec["log"], "w") as log:
        mm = subprocess.Popen([spec["modemmanager"], "--debug", "--test-no-suspend-resume"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    print("READY", flush=True)
    running = True
    while running:
        for key, _ in sel.select(0.5):
            if key.fd == sys.stdin.fileno():
                running = bool(os.read(key.fd, 4096))
                continue
            try:
                data = os.read(key.fd, 4096)
            except (BlockingIOError, OSError):
                continue
            if data:
                os.write(peer[key.fd], data)
    if mm.poll() is None:
        mm.send_signal(signal.SIGTERM)
        try:
            mm.wait(10)
        except subprocess.TimeoutExpired:
            mm.kill()
            mm.wait()
            print("EXIT killed", flush=True)
            return 0
    print(f"EXIT {mm.returncode}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
