"""systemd/: the unit under the real systemd-analyze, the generated udev rule, and the
sysusers.d/tmpfiles.d snippets applied by the real tools to a scratch root."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from at_commands import discovery

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "simagent.service"
INSTALLED_EXEC = "/usr/bin/simagent"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} not installed")
    return path


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_exposure_is_at_most_2() -> None:
    proc = subprocess.run([_tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(UNIT)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for simagent\.service: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.0, proc.stdout


def test_verify_is_clean(tmp_path: Path) -> None:
    # The unit names the packaged binary; point a copy at an existing executable so
    # verify checks everything else rather than failing on a missing /usr/bin/simagent.
    executable = ROOT / ".venv" / "bin" / "simagent"
    if not executable.exists():
        executable = Path(sys.executable)
    copy = tmp_path / "simagent.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED_EXEC, str(executable)))
    proc = subprocess.run([_tool("systemd-analyze"), "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr.strip()) == (0, "")


def test_unit_contract() -> None:
    s = _unit_settings()
    expected = {
        "Type": ["notify"], "NotifyAccess": ["main"], "WatchdogSec": ["30"], "Restart": ["on-failure"],
        "RestartPreventExitStatus": ["78"], "ExecStart": [f"{INSTALLED_EXEC} run"], "ExecReload": ["/bin/sh -c 'kill -HUP $$MAINPID'"],
        "User": ["simagent"], "SupplementaryGroups": ["dialout"], "StateDirectory": ["simagent"],
        "RuntimeDirectory": ["simagent"], "ConfigurationDirectory": ["simagent"], "UMask": ["0077"],
        "PrivateDevices": None, "DevicePolicy": ["closed"],
    }
    for key, value in expected.items():
        assert s.get(key) == value, key
    # the AT port classes are reachable, the udev netlink socket and the broker too
    assert {"char-ttyUSB rw", "char-ttyACM rw"} <= set(s["DeviceAllow"])
    assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}
    # the exit code the unit refuses to restart on is the CLI's config error code
    from agent import exitcodes

    assert s["RestartPreventExitStatus"] == [str(exitcodes.CONFIG)]


def test_udev_rule_is_generated_from_the_profiles() -> None:
    assert (SYSTEMD / "99-simagent.rules").read_text() == discovery.udev_rules()


_RULE_KEY = re.compile(r'(?P<key>[A-Z_]+)(\{(?P<attr>[^}]+)\})?\s*(?P<op>==|!=|\+=|-=|:=|=)\s*"(?P<value>[^"]*)"')
_MATCH_KEYS = {"ACTION", "SUBSYSTEM", "SUBSYSTEMS", "ATTRS", "ENV", "KERNEL"}
_ASSIGN_KEYS = {"ENV", "SYMLINK", "GROUP", "MODE", "GOTO", "LABEL"}


def _parse_rules(text: str) -> list[list[dict]]:
    """Minimal udev rules syntax check (udevadm verify arrived in systemd 253): every
    line is comma-separated KEY[{attr}] OP "value" with known keys and operators, every
    GOTO has its LABEL."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split('", ')]
        parts = [p if p.endswith('"') else p + '"' for p in parts]
        rule = []
        for part in parts:
            m = _RULE_KEY.fullmatch(part)
            assert m, f"line {number}: cannot parse {part!r}"
            op_is_match = m["op"] in ("==", "!=")
            assert m["key"] in (_MATCH_KEYS if op_is_match else _ASSIGN_KEYS), f"line {number}: {m['key']}{m['op']}"
            rule.append(m.groupdict())
        rules.append(rule)
    labels = {k["value"] for r in rules for k in r if k["key"] == "LABEL"}
    assert {k["value"] for r in rules for k in r if k["key"] == "GOTO"} <= labels
    return rules


def test_udev_rule_syntax_and_content() -> None:
    from at_commands.profiles import Profile, UsbLayout

    profiles = [
        Profile("quectel", usb=(UsbLayout(0x2C7C, 0x0125, 2, 3, model="EC25"),)),
        Profile("ublox", usb=(UsbLayout(0x1546, 0x1141, 0),)),
    ]
    text = discovery.udev_rules(profiles)
    rules = _parse_rules(text)
    device_rules = [r for r in rules if any(k["key"] == "SYMLINK" for k in r)]
    as_dict = [{(k["key"], k["attr"], k["op"]): k["value"] for k in r} for r in device_rules]
    assert [(d[("ATTRS", "idVendor", "==")], d[("ATTRS", "idProduct", "==")], d[("ENV", ".SIMAGENT_IFNUM", "==")]) for d in as_dict] == [
        ("2c7c", "0125", "03"),  # the secondary port
        ("1546", "1141", "00"),  # no secondary: the primary
    ]
    for d in as_dict:
        assert d[("SYMLINK", None, "+=")] == "simagent-at"
        assert d[("GROUP", None, "=")] == "dialout"
        assert d[("ENV", "ID_MM_PORT_IGNORE", "=")] == "1"
    assert "03" in discovery.udev_rules(profiles, role="secondary") and '=="02"' in discovery.udev_rules(profiles, role="primary")
    _parse_rules((SYSTEMD / "99-simagent.rules").read_text())


def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for d in ("etc", "var/lib", "run"):
        (root / d).mkdir(parents=True)
    proc = subprocess.run([_tool("systemd-sysusers"), f"--root={root}", str(SYSTEMD / "sysusers.d" / "simagent.conf")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    assert passwd["simagent"][6] == "/usr/sbin/nologin"
    assert "simagent" in groups["dialout"][3].split(",")
    if os.geteuid() != 0:
        pytest.skip("tmpfiles needs root to chown in the scratch root")
    proc = subprocess.run([_tool("systemd-tmpfiles"), f"--root={root}", "--create", str(SYSTEMD / "tmpfiles.d" / "simagent.conf")], capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (0, "")
    uid, gid = int(passwd["simagent"][2]), int(groups["simagent"][2])
    for path, mode, owner in (("etc/simagent", 0o750, (0, gid)), ("var/lib/simagent", 0o700, (uid, gid)), ("run/simagent", 0o750, (uid, gid))):
        st = (root / path).stat()
        assert (stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)) == (mode, owner), path
