"""The real `simagent-fakemodem` process, its control socket and the `ctl` client."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from simagent_lab import fakemodem


def ctl(process, *words: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simagent_lab.fakemodem", "ctl", "--control", process.control_path, *words],
        capture_output=True, text=True, timeout=20,
    )


def test_process_serves_pty_and_ctl_drives_it(fake_modem_process, open_port):
    fm = fake_modem_process(profile="telit", imei="490154203237518", iccid="89860012345678901230",
                            register_delay=0.05)
    assert stat.S_IMODE(os.stat(fm.control_path).st_mode) == 0o600
    port = open_port(fm.port)
    assert port.command("AT+CGSN") == ["AT+CGSN", "490154203237518", "OK"]
    assert port.command("AT#CCID") == ["AT#CCID", "#CCID: 89860012345678901230", "OK"]
    port.command("ATE0")
    port.command("AT#SIMDET=2")
    port.command("AT#QSS=2")

    done = ctl(fm, "sim-remove")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"sim-remove: done; SIM none, CFUN={fm.state()['cfun']}, "
                                        f"registration {fm.state()['registration']}, signal -85 dBm"]
    assert port.read_until("QSS") == ["#QSS: 0"]

    assert ctl(fm, "sim-insert", "89860099999999999999").returncode == 0
    assert port.read_until("QSS") == ["#QSS: 1"]
    assert ctl(fm, "set", "signal=-95").returncode == 0
    assert ctl(fm, "register", "roaming").returncode == 0
    port.command("AT+CFUN=4")
    state = json.loads(ctl(fm, "state").stdout)
    assert (state["cfun"], state["iccid"], state["signal_dbm"], state["register_target"]) == (
        4, "89860099999999999999", -95, "roaming")
    assert port.command("AT+CSQ") == ["+CSQ: 99,99", "OK"]  # radio off: no signal

    assert ctl(fm, "fault", "error").returncode == 0
    assert port.command("AT") == ["ERROR"]

    assert ctl(fm, "reboot").returncode == 0
    assert port.command("AT+CFUN?") == ["AT+CFUN?", "+CFUN: 1", "OK"]

    assert ctl(fm, "unplug").stdout.strip().endswith(", unplugged")
    assert not os.path.lexists(fm.port)
    replugged = ctl(fm, "replug").stdout
    assert replugged.startswith("replug: done; SIM 89860099999999999999") and "unplugged" not in replugged
    assert os.path.islink(fm.port)

    transcript = fakemodem.read_transcript(fm.transcript_path)
    assert [e["line"] for e in transcript if e["dir"] == "in"][:2] == ["AT+CGSN", "AT#CCID"]
    assert fm.stop() == 0
    assert not os.path.exists(fm.control_path)


def test_ctl_reports_refusals_and_usage_errors(fake_modem_process):
    fm = fake_modem_process(no_sim=True)
    assert json.loads(ctl(fm, "state").stdout)["sim_present"] is False
    refused = ctl(fm, "sim-insert", "1234")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("simagent-fakemodem ctl: sim-insert: ") and "iccid" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1
    usage = ctl(fm, "fault", "explode")
    assert usage.returncode == 2 and "fault needs one of" in usage.stderr
    assert ctl(fm, "teleport").returncode == 2


def test_ctl_without_a_running_modem(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "simagent_lab.fakemodem", "ctl", "--control", str(tmp_path / "none.ctl"), "state"],
        capture_output=True, text=True, timeout=20,
    )
    assert done.returncode == 69 and "none.ctl" in done.stderr


def test_bad_start_arguments_exit_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "simagent_lab.fakemodem", "--link", str(tmp_path / "m"), "--imei", "12"],
        capture_output=True, text=True, timeout=20,
    )
    assert done.returncode == 2 and "imei" in done.stderr
    assert not os.path.lexists(tmp_path / "m")


def test_control_socket_rejects_malformed_json(fake_modem_process):
    fm = fake_modem_process()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(fm.control_path)
        sock.sendall(b"not json\n[1]\n{\"op\": \"state\"}\n")
        replies = b""
        while replies.count(b"\n") < 3:
            replies += sock.recv(65536)
    first, second, third = (json.loads(line) for line in replies.splitlines())
    assert first["ok"] is False and second["ok"] is False and third["ok"] is True


@pytest.mark.parametrize("argv", [["--help"], ["ctl", "--help"]])
def test_help(argv):
    done = subprocess.run([sys.executable, "-m", "simagent_lab.fakemodem", *argv],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0 and "usage" in done.stdout
