"""packaging/build-deb: build the .deb for real and inspect it with dpkg-deb."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    for tool in ("dpkg-deb", "fakeroot"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run([str(ROOT / "packaging" / "build-deb"), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.parent == out and path.exists()
    return path


@pytest.fixture(scope="module")
def extracted(deb, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-R", str(deb), str(root)], check=True)
    return root


def test_control_fields(deb) -> None:
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"^ (\w[\w-]*): (.*)$", info, re.M))
    assert fields["Package"] == "simagent"
    assert re.fullmatch(r"python3 \(>= 3\.\d+\), python3 \(<< 3\.\d+\), .*libudev1, systemd.*", fields["Depends"])
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert re.search(rf"^\s+\d+ bytes,\s+\d+ lines\s+\*?\s+{script}\b", info, re.M), script


def test_contents(deb, extracted) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    paths = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    for path in (
        "/opt/simagent/bin/simagent",
        "/lib/systemd/system/simagent.service",
        "/lib/udev/rules.d/99-simagent.rules",
        "/usr/lib/sysusers.d/simagent.conf",
        "/usr/lib/tmpfiles.d/simagent.conf",
        "/etc/simagent/agent.toml",
        "/usr/bin/simagent",
        "/usr/share/doc/simagent/copyright",
    ):
        assert path in paths, path
    assert (extracted / "DEBIAN" / "conffiles").read_text().split() == ["/etc/simagent/agent.toml"]
    assert (extracted / "etc/simagent/agent.toml").read_text() == (ROOT / "config/agent.toml").read_text()
    assert (extracted / "lib/systemd/system/simagent.service").read_text() == (ROOT / "systemd/simagent.service").read_text()
    assert (extracted / "opt/simagent/bin/simagent").read_text().startswith("#!/opt/simagent/bin/python\n")
    assert (extracted / "opt/simagent/bin/python3").readlink() == Path("/usr/bin/python3")
    # no build-machine path (the mktemp staging dir, the checkout) leaked into the venv
    # (shebangs, activate, RECORD, pyc)
    leaked = subprocess.run(
        ["grep", "-rlE", "--binary-files=text", f"/tmp/tmp\\.|{ROOT}", str(extracted / "opt")],
        capture_output=True, text=True,
    ).stdout
    assert leaked == "", leaked


def test_no_lab_code_on_terminals(deb, extracted) -> None:
    """The fake modem, its pytest plugin and the demo are lab tools: the .deb has none of
    their files, scripts or entry points, and `simagent` there has no `demo`."""
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "simagent_lab" not in listing and "simagent-fakemodem" not in listing
    dist_info = next((extracted / "opt/simagent/lib").glob("python3*/site-packages/simagent-*.dist-info"))
    assert "pytest11" not in (dist_info / "entry_points.txt").read_text()
    assert "simagent_lab" not in (dist_info / "RECORD").read_text()
    usage = subprocess.run([str(extracted / "opt/simagent/bin/python"), "-m", "agent", "--help"],
                           capture_output=True, text=True, timeout=60, cwd=extracted)  # not the checkout's agent/
    assert usage.returncode == 0 and "demo" not in usage.stdout and "status" in usage.stdout


def test_packaged_venv_runs_on_debian_python(extracted) -> None:
    """The venv works with the target's /usr/bin/python3 and its own site-packages."""
    python = extracted / "opt/simagent/bin/python"
    proc = subprocess.run(
        [str(python), "-m", "agent", "check-config", "--config", str(extracted / "etc/simagent/agent.toml")],
        capture_output=True, text=True, timeout=60,
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, f"OK {extracted}/etc/simagent/agent.toml"), proc.stderr
    proc = subprocess.run([str(python), "-c", "import paho.mqtt, jwt, cryptography, pyudev, serial, sys; print(sys.prefix)"], capture_output=True, text=True)
    assert proc.stdout.strip() == str(extracted / "opt/simagent"), proc.stderr


def test_maintainer_scripts_are_valid_sh(extracted) -> None:
    for script in ("postinst", "prerm", "postrm"):
        path = extracted / "DEBIAN" / script
        assert path.stat().st_mode & 0o111
        subprocess.run(["sh", "-n", str(path)], check=True)
    postrm = (extracted / "DEBIAN/postrm").read_text()
    # purge deletes state and evidence; remove keeps them
    assert re.search(r'if \[ "\$1" = "purge" \]; then.*rm -rf /var/lib/simagent /etc/simagent', postrm, re.S)
