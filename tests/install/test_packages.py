"""setup.cfg names every source directory as a package: one it misses is not shipped
(or shipped by accident through package data, with setuptools' "Package would be
ignored" warning on every `./dev.sh setup`; agent/schemas holds only JSON)."""

from __future__ import annotations

from pathlib import Path

from setuptools.config.setupcfg import read_configuration

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("agent", "at_commands", "simagent_lab")


def test_every_shipped_directory_is_a_package(monkeypatch):
    monkeypatch.chdir(ROOT)  # setup.cfg's package search is relative to the project
    packages = set(read_configuration(ROOT / "setup.cfg")["options"]["packages"])
    directories = {path.relative_to(ROOT).as_posix().replace("/", ".")
                   for top in SHIPPED for path in (ROOT / top, *(ROOT / top).rglob("*"))
                   if path.is_dir() and "__pycache__" not in path.parts}
    assert packages == directories
    assert "agent.schemas" in packages
