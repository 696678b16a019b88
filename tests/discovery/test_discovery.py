"""at_commands.discovery against umockdev's fake udev/sysfs (real libudev, real pyudev)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from at_commands import discovery
from at_commands.discovery import DiscoveredPort
from at_commands.profiles import PROFILES, Profile, UsbLayout

from .conftest import DATA, HERE, REPO, usb_modem_umockdev

# Layouts of the three modems in data/, given to the code under test so these tests do
# not depend on what at_commands/profiles.py holds.
LAYOUTS = [
    {"name": "quectel", "usb": [[0x2C7C, 0x0125, 2, 3]]},
    {"name": "simcom", "usb": [[0x1E0E, 0x9001, 2, 3]]},
    {"name": "ublox", "usb": [[0x1546, 0x1141, 0, None]]},  # one AT port only
]
NOISE = [DATA / "ftdi-adapter.umockdev", DATA / "uart.umockdev"]


def _port(devnode: str, profile: str, vid: int, pid: int, interface: int, role: str) -> dict:
    return {"devnode": devnode, "profile_name": profile, "vid": vid, "pid": pid, "interface": interface, "role": role}


@pytest.mark.parametrize(
    ("device", "primary", "secondary"),
    [
        ("quectel-ec25", _port("/dev/ttyUSB2", "quectel", 0x2C7C, 0x0125, 2, "primary"), _port("/dev/ttyUSB3", "quectel", 0x2C7C, 0x0125, 3, "secondary")),
        ("simcom-sim7600", _port("/dev/ttyUSB2", "simcom", 0x1E0E, 0x9001, 2, "primary"), _port("/dev/ttyUSB3", "simcom", 0x1E0E, 0x9001, 3, "secondary")),
        # no secondary interface: both roles fall back to the primary port
        ("ublox-acm", _port("/dev/ttyACM0", "ublox", 0x1546, 0x1141, 0, "primary"), _port("/dev/ttyACM0", "ublox", 0x1546, 0x1141, 0, "primary")),
    ],
)
def test_picks_the_interface_of_each_role(probe, device, primary, secondary) -> None:
    found = probe([DATA / f"{device}.umockdev", *NOISE], json.dumps(LAYOUTS))
    assert found["chosen"] == {"primary": primary, "secondary": secondary}
    # DM/NMEA/audio interfaces, the FTDI adapter and the UART are not AT ports
    assert {p["devnode"] for p in found["ports"]} == {primary["devnode"], secondary["devnode"]}


def test_nothing_found_without_a_known_modem(probe) -> None:
    found = probe(NOISE, json.dumps(LAYOUTS))
    assert found == {"ports": [], "chosen": {"primary": None, "secondary": None}}


def test_real_profiles(probe, tmp_path: Path) -> None:
    """Every USB layout in at_commands.profiles, plugged in as a fake modem, is found and
    the owned interface is the one the udev rule names."""
    layouts = [(p.name, layout) for p in PROFILES.values() for layout in p.usb]
    devices, expected = [], {}
    for i, (name, layout) in enumerate(layouts):
        ifaces = sorted(discovery.layout_roles(layout))
        ttys = [(n, f"ttyUSB{10 * i + j}") for j, n in enumerate(ifaces)]
        device = tmp_path / f"{i}.umockdev"
        device.write_text(usb_modem_umockdev(f"1-{i + 10}", layout.vid, layout.pid, ttys))
        devices.append(device)
        owned = dict(ttys)[discovery.owned_interface(layout, "secondary")]
        expected[f"/dev/{owned}"] = (layout.vid, layout.pid)
    found = probe([*devices, *NOISE], "real")
    found_ports = {p["devnode"]: p for p in found["ports"]}
    # every secondary-role pick is present and matched to its VID:PID (profiles may share
    # a VID:PID, so the profile name is not asserted)
    for devnode, (vid, pid) in expected.items():
        assert (found_ports[devnode]["vid"], found_ports[devnode]["pid"]) == (vid, pid)
    assert not any(p["devnode"] in ("/dev/ttyUSB9", "/dev/ttyS0") for p in found["ports"])
    assert (found["chosen"]["secondary"] is None) == (not layouts)


def test_choose_prefers_role_then_devnode() -> None:
    a = DiscoveredPort("/dev/ttyUSB2", "q", 1, 2, 2, "primary")
    b = DiscoveredPort("/dev/ttyUSB3", "q", 1, 2, 3, "secondary")
    c = DiscoveredPort("/dev/ttyUSB7", "s", 3, 4, 3, "secondary")
    assert discovery.choose([c, a, b], "secondary") == b
    assert discovery.choose([c, a, b], "primary") == a
    assert discovery.choose([a], "secondary") == a
    assert discovery.choose([], "primary") is None
    with pytest.raises(ValueError):
        discovery.choose([a], "tertiary")


def test_wanted_port_expected() -> None:
    profiles = [Profile("q", usb=(UsbLayout(0x2C7C, 0x0125, 2, 3),)), Profile("u", usb=(UsbLayout(0x1546, 0x1141, 0),))]
    primary = DiscoveredPort("/dev/ttyUSB2", "q", 0x2C7C, 0x0125, 2, "primary")
    # the secondary port of this layout has not appeared yet: worth waiting for
    assert discovery.wanted_port_expected(primary, "secondary", profiles)
    assert not discovery.wanted_port_expected(primary, "primary", profiles)
    # a layout without a secondary port: the primary is all there will be
    only = DiscoveredPort("/dev/ttyACM0", "u", 0x1546, 0x1141, 0, "primary")
    assert not discovery.wanted_port_expected(only, "secondary", profiles)
    secondary = DiscoveredPort("/dev/ttyUSB3", "q", 0x2C7C, 0x0125, 3, "secondary")
    assert discovery.wanted_port_expected(secondary, "primary", profiles)


def test_classify() -> None:
    profiles = [Profile("q", usb=(UsbLayout(0x2C7C, 0x0125, 2, 3),))]
    assert discovery.classify("/dev/x", 0x2C7C, 0x0125, 3, profiles).role == "secondary"
    assert discovery.classify("/dev/x", 0x2C7C, 0x0125, 0, profiles) is None
    assert discovery.classify("/dev/x", 0x2C7C, 0x0126, 2, profiles) is None


def test_monitor_reports_plug_and_unplug(gi_under_umockdev) -> None:
    proc = subprocess.run([*gi_under_umockdev, str(HERE / "watch_events.py"), str(REPO), str(DATA)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events == [
        {"step": "plug", "action": "add", "devnode": "/dev/ttyUSB2", "role": "primary", "profile": "quectel"},
        {"step": "plug", "action": "add", "devnode": "/dev/ttyUSB3", "role": "secondary", "profile": "quectel"},
        {"step": "unplug", "action": "remove", "devnode": "/dev/ttyUSB3", "role": "secondary", "profile": "quectel"},
        # a port present before watch() started is still recognised when it goes away
        {"step": "unplug-present", "action": "remove", "devnode": "/dev/ttyACM0", "role": "primary", "profile": "ublox"},
    ]


def test_udev_events_drive_the_daemon(gi_under_umockdev) -> None:
    """`simagent run` with port = "auto" against umockdev: no modem, a Quectel EC25 plugged
    in (the daemon opens its secondary AT port, bridged to a fake modem, and binds), pulled
    out (modem_lost) and plugged in again (binding ok). See daemon_hotplug.py."""
    proc = subprocess.run([*gi_under_umockdev, str(HERE / "daemon_hotplug.py"), str(REPO), str(DATA)],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert "error" not in result, result
    steps = result["steps"]
    assert steps["start"]["status"].startswith("waiting for modem")
    for step, port, decision in (("plug", "/dev/ttyUSB3", "binding bound"), ("replug", "/dev/ttyUSB7", "binding ok")):
        assert steps[step]["status"] == decision
        # the daemon opened the secondary AT port and no other tty of the modem (the
        # primary one appears first), and the add woke it: the fallback poll is 5 s
        assert list(steps[step]["opened"]) == [port], steps[step]
        assert steps[step]["opened"][port] < 3.0, steps[step]
    assert steps["unplug"]["status"].startswith("waiting for modem")
    modem_events = [(e["type"], e["data"]["port"]) for e in result["evidence"] if e["type"].startswith("modem_")]
    # Plugged within the boot grace: no modem_lost for the first seconds without it.
    assert modem_events == [("modem_found", "/dev/ttyUSB3"), ("modem_lost", "/dev/ttyUSB3"), ("modem_found", "/dev/ttyUSB7")]
    assert all(e["data"]["profile"] == "quectel" for e in result["evidence"] if e["type"] == "modem_found")
    assert [e["type"] for e in result["evidence"]].count("bound") == 1
    assert result["exit_code"] == 0


def test_data_counters_come_from_the_modems_own_network_interface(umockdev_run):
    """Telemetry's data counters: the net interfaces under the AT port's USB device only
    (wwan0 here, not the board's eth0); none for a port that is no USB modem."""
    argv = [umockdev_run, "--device", str(DATA / "modem-netdev.umockdev"), "--device", str(DATA / "uart.umockdev"),
            "--", sys.executable, str(HERE / "probe_counters.py"), "/dev/ttyUSB23", "/dev/ttyS0"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "/dev/ttyUSB23": {"interfaces": ["wwan0"], "rx_bytes": 123456, "tx_bytes": 7890},
        "/dev/ttyS0": None,
    }
