"""packaging/build-deb: build the .deb for real and inspect it with dpkg-deb."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
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


# Debian package of each third-party module the agent imports (checked against the code below).
DEBIAN_PACKAGES = {"serial": "python3-serial", "pyudev": "python3-pyudev", "cryptography": "python3-cryptography",
                   "jwt": "python3-jwt", "paho": "python3-paho-mqtt"}


def _control(deb: Path) -> dict[str, str]:
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"^ (\w[\w-]*): (.*)$", info, re.M))


def _third_party_imports() -> set[str]:
    """Top-level modules outside the standard library that agent/ and at_commands/ import."""
    found: set[str] = set()
    for path in [*ROOT.glob("agent/**/*.py"), *ROOT.glob("at_commands/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name not in ("agent", "at_commands")}


def test_control_fields(deb) -> None:
    fields = _control(deb)
    assert fields["Package"] == "simagent"
    assert fields["Architecture"] == "all" and deb.name.endswith("_all.deb")
    depends = [alternatives.split(" | ") for alternatives in fields["Depends"].split(", ")]
    assert ["python3 (>= 3.11)"] in depends
    assert not any("<<" in dep for alts in depends for dep in alts if dep.startswith("python3 ") and len(alts) == 1), \
        "no Python-minor pin"
    # paho >= 2 from Debian where the release has it; bookworm (python3 3.11) uses the vendored copy
    assert ["python3-paho-mqtt (>= 2.0)", "python3 (<< 3.12)"] in depends
    names = {dep.split(" ")[0] for alts in depends for dep in alts}
    assert {"libudev1", "systemd", "init-system-helpers"} <= names
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True, check=True).stdout
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert re.search(rf"^\s+\d+ bytes,\s+\d+ lines\s+\*?\s+{script}\b", info, re.M), script


def test_every_runtime_import_is_a_debian_dependency(deb) -> None:
    """The daemon uses only Debian's python3 packages: each third-party module that agent/
    or at_commands/ imports maps to a package named in Depends."""
    imports = _third_party_imports()
    assert imports <= DEBIAN_PACKAGES.keys(), f"no Debian package known for {imports - DEBIAN_PACKAGES.keys()}"
    names = {dep.split(" ")[0] for dep in re.split(r", | \| ", _control(deb)["Depends"])}
    assert {DEBIAN_PACKAGES[name] for name in imports} <= names


def test_contents(deb, extracted) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    paths = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    for path in (
        "/usr/bin/simagent",
        "/usr/bin/simagent-platform",
        "/usr/share/simagent/agent/service/daemon.py",
        "/usr/share/simagent/agent/schemas/event.json",
        "/usr/share/simagent/at_commands/profiles.py",
        "/usr/share/simagent/vendor/paho/mqtt/enums.py",
        "/usr/share/python3/runtime.d/simagent.rtupdate",
        "/lib/systemd/system/simagent.service",
        "/lib/udev/rules.d/99-simagent.rules",
        "/usr/lib/sysusers.d/simagent.conf",
        "/usr/lib/tmpfiles.d/simagent.conf",
        "/etc/simagent/agent.toml",
        "/usr/share/doc/simagent/copyright",
    ):
        assert path in paths, path
    assert (extracted / "DEBIAN" / "conffiles").read_text().split() == ["/etc/simagent/agent.toml"]
    assert (extracted / "etc/simagent/agent.toml").read_text() == (ROOT / "config/agent.toml").read_text()
    assert (extracted / "lib/systemd/system/simagent.service").read_text() == (ROOT / "systemd/simagent.service").read_text()
    for script in ("simagent", "simagent-platform"):
        assert (extracted / "usr/bin" / script).read_text().startswith("#!/usr/bin/python3 -P\n")
    # every module of the source tree is shipped (package data included)
    for tree in ("agent", "at_commands"):
        for source in (ROOT / tree).rglob("*"):
            if source.is_file() and source.suffix in (".py", ".json") and "__pycache__" not in source.parts:
                assert f"/usr/share/simagent/{source.relative_to(ROOT)}" in paths, source
    # no build-machine path (the mktemp staging dir, the checkout) leaked
    leaked = subprocess.run(
        ["grep", "-rlE", "--binary-files=text", f"/tmp/tmp\\.|{ROOT}", str(extracted / "usr")],
        capture_output=True, text=True,
    ).stdout
    assert leaked == "", leaked


def test_md5sums_list_every_file_but_the_conffile(extracted) -> None:
    """DEBIAN/md5sums (for debsums, `dpkg --verify`) holds each shipped file with its sum."""
    listed = dict(reversed(line.split("  ", 1)) for line in (extracted / "DEBIAN/md5sums").read_text().splitlines())
    shipped = {str(path.relative_to(extracted)) for path in extracted.rglob("*")
               if path.is_file() and path.parts[len(extracted.parts)] != "DEBIAN"}
    assert set(listed) == shipped - {"etc/simagent/agent.toml"}
    check = subprocess.run(["md5sum", "--check", "--quiet", str(extracted / "DEBIAN/md5sums")], cwd=extracted,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout[-2000:]


def test_no_compiled_code(deb, extracted) -> None:
    """Architecture: all: no ELF object, no .pyc (postinst compiles for the installed python3)."""
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "__pycache__" not in listing and ".pyc" not in listing and ".so" not in listing
    elf = [path for path in extracted.rglob("*") if path.is_file() and path.read_bytes()[:4] == b"\x7fELF"]
    assert elf == []
    postinst = (extracted / "DEBIAN/postinst").read_text()
    assert "py3compile -p simagent /usr/share/simagent" in postinst
    assert "py3clean -p simagent" in (extracted / "DEBIAN/prerm").read_text()


# The packaged agent run the way a terminal runs it: only the dependencies are importable
# (this venv's site-packages standing in for Debian's dist-packages), not the checkout's
# editable install with its lab (-S: no .pth files, so no editable finder).
SITE = sysconfig.get_path("purelib")


def _packaged(extracted: Path, *args: str, pythonpath: list[str] = (), **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*pythonpath, SITE])}
    return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, timeout=60,
                          cwd=extracted, env=env, **kwargs)


def test_no_lab_code_on_terminals(deb, extracted) -> None:
    """The fake modem, its pytest plugin and the demo are lab tools: the .deb has none of
    their files or scripts, and `simagent` there has no `demo`."""
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "simagent_lab" not in listing and "simagent-fakemodem" not in listing
    usage = _packaged(extracted, str(extracted / "usr/bin/simagent"), "--help")
    assert usage.returncode == 0 and "demo" not in usage.stdout and "status" in usage.stdout, usage.stderr


def test_packaged_agent_runs(extracted) -> None:
    """The launcher runs the packaged agent (not the checkout's) on this python3."""
    proc = _packaged(extracted, str(extracted / "usr/bin/simagent"), "check-config", "--config", str(extracted / "etc/simagent/agent.toml"))
    assert (proc.returncode, proc.stdout.strip()) == (0, f"OK {extracted}/etc/simagent/agent.toml"), proc.stderr


PROBE = """
import os, runpy, sys
runpy.run_path(sys.argv[1], run_name="probe")  # the launcher's set-up, without main()
import agent, paho.mqtt.client
import agent.service.reporter  # the paho 2 API (CallbackAPIVersion, paho.mqtt.enums)
print(agent.__file__)
print(paho.mqtt.client.__file__)
print(os.environ["PYTHONPATH"])
"""


def _probe(extracted: Path, pythonpath: list[str] = ()) -> subprocess.CompletedProcess:
    return _packaged(extracted, "-c", PROBE, str(extracted / "usr/bin/simagent"), pythonpath=pythonpath)


def _paho_1_6(tmp_path: Path) -> Path:
    """A paho-mqtt 1.6 layout (no paho/mqtt/enums.py), as bookworm's python3-paho-mqtt."""
    site = tmp_path / "paho16"
    (site / "paho/mqtt").mkdir(parents=True)
    (site / "paho/__init__.py").write_text("")
    (site / "paho/mqtt/__init__.py").write_text('__version__ = "1.6.1"\n')
    (site / "paho/mqtt/client.py").write_text("class Client:\n    pass\n")
    return site


def test_launcher_uses_paho_2_where_present(extracted, tmp_path) -> None:
    """paho >= 2 installed (trixie's python3-paho-mqtt; here the venv's): it is used, not the copy."""
    proc = _probe(extracted)
    assert proc.returncode == 0, proc.stderr
    agent_file, paho_file, pythonpath = proc.stdout.splitlines()
    home = extracted / "usr/share/simagent"
    assert agent_file == str(home / "agent/__init__.py")
    assert not paho_file.startswith(str(home)), paho_file
    # helper processes (python3 -P -m agent.service.offload) import the same agent
    assert pythonpath.split(os.pathsep) == [str(home), SITE]


def test_launcher_uses_vendored_paho_where_debian_has_1x(extracted, tmp_path) -> None:
    """bookworm: python3-paho-mqtt 1.6 first on the path; the agent would not import with it,
    and the launcher puts the package's paho 2 ahead of it."""
    paho16 = _paho_1_6(tmp_path)
    without_launcher = _packaged(extracted, "-c", "import agent.service.reporter",
                                 pythonpath=[str(extracted / "usr/share/simagent"), str(paho16)])
    assert "paho.mqtt.enums" in without_launcher.stderr  # the premise: 1.6 lacks the paho 2 API
    proc = _probe(extracted, [str(paho16)])
    assert proc.returncode == 0, proc.stderr
    agent_file, paho_file, pythonpath = proc.stdout.splitlines()
    home = extracted / "usr/share/simagent"
    assert paho_file == str(home / "vendor/paho/mqtt/client.py")
    assert pythonpath.split(os.pathsep) == [str(home), str(home / "vendor"), str(paho16), SITE]


def test_maintainer_scripts_are_valid_sh(extracted) -> None:
    for script in ("postinst", "prerm", "postrm"):
        path = extracted / "DEBIAN" / script
        assert path.stat().st_mode & 0o111
        subprocess.run(["sh", "-n", str(path)], check=True)
    postrm = (extracted / "DEBIAN/postrm").read_text()
    # purge deletes state and evidence; remove keeps them
    assert re.search(r'if \[ "\$1" = "purge" \]; then.*rm -rf /var/lib/simagent /etc/simagent', postrm, re.S)
