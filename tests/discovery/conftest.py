"""Helpers for the discovery tests: run a probe inside umockdev's fake /sys."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = HERE / "data"


def usb_modem_umockdev(busport: str, vid: int, pid: int, ifaces: list[tuple[int, str]]) -> str:
    """umockdev description of one USB modem whose interfaces carry ttyUSB ports
    (option driver layout: interface -> usb-serial port -> tty). The root hub is left out
    so several descriptions can be loaded into one testbed."""
    base = f"/devices/pci0000:00/0000:00:14.0/usb1/{busport}"
    blocks = []
    for ifnum, tty in ifaces:
        intf = f"{base}/{busport}:1.{ifnum}"
        blocks += [
            f"P: {intf}/{tty}/tty/{tty}\nN: {tty}\nE: DEVNAME=/dev/{tty}\nE: SUBSYSTEM=tty\n",
            f"P: {intf}/{tty}\nE: DRIVER=option1\nE: SUBSYSTEM=usb-serial\n",
            f"P: {intf}\nE: DEVTYPE=usb_interface\nE: DRIVER=option\nE: SUBSYSTEM=usb\nA: bInterfaceNumber={ifnum:02x}\n",
        ]
    blocks.append(f"P: {base}\nE: DEVTYPE=usb_device\nE: SUBSYSTEM=usb\nA: idVendor={vid:04x}\nA: idProduct={pid:04x}\n")
    return "\n".join(blocks)


@pytest.fixture(scope="session")
def umockdev_run() -> str:
    path = shutil.which("umockdev-run")
    if not path:
        pytest.skip("umockdev-run not installed (Debian package umockdev)")
    return path


@pytest.fixture(scope="session")
def gi_under_umockdev() -> list[str]:
    """argv prefix running the system python3 (with python3-gi and UMockdev's typelib)
    under umockdev's preload library; PyGObject is not a simagent dependency."""
    wrapper, python = shutil.which("umockdev-wrapper"), "/usr/bin/python3"
    check = [python, "-c", "import gi; gi.require_version('UMockdev', '1.0')"]
    if not wrapper or not Path(python).exists() or subprocess.run(check, capture_output=True).returncode:
        pytest.skip("needs umockdev-wrapper and system python3 with gir1.2-umockdev-1.0 (python3-gi)")
    return [wrapper, python]


@pytest.fixture
def probe(umockdev_run):
    """probe(device_files, profiles_json_or_'real') -> what discovery finds there."""

    def run(devices: list[Path], profiles: str) -> dict:
        argv = [umockdev_run]
        for device in devices:
            argv += ["--device", str(device)]
        argv += ["--", sys.executable, str(HERE / "probe_ports.py"), profiles]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    return run
