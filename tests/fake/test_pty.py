"""The fake modem over a real pty, driven with raw pyserial like any terminal program."""

from __future__ import annotations

import os
import re
import time

import pytest
import serial

from at_commands import profiles
from simagent_lab.pytest_plugin import wait_for

ALL = sorted(profiles.PROFILES)


@pytest.mark.parametrize("name", ALL)
def test_dialect_per_profile(fake_modem_factory, open_port, name):
    p = profiles.get(name)
    fm = fake_modem_factory(profile=name)
    port = open_port(fm.port)  # pyserial flushes what the modem printed before the open
    assert port.command("AT") == ["AT", "OK"]  # echo on at power-on
    assert port.command("ATE0") == ["ATE0", "OK"]
    assert port.command("AT+CGMI") == [p.sample_manufacturer, "OK"]
    assert profiles.detect(port.command("ATI")[0]) is p
    assert port.command("AT+CGSN") == [fm.state()["imei"], "OK"]
    iccid = fm.state()["iccid"]
    if p.iccid_command:
        assert port.command(p.iccid_command) == [p.iccid_line(iccid), "OK"]
    assert port.command("AT+CRSM=176,12258,0,0,10")[0].startswith('+CRSM: 144,0,"98')
    assert port.command("AT+NOSUCHTHING") == ["ERROR"]
    for command in p.hotswap_enable:
        assert port.command(command) == ["OK"]
    fm.sim_remove()
    urcs = port.lines_for(0.1)
    if p.sim_removed_sample:
        assert p.sim_removed_sample in urcs
    else:
        assert urcs == []
    assert port.command("AT+CMEE=1;+CPIN?") == ["+CME ERROR: 10"]
    fm.reboot()
    if p.boot_lines:
        assert port.read_until(re.escape(p.boot_lines[-1])) == list(p.boot_lines)  # no SIM: no SIM lines
    assert port.command("AT") == ["AT", "OK"]


@pytest.mark.fake_modem(profile="quectel", register_delay=0.1)
def test_marker_configures_fixture_and_hotswap_needs_enable(fake_modem, open_port):
    assert fake_modem.state()["profile"] == "quectel"
    port = open_port(fake_modem.port)
    port.command("ATE0")
    fake_modem.sim_remove()
    assert "+QSIMSTAT: 1,0" not in port.lines_for(0.1)
    fake_modem.sim_insert("89860099999999999999")
    assert port.command("AT+QSIMDET=1,0") == ["OK"]
    assert port.command("AT+QSIMSTAT=1") == ["OK"]
    fake_modem.sim_remove()
    assert port.read_until(r"QSIMSTAT") == ["+QSIMSTAT: 1,0"]
    fake_modem.sim_insert("89860011111111111111")
    assert port.read_until(r"QSIMSTAT") == ["+QSIMSTAT: 1,1"]
    assert port.command("AT+QCCID") == ["+QCCID: 89860011111111111111", "OK"]


@pytest.mark.fake_modem(register_delay=0.1)
def test_cfun_effects_visible_in_state(fake_modem, open_port):
    port = open_port(fake_modem.port)
    port.command("ATE0")
    port.command("AT+CEREG=1")
    assert wait_for(lambda: fake_modem.state()["registration"] == "home")
    port.lines_for(0.05)  # +CEREG: 1 if registration completed after CEREG=1
    assert port.command("AT+CFUN=4") == ["OK"]
    assert port.read_until(r"CEREG") == ["+CEREG: 0"]
    state = fake_modem.state()
    assert (state["cfun"], state["registration"], state["sim_readable"]) == (4, "idle", True)
    assert port.command("AT+CPIN?") == ["+CPIN: READY", "OK"]
    port.command("AT+CFUN=1")
    assert port.read_until(r"CEREG: 1", timeout=2)[-1] == "+CEREG: 1"
    assert len(fake_modem.state()["attaches"]) == 2


@pytest.mark.fake_modem(profile="simcom")
def test_reboot_prints_boot_urcs_and_resets_echo(fake_modem, open_port):
    port = open_port(fake_modem.port)
    port.command("ATE0")
    port.command("AT+CMEE=2")
    state = fake_modem.reboot()
    assert (state["echo"], state["cmee"], state["cfun"]) == (True, 0, 1)
    assert port.read_until("PB DONE") == ["RDY", "+CPIN: READY", "SMS DONE", "PB DONE"]
    assert port.command("AT") == ["AT", "OK"]


