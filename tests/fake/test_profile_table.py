"""The README's profile table (section "Fake modem") says what the profile data says, so
neither can change without the other (issue 14, item 5).

Per row, from `at_commands/profiles.py`: the profile names (each once, all of them); the
USB IDs with their AT interface numbers (``→ primary/secondary`` per ``;`` group, a bare
PID taking the VID before it; a cell starting with "–" means no layout, whatever its
remark names); the ICCID command and its answer's tag (``+CRSM`` without one); the
hot-swap enable commands ("unasked" when the module reports without one, "–" when it
reports nothing); the boot URCs (each matches one of the profile's ``boot_urcs`` and each
of those is shown); and "MM" among the sources exactly when the data cites ModemManager.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from at_commands import profiles

README = Path(__file__).resolve().parents[2] / "README.md"
HEADER = "| profile | USB VID:PID → AT ifs (primary/secondary) | ICCID | hot-swap enable → URCs | boot URCs |"
_CODE = re.compile(r"`([^`]+)`")


def table_rows(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert cells[0] not in rows, f"profile {cells[0]} has two rows"
        rows[cells[0]] = cells
    return rows


ROWS = table_rows(README.read_text())


def usb_cell(cell: str) -> dict[str, tuple[int, int | None]]:
    """'2c7c:0125 EC25, 0121 → 2/3; 1782:4d10 → 0/5' -> {'2c7c:0125': (2, 3), ...}."""
    if cell.startswith("–"):
        return {}
    layouts: dict[str, tuple[int, int | None]] = {}
    vid = None
    for group in cell.split(";"):
        ids, arrow, ifs = group.partition("→")
        assert arrow, f"no '→ interfaces' in {group!r}"
        found = re.fullmatch(r"\s*(\d+)(?:/(\d+))?\b.*", ifs, re.DOTALL)
        assert found, f"no interface numbers after '→' in {group!r}"
        interfaces = (int(found.group(1)), int(found.group(2)) if found.group(2) else None)
        for m in re.finditer(r"\b(?:([0-9a-f]{4}):)?([0-9a-f]{4})\b", ids):
            vid = m.group(1) or vid
            layouts[f"{vid}:{m.group(2)}"] = interfaces
    return layouts


def test_the_table_has_one_row_per_profile():
    assert sorted(ROWS) == sorted(profiles.PROFILES)


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_a_row_says_what_the_profile_data_says(name):
    p = profiles.PROFILES[name]
    _, usb, iccid, hotswap, boot, sources = ROWS[name]

    assert usb_cell(usb) == {u.id: (u.primary_if, u.secondary_if) for u in p.usb}

    shown = _CODE.findall(iccid)
    if p.iccid_command:
        assert shown[0] == p.iccid_command and shown[1].startswith(p.iccid_tag), iccid
    else:
        assert shown == ["+CRSM"], iccid

    reports = bool(p.sim_inserted_urcs or p.sim_removed_urcs)
    enable_part = hotswap.partition("→")[0]
    assert _CODE.findall(enable_part) == list(p.hotswap_enable), hotswap
    assert hotswap.startswith("–") == (not reports), hotswap
    assert hotswap.startswith("unasked") == (reports and not p.hotswap_enable), hotswap

    boot_lines = _CODE.findall(boot)
    assert all(any(re.search(rx, line) for rx in p.boot_urcs) for line in boot_lines), boot
    assert all(any(re.search(rx, line) for line in boot_lines) for rx in p.boot_urcs), boot

    cites_mm = any("[MM-" in s for s in (*(u.source for u in p.usb), *(f.source for f in p.test_forms)))
    assert bool(re.search(r"\bMM\b", sources)) == cites_mm, sources


def test_the_usb_cell_reader_reads_what_the_rows_write():
    assert usb_cell("1e0e:9001 SIM7600 → 2/3; 9205, 9206 → 2; 9011 → 4") == {
        "1e0e:9001": (2, 3), "1e0e:9205": (2, None), "1e0e:9206": (2, None), "1e0e:9011": (4, None)}
    assert usb_cell("2cb7:01a0 → 2/3; 1782:4d10 → 0/5") == {"2cb7:01a0": (2, 3), "1782:4d10": (0, 5)}
    assert usb_cell("– (2949:8700 ifs unconfirmed)") == {}
