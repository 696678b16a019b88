"""Every vendor profile is well-formed data, and lookups find the right one."""

from __future__ import annotations

import re

import pytest

from at_commands import profiles

ALL = list(profiles.PROFILES.values())
IDS = [p.name for p in ALL]


def test_names_unique_and_required_set_present():
    assert len(IDS) == len(set(IDS))
    assert {"generic", "quectel", "simcom", "fibocom", "huawei", "ublox", "telit", "neoway", "meig",
            "sierra", "nrf91", "cinterion", "zte", "sequans"} <= set(IDS)
    for name, p in profiles.PROFILES.items():
        assert name == p.name


@pytest.mark.parametrize("p", ALL, ids=IDS)
def test_regexes_compile(p):
    for pattern in (*p.vendor_patterns, *p.sim_inserted_urcs, *p.sim_removed_urcs, *p.boot_urcs,
                    *p.imei_rewrite_commands):
        re.compile(pattern)


@pytest.mark.parametrize("p", ALL, ids=IDS)
def test_commands_are_at_commands(p):
    commands = [*p.hotswap_enable, *p.extra_signal_commands, *(p.boot_rf_off or ())]
    if p.iccid_command:
        commands.append(p.iccid_command)
    for command in commands:
        assert command.startswith("AT") and command == command.strip(), command


@pytest.mark.parametrize("p", ALL, ids=IDS)
def test_iccid_command_and_tag_come_together(p):
    assert (p.iccid_command is None) == (p.iccid_tag is None)
    if p.iccid_tag:
        assert p.iccid_tag.endswith(":") and p.iccid_tag[0] in "+^#$!%"


@pytest.mark.parametrize("p", ALL, ids=IDS)
def test_hotswap_samples_match_their_patterns(p):
    assert (p.sim_inserted_sample is None) == (not p.sim_inserted_urcs)
    assert (p.sim_removed_sample is None) == (not p.sim_removed_urcs)
    if p.sim_inserted_sample:
        assert any(re.search(r, p.sim_inserted_sample) for r in p.sim_inserted_urcs)
        assert not any(re.search(r, p.sim_inserted_sample) for r in p.sim_removed_urcs)
    if p.sim_removed_sample:
        assert any(re.search(r, p.sim_removed_sample) for r in p.sim_removed_urcs)
        assert not any(re.search(r, p.sim_removed_sample) for r in p.sim_inserted_urcs)
    if p.hotswap_enable:
        assert p.sim_removed_urcs, "an enable command without URCs to watch is dead data"


@pytest.mark.parametrize("p", ALL, ids=IDS)
def test_boot_patterns_match_boot_lines(p):
    for pattern in p.boot_urcs:
        assert any(re.search(pattern, line) for line in (*p.boot_lines, *p.boot_sim_lines)), pattern
    for line in p.boot_lines:
        assert any(re.search(pattern, line) for pattern in p.boot_urcs), line


@pytest.mark.parametrize("p", ALL, ids=IDS)
def test_usb_layouts_are_sane(p):
    for u in p.usb:
        assert 0 < u.vid <= 0xFFFF and 0 < u.pid <= 0xFFFF
        assert 0 <= u.primary_if < 32
        assert u.secondary_if is None or (0 <= u.secondary_if < 32 and u.secondary_if != u.primary_if)
        assert u.model and u.source, f"{u.id} needs a model and a source"


def test_usb_ids_unique_across_profiles():
    ids = [u.id for p in ALL for u in p.usb]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("p", ALL, ids=IDS)
def test_every_profile_refuses_egmr_imei_write(p):
    assert p.is_imei_rewrite('AT+EGMR=1,7,"867400030000016"')
    assert p.is_imei_rewrite("at+egmr = 1, 7")
    assert not p.is_imei_rewrite("AT+EGMR=0,7")  # reading the IMEI is fine
    assert not p.is_imei_rewrite("AT+CGSN")


@pytest.mark.parametrize(
    "profile, command",
    [("simcom", 'AT+SIMEI="867400030000016"'), ("huawei", 'AT^CIMEI="867400030000016"'),
     ("telit", 'AT#IMEI="867400030000016"')],
)
def test_vendor_imei_write_commands(profile, command):
    assert profiles.get(profile).is_imei_rewrite(command)
    assert not profiles.GENERIC.is_imei_rewrite(command)


@pytest.mark.parametrize("p", ALL, ids=IDS)
def test_detect_round_trips_sample_manufacturer(p):
    assert p.sample_manufacturer
    assert profiles.detect(p.sample_manufacturer) is p


@pytest.mark.parametrize(
    "text, name",
    [("Quectel\r\nEC25\r\nRevision: EC25EFAR06A06M4G", "quectel"), ("SIMCOM INCORPORATED", "simcom"),
     ("SIMCOM_Ltd", "simcom"), ("huawei", "huawei"), ("u-blox", "ublox"), ("Telit", "telit"),
     ("Fibocom Wireless Inc.", "fibocom"), ("MeiG Smart Technology", "meig"), ("Neoway", "neoway"),
     ("Acme Modems", "generic"), ("", "generic")],
)
def test_detect(text, name):
    assert profiles.detect(text).name == name


def test_by_usb():
    profile, layout = profiles.by_usb(0x2C7C, 0x0125)
    assert (profile.name, layout.primary_if, layout.secondary_if) == ("quectel", 2, 3)
    profile, layout = profiles.by_usb(0x1E0E, 0x9001)
    assert (profile.name, layout.primary_if, layout.secondary_if) == ("simcom", 2, 3)
    assert profiles.by_usb(0x1BC7, 0x1201)[0].name == "telit"
    assert profiles.by_usb(0x1234, 0x5678) is None


def test_get_unknown_names_known_ones():
    with pytest.raises(KeyError, match="quectel"):
        profiles.get("qectel")
