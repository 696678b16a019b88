"""`simagent status` against the real fake-modem process, and through a stand-in daemon.

(The every-profile `status --port P --json` document is checked in
tests/integration_modem/test_done_when.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from agent.core.binding import LAST_IMEI_KEY
from agent.service.control import socket_op
from agent.core.store import Binding, Store
from at_commands.commands import is_query

SPEC_KEYS = {
    "modem": {"vendor", "model", "revision", "imei", "imei_luhn_ok", "profile", "port"},
    "sim": {"state", "iccid", "imsi"},
    "network": {"registration", "operator", "access_tech", "signal_dbm", "signal_measure"},
    "radio": {"cfun"},
    "modem_link": {"state", "port", "detail"},
    "freshness": {"modem", "sim", "network", "radio", "binding"},
}


def status_json(cli, port: str) -> dict:
    done = cli("status", "--json", "--port", port)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_sim_absent_radio_off_and_unknown_signal_use_the_spec_words(cli, registered_modem):
    fm = registered_modem(profile="simcom", no_sim=True)
    # Numeric errors are off after power-on (a bare ERROR says nothing): status turns them
    # on for its reads and off again, so it can say "no SIM" (+CME ERROR: 10).
    assert fm.state()["cmee"] == 0
    doc = status_json(cli, fm.port)
    assert fm.state()["cmee"] == 0
    assert {k: set(v) for k, v in doc.items() if k != "binding"} == SPEC_KEYS
    assert doc["sim"] == {"state": "absent", "iccid": None, "imsi": None}
    assert doc["network"]["registration"] == "idle"
    assert doc["modem"]["imei"] == fm.state()["imei"]

    fm.sim_insert("89860099999999999990")
    assert status_json(cli, fm.port)["sim"]["state"] == "ready"

    cli("at", "--port", fm.port, "--unsafe", "AT+CFUN=4")
    doc = status_json(cli, fm.port)
    assert doc["radio"] == {"cfun": 4}
    assert doc["network"]["signal_dbm"] is None and doc["network"]["registration"] == "idle"
    assert doc["sim"]["iccid"] == "89860099999999999990"  # CFUN=4 keeps the SIM readable


def test_pin_locked_sim_and_roaming(cli, registered_modem):
    locked = registered_modem(profile="quectel", pin="1234")
    doc = status_json(cli, locked.port)
    assert doc["sim"]["state"] == "locked" and doc["sim"]["imsi"] is None
    assert doc["sim"]["iccid"] == locked.state()["iccid"]  # readable without the PIN
    Store.open(cli.state_dir).close()  # the daemon has run here: a verdict is given
    # The card was read: the verdict says why it cannot be used, not that it is unreadable.
    assert status_json(cli, locked.port)["binding"]["status"] == "sim_locked"
    assert "  status        sim_locked, mode first-use" in cli("status", "--port", locked.port).stdout

    roaming = registered_modem(profile="huawei")
    roaming.register("roaming")
    roaming.set(signal=-101)
    doc = status_json(cli, roaming.port)
    assert doc["network"]["registration"] == "roaming" and doc["network"]["signal_dbm"] == -101


def test_binding_verdict_is_read_from_the_state_store_without_writing(cli, registered_modem):
    fm = registered_modem(profile="telit")
    state = fm.state()
    assert status_json(cli, fm.port)["binding"] is None
    assert not cli.state_dir.exists()  # status never creates the store

    store = Store.open(cli.state_dir)
    with store.transaction() as tx:
        tx.put_binding(Binding(state["iccid"], state["imei"], "2024-05-01T08:00:00+00:00", "first-use"))
        tx.set_meta(LAST_IMEI_KEY, state["imei"])
    evidence_before = len(store.evidence_entries())
    assert status_json(cli, fm.port)["binding"] == {
        "mode": "first-use", "status": "ok", "reason": None, "bound_iccid": state["iccid"],
        "bound_imei": state["imei"], "since": "2024-05-01T08:00:00+00:00",
    }

    fm.sim_insert("89860011111111111111")  # a foreign card
    binding = status_json(cli, fm.port)["binding"]
    assert (binding["status"], binding["reason"], binding["bound_iccid"]) == ("violation", "iccid_mismatch", state["iccid"])
    assert len(store.evidence_entries()) == evidence_before and len(store.read().bindings()) == 1
    store.close()


@pytest.mark.parametrize("damage", ["zeroed", "deleted"])
def test_a_damaged_store_is_said_and_exits_1_without_a_daemon(cli, registered_modem, damage):
    """`status` without a daemon on a state.db overwritten with zeros (or gone while the
    terminal has run before) said "binding unknown" and exited 0; it must say the store is
    damaged, exit 1 (SPEC §8) and change nothing (the daemon records the reset)."""
    fm = registered_modem(profile="quectel")
    store = Store.open(cli.state_dir)
    store.record("agent_started", {})
    store.close()
    db = cli.state_dir / "state.db"
    for sidecar in ("state.db-wal", "state.db-shm"):
        (cli.state_dir / sidecar).unlink(missing_ok=True)
    if damage == "zeroed":
        db.write_bytes(bytes(db.stat().st_size))
    else:
        db.unlink()
    before = {p.name: p.read_bytes() for p in cli.state_dir.iterdir()}
    for args in (("status", "--port", fm.port), ("status", "--json", "--port", fm.port)):
        done = cli(*args)
        assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
        assert "state store is damaged" in done.stderr and "Traceback" not in done.stderr
    assert json.loads(done.stdout)["binding"] is None and json.loads(done.stdout)["modem"]["imei"] == fm.state()["imei"]
    assert {p.name: p.read_bytes() for p in cli.state_dir.iterdir()} == before


def test_human_output_is_aligned_and_short(cli, registered_modem):
    fm = registered_modem(profile="quectel")
    state = fm.state()
    done = cli("status", "--port", fm.port)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    titles = [line for line in lines if not line.startswith(" ")]
    assert titles == ["Hardware", "SIM", "Network", "Radio", "Binding"]  # sections like `mmcli -m 0`
    rows = [line.split(None, 1) for line in lines if line.startswith("  ") and line.strip()]
    by_label = {}
    for label, value in (row for row in rows if len(row) == 2):
        by_label.setdefault(label, value)
    assert by_label["IMEI"] == state["imei"] and by_label["ICCID"] == state["iccid"] and by_label["state"] == "ready"
    assert by_label["registration"] == "home, CHINA MOBILE, LTE" and by_label["signal"] == "-85 dBm RSRP"
    assert by_label["radio"] == "on (CFUN=1)" and by_label["modem"] == "Quectel EC25 (quectel)"
    assert by_label["port"] == f"{fm.port} (opened directly)"
    assert by_label["source"] == "live (read from the modem now)"
    value_columns = {len(line) - len(line.split(None, 1)[1]) for line in lines
                     if line.startswith("  ") and len(line.split(None, 1)) == 2 and not line.startswith("   ")}
    assert len(value_columns) == 1  # every value starts in the same column
    assert max(len(line) for line in lines if not line.lstrip().startswith("port")) <= 60


def test_missing_port_exits_69_with_one_line(cli, tmp_path):
    done = cli("status", "--port", str(tmp_path / "ttyNONE"))
    assert done.returncode == 69
    assert done.stderr.strip().splitlines() == [f"simagent status: {tmp_path / 'ttyNONE'}: no such device"]
    assert done.stdout == ""


def test_busy_port_exits_69_while_another_program_holds_it(cli, registered_modem):
    fm = registered_modem(profile="generic")
    holder = subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(cli.config), "at", "--port", fm.port],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        holder.stdin.write("AT\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "OK\n"  # the console holds the port now
        done = cli("status", "--port", fm.port)
        assert done.returncode == 69
        assert done.stderr.strip().splitlines() == [
            f"simagent status: {fm.port}: held by another program (is simagent running?)"
        ]
    finally:
        holder.communicate("quit\n", timeout=10)
    assert holder.returncode == 0
    assert cli("status", "--port", fm.port).returncode == 0  # released on exit


@pytest.mark.parametrize("argv", [["status", "--bogus"], ["status", "--profile", "nokia"], ["at", "--port"]])
def test_usage_errors_exit_2(cli, argv):
    assert cli(*argv).returncode == 2


def test_status_asks_the_daemon_when_it_runs(cli, control_server, registered_modem):
    document = {
        "modem": {"vendor": "Quectel", "model": "EC25", "revision": "R1", "imei": "867400030000016",
                  "imei_luhn_ok": True, "profile": "quectel"},
        "sim": {"state": "ready", "iccid": "89860012345678901234", "imsi": "460001234567890"},
        "network": {"registration": "home", "operator": "CMCC", "access_tech": "lte", "signal_dbm": -77},
        "radio": {"cfun": 1, "gated": False},
        "binding": {"mode": "first-use", "status": "ok", "reason": None, "bound_iccid": "89860012345678901234",
                    "bound_imei": "867400030000016", "since": "2024-05-01T08:00:00+00:00"},
        "mqtt": {"connected": True},
        "outbox": {"events": 3, "telemetry": 12},
    }
    asked = []

    async def status(args, peer):
        asked.append(peer.pid)
        return document

    control_server(cli.socket, [socket_op("status", status)])
    done = cli("status", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == document and len(asked) == 1

    human = cli("status").stdout
    assert "  MQTT          connected" in human and "  outbox        3 events, 12 telemetry" in human
    assert "  signal        -77 dBm" in human

    # --port bypasses the daemon and reads the modem itself.
    fm = registered_modem(profile="ublox")
    assert status_json(cli, fm.port)["modem"]["profile"] == "ublox" and len(asked) == 2  # the daemon was not asked


def test_without_daemon_the_configured_port_is_used(cli, registered_modem):
    fm = registered_modem(profile="fibocom")
    cli.config.write_text(cli.config.read_text().replace("[modem]\n", f'[modem]\nport = "{fm.port}"\n'))
    started = time.monotonic()
    done = cli("status", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["modem"]["profile"] == "fibocom"
    assert time.monotonic() - started < 20


def test_bad_configuration_exits_78(cli):
    cli.config.write_text('[modem]\nbaudrate = "fast"\n')
    done = cli("status")
    assert done.returncode == 78 and "[modem] baudrate" in done.stderr


@pytest.mark.parametrize("profile", ["quectel", "ublox", "generic"])
def test_direct_status_and_diag_send_only_queries(cli, registered_modem, profile):
    """A read-only command changes nothing on the module: no echo or error-format setting,
    no URC switch, and above all no hot-swap enable that the module keeps in NV
    (Quectel AT+QSIMDET, u-blox AT+UDCONF=50)."""
    fm = registered_modem(profile=profile)
    assert status_json(cli, fm.port)["sim"]["state"] == "ready"
    assert cli("status", "--port", fm.port).returncode == 0
    done = cli("diag", "--json", "--port", fm.port)
    assert done.returncode in (0, 1), done.stderr
    assert {c["name"]: c["result"] for c in json.loads(done.stdout)["checks"]}["at_answers"] == "PASS"
    sent = [e["line"] for e in fm.transcript if e["dir"] == "in"]
    assert sent and "AT+CGSN" in sent
    # Only the numeric-error session setting, which is not saved, and back as it was found.
    writes = [line for line in sent if not is_query(line)]
    assert set(writes) <= {"AT+CMEE=1", "AT+CMEE=0"} and writes.count("AT+CMEE=1") == writes.count("AT+CMEE=0"), writes
    assert fm.state()["cmee"] == 0
