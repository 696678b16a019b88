"""ModemManager, an independent client, probes the fake (issue 14 item 2).

Real parts: ModemManager 1.20 (Debian's) on a private system D-Bus of its own, seeing a
umockdev testbed with a Quectel EC25 and a SIMCom SIM7600 on USB, each tty relayed to a fake
modem of that profile. ``mmcli`` must then report the identity the fakes serve, and
ModemManager must still be running (it crashed with SIGSEGV on the fake's old bare ``OK``
to ``AT+CTZU=?``). Each modem's tty that our udev rule (systemd/99-simagent.rules) marks
``ID_MM_PORT_IGNORE`` gets the property as udev would set it: ModemManager must list that
port as ignored and never write to it, while it manages the other port.

Skipped with the reason when ModemManager, mmcli, dbus-daemon, umockdev (with the system
python3's GObject bindings) or a C compiler for the TIOCEXCL shim are missing (Debian:
``./dev.sh setup`` installs them). About 10 s; marker ``modemmanager``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from at_commands import profiles
from simagent_lab.fakemodem import luhn_check_digit

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RULES = REPO / "systemd" / "99-simagent.rules"
MODEMMANAGER = "/usr/sbin/ModemManager"
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.modemmanager

# The TIOCEXCL answer umockdev 0.17 lacks: ModemManager locks every serial port it opens.
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <sys/ioctl.h>
int ioctl(int fd, unsigned long request, ...) {
    static int (*next)(int, unsigned long, ...);
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (request == TIOCEXCL || request == TIOCNXCL)
        return 0;
    if (!next)
        next = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    return next(fd, request, arg);
}
"""

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
"""


def _missing() -> str | None:
    for tool, package in ((MODEMMANAGER, "modemmanager"), ("mmcli", "modemmanager"),
                          ("dbus-daemon", "dbus-daemon"), ("umockdev-wrapper", "umockdev"), ("cc", "gcc")):
        if not shutil.which(tool):
            return f"{tool} not installed (Debian package {package}; ./dev.sh setup installs it)"
    check = [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('UMockdev', '1.0')"]
    if not Path(SYSTEM_PYTHON).exists() or subprocess.run(check, capture_output=True).returncode:
        return "system python3 without UMockdev's GObject bindings (python3-gi, gir1.2-umockdev-1.0)"
    return None


def ignored_interface(vid: int, pid: int) -> int:
    """The interface our shipped udev rule gives ID_MM_PORT_IGNORE=1 for this VID:PID."""
    for line in RULES.read_text().splitlines():
        m = re.search(r'idVendor}=="([0-9a-f]{4})".*idProduct}=="([0-9a-f]{4})".*IFNUM}=="([0-9a-f]{2})"', line)
        if m and 'ENV{ID_MM_PORT_IGNORE}="1"' in line and (int(m[1], 16), int(m[2], 16)) == (vid, pid):
            return int(m[3], 16)
    raise AssertionError(f"{vid:04x}:{pid:04x} not in {RULES}")


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> str:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("shim")
    (out / "tiocexcl.c").write_text(SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(out / "tiocexcl.so"), str(out / "tiocexcl.c"), "-ldl"],
                   check=True, capture_output=True)
    return str(out / "tiocexcl.so")


@pytest.fixture
def system_bus(tmp_path: Path):
    socket = tmp_path / "system_bus_socket"
    config = tmp_path / "bus.conf"
    config.write_text(BUS_CONFIG.format(socket=socket))
    daemon = subprocess.Popen(["dbus-daemon", "--config-file", str(config), "--nofork"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while not socket.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"unix:path={socket}"
    daemon.terminate()
    daemon.wait(5)


def mmcli(bus: str, *args: str) -> dict | None:
    proc = subprocess.run(["mmcli", "-J", *args], capture_output=True, text=True, timeout=10,
                          env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus))
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None


MODEMS = (  # (profile, VID:PID, AT interfaces): the layouts of our profiles' data
    (profiles.QUECTEL, 0x2C7C, 0x0125),
    (profiles.SIMCOM, 0x1E0E, 0x9001),
)


def test_modemmanager_probes_the_fakes_to_a_full_identity(shim, system_bus, tmp_path, fake_modem_factory):
    devices, fakes = [], []
    for n, (profile, vid, pid) in enumerate(MODEMS):
        layout = profile.layout_for(vid, pid)
        ignored = ignored_interface(vid, pid)
        assert {layout.primary_if, layout.secondary_if} >= {ignored}
        ports = []
        for ifnum in (layout.primary_if, layout.secondary_if):
            iccid, imei = f"8986001234567890{n}{ifnum:02d}0", f"8674000300{n}{ifnum:03d}"
            fake = fake_modem_factory(profile=profile.name, iccid=iccid, imsi=f"46000123456{n}{ifnum:03d}",
                                      imei=imei + luhn_check_digit(imei))
            fakes.append((profile, ifnum == ignored, fake, iccid))
            ports.append({"interface": ifnum, "link": str(fake.port),
                          "properties": {"ID_MM_PORT_IGNORE": "1"} if ifnum == ignored else {}})
        devices.append({"busport": f"1-{n + 1}", "vid": vid, "pid": pid, "ports": ports,
                        "manufacturer": profile.sample_manufacturer, "product": profile.sample_model})
    spec = {"modemmanager": MODEMMANAGER, "preload": shim, "log": str(tmp_path / "mm.log"), "devices": devices}
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=system_bus)
    helper = subprocess.Popen(["umockdev-wrapper", SYSTEM_PYTHON, str(HERE / "mm_testbed.py"), json.dumps(spec)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert helper.stdout.readline().strip() == "READY"
        seen = wait_for_modems(system_bus, len(MODEMS), timeout=40)
    finally:
        helper.stdin.close()
        exit_line = helper.stdout.read().strip()
        helper.wait(20)
    log = (tmp_path / "mm.log").read_text(errors="replace")
    assert exit_line == "EXIT 0", f"ModemManager did not stop cleanly ({exit_line}); log tail:\n{log[-3000:]}"
    assert len(seen) == len(MODEMS), f"ModemManager found {sorted(seen)}; log tail:\n{log[-3000:]}"

    for profile, ours, fake, iccid in fakes:
        if ours:  # ModemManager honoured ID_MM_PORT_IGNORE: not one byte reached this fake
            assert fake.state()["counters"]["commands"] == 0, profile.name
            continue
        state = fake.state()
        modem = seen[state["imei"]]
        assert (modem["manufacturer"], modem["model"]) == (profile.sample_manufacturer, profile.sample_model)
        assert modem["iccid"] == iccid and modem["imsi"] == state["imsi"]
        assert sorted(p.split()[1] for p in modem["ports"]) == ["(at)", "(ignored)"], modem["ports"]


def wait_for_modems(bus: str, count: int, timeout: float) -> dict[str, dict]:
    """IMEI -> what mmcli reports, once ``count`` modems have a SIM with its ICCID read."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(seen) < count:
        time.sleep(0.5)
        listing = mmcli(bus, "-L") or {}
        for path in listing.get("modem-list", []):
            modem = (mmcli(bus, "-m", path) or {}).get("modem", {})
            generic, sim_path = modem.get("generic", {}), modem.get("generic", {}).get("sim", "--")
            if sim_path in ("", "--"):
                continue
            sim = (mmcli(bus, "-i", sim_path) or {}).get("sim", {}).get("properties", {})
            if sim.get("iccid", "--") not in ("", "--"):
                seen[modem["3gpp"]["imei"]] = {**generic, "iccid": sim["iccid"], "imsi": sim.get("imsi")}
    return seen
