"""The README is read in a fresh clone: every file or directory of the repository it
names in backticks is there, and it names nothing outside the repository (a contract
file beside the clone, `../...`, is not in anybody's clone)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The repository's own top-level directories (not what set-up or a build leaves beside them:
# `dist/` appears once packaging/build-deb has run, and the README names its output there).
TOP_LEVEL = tuple(f"{p.name}/" for p in ROOT.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name not in ("build", "dist")
                  and not p.name.endswith(".egg-info"))


def named_paths() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [token for token in re.findall(r"`([^`\s]+)`", text) if token.startswith(("../", *TOP_LEVEL))]


def test_the_readme_names_only_what_a_clone_has():
    paths = named_paths()
    assert len(paths) > 50  # the README does name files: the pattern still finds them
    outside = [p for p in paths if p.startswith("../")]
    missing = [p for p in paths if not p.startswith("../") and not (ROOT / p.split(":")[0]).exists()]
    assert outside == [] and missing == []