def test_unplug_gives_eio_and_replug_serves_again(fake_modem, open_port):
    port = open_port(fake_modem.port)
    port.command("ATE0")
    first_pty = fake_modem.state()["pty"]
    fake_modem.unplug()
    assert not os.path.lexists(fake_modem.port)
    with pytest.raises(serial.SerialException):  # EIO / hang-up, like a yanked USB modem
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            port.ser.read(1)
            port.ser.write(b"AT\r")
    state = fake_modem.replug()
    assert state["plugged"] and os.path.islink(fake_modem.port)
    assert state["counters"]["reboots"] == 1
    second = open_port(fake_modem.port)
    second.ser.reset_input_buffer()
    assert second.command("AT") == ["AT", "OK"]  # echo back on: the module rebooted
    assert state["pty"] != first_pty or os.readlink(fake_modem.port) == state["pty"]


def test_faults_over_the_wire(fake_modem, open_port):
    port = open_port(fake_modem.port)
    port.command("ATE0")
    fake_modem.fault("drop")
    port.send("AT")
    assert port.lines_for(0.2) == []
    fake_modem.fault("garbage")
    port.send("AT")
    port.read_until("^OK$")
    assert b"\x00\x00\xfe\xff" in port.raw
    fake_modem.fault("delay", seconds=0.3)
    start = time.monotonic()
    assert port.command("AT+CGMI") == ["Generic", "OK"]
    assert time.monotonic() - start >= 0.3
    fake_modem.fault("late-reply", seconds=0.2)
    port.send("AT+CGMM")
    assert port.lines_for(0.05) == []  # the client times out ...
    assert port.read_until("^OK$") == ["3GPP TS 27.007 modem", "OK"]  # ... then it arrives
    fake_modem.fault("hang")
    port.send("AT")
    assert port.lines_for(0.2) == []
    assert fake_modem.state()["hung"]
    fake_modem.reboot()
    assert port.command("AT") == ["AT", "OK"]


def test_transcript_records_both_directions_in_order(fake_modem, open_port):
    port = open_port(fake_modem.port)
    port.command("AT+CFUN=4")
    fake_modem.sim_remove()
    port.command("AT+CGSN")
    entries = fake_modem.transcript
    ins = [e["line"] for e in entries if e["dir"] == "in"]
    assert ins == ["AT+CFUN=4", "AT+CGSN"]
    assert any(e["dir"] == "ctl" and e["line"] == "sim-remove" for e in entries)
    assert [e["t"] for e in entries] == sorted(e["t"] for e in entries)
    removal = next(i for i, e in enumerate(entries) if e["line"] == "sim-remove")
    assert "AT+CFUN=1" not in [e["line"] for e in entries[removal:] if e["dir"] == "in"]
    on_disk = [line for line in open(fake_modem.port + ".transcript", encoding="utf-8")]
    assert len(on_disk) == len(entries)


def test_imei_rewrite_counted_not_applied(fake_modem, open_port):
    port = open_port(fake_modem.port)
    imei = fake_modem.state()["imei"]
    assert port.command('AT+EGMR=1,7,"490154203237518"')[-1] == "OK"
    state = fake_modem.state()
    assert state["imei"] == imei and state["counters"]["imei_rewrite_attempts"] == 1
    fake_modem.set(imei="490154203237518")  # the test harness may change it; AT may not
    assert port.command("AT+GSN")[-2] == "490154203237518"


def test_control_errors_are_reported_not_raised_in_the_modem(fake_modem):
    assert fake_modem.control("sim-insert", iccid="12")["ok"] is False
    assert fake_modem.control("warp")["error"] == "unknown operation 'warp'"
    with pytest.raises(ValueError, match="register"):
        fake_modem.register("moon")
    assert fake_modem.state()["sim_present"]



def test_any_byte_aborts_a_running_scan_on_the_pty(fake_modem_factory, open_port):
    fm = fake_modem_factory(scan_seconds=10)
    port = open_port(fm.port)
    port.command("ATE0")
    port.send("AT+COPS=?")
    assert wait_for(lambda: fm.state()["executing"], 2)
    started = time.monotonic()
    port.ser.write(b"\rAT+CFUN=4\r")  # the abort byte is consumed; the rest is a command
    assert port.read_until("ERROR|OK", 2) == ["ERROR"]
    assert port.read_until("OK", 2) == ["OK"]
    assert time.monotonic() - started < 1
    state = fm.state()
    assert state["counters"]["aborted"] == 1 and state["cfun"] == 4


def test_a_bug_in_the_fake_stops_it_loudly_not_silently(fake_modem, open_port, monkeypatch):
    """If the loop thread dies, control calls say why at once (a dead loop used to leave every
    caller waiting 10 s for a socket that was still accepting)."""
    def broken(line: str) -> list[bytes]:
        raise ZeroDivisionError("a bug in the fake")

    monkeypatch.setattr(fake_modem.modem.state, "handle_line", broken)
    port = open_port(fake_modem.port)
    port.ser.write(b"AT\r")
    assert wait_for(lambda: fake_modem.modem.crash)
    with pytest.raises(RuntimeError, match="ZeroDivisionError: a bug in the fake"):
        fake_modem.state()

