"""diag: pure checks over facts, real disk/SQLite/TLS probes, the CLI, and the support bundle."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import stat
import tarfile
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agent import cli
from agent.core.checks import CHECKS, BrokerTarget, Result, disk_usage, exit_code, gather_facts, probe_broker, report_json, run_checks
from agent.cli.diag import format_table, write_bundle
from agent.core.redact import REDACTED, redact_text, redact_value
from agent.core.store import DB_NAME, Store

HEALTHY = {
    "modem_found": True,
    "modem_port": "/dev/ttyUSB2",
    "at_ok": True,
    "sim_state": "ready",
    "imei": "867698041234563",
    "imei_luhn_ok": True,
    "iccid": "89860312345678901234",
    "binding_status": "ok",
    "registration": "home",
    "signal_dbm": -71,
    "broker": {"host": "mqtt.example", "port": 8883, "reachable": True, "tls": "ok", "error": None},
    "clock_trusted": True,
    "disk": {"path": "/var/lib/simagent", "free_bytes": 900 << 20, "total_bytes": 1 << 30},
    "outbox": {"event": 0, "telemetry": 3},
}


def results(facts) -> dict[str, tuple[Result, str]]:
    return {c.name: (c.result, c.hint) for c in run_checks(facts)}


def test_checks_run_in_the_order_the_spec_lists():
    assert [spec.name for spec in CHECKS] == [
        "modem_found", "at_answers", "sim_ready", "identity", "binding", "registered",
        "signal", "broker", "clock", "disk", "outbox",
    ]  # fmt: skip


def test_a_healthy_terminal_passes_everything():
    checks = run_checks(HEALTHY)
    assert all(c.result is Result.PASS for c in checks), checks
    assert exit_code(checks) == 0
    assert report_json(checks)["ok"] is True


@pytest.mark.parametrize(
    ("change", "check", "result", "hint_word"),
    [
        ({"modem_found": False, "modem_port": "auto"}, "modem_found", Result.FAIL, "--port"),
        # issue 13: each hint matches the condition that produced it
        ({"modem_found": False}, "modem_found", Result.FAIL, "no device at /dev/ttyUSB2: check the port name"),
        ({"at_ok": False}, "at_answers", Result.FAIL, "interface"),
        ({"at_ok": False, "at_problem": "busy"}, "at_answers", Result.FAIL, "held by another program"),
        ({"at_ok": False, "at_problem": "hung", "at_detail": "no answer within 3 s"}, "at_answers", Result.FAIL,
         "does not answer (no answer within 3 s): it hangs; power-cycle"),
        ({"sim_state": "absent"}, "sim_ready", Result.FAIL, "insert"),
        ({"sim_state": "locked"}, "sim_ready", Result.FAIL, "PIN"),
        ({"sim_state": "error"}, "sim_ready", Result.FAIL, "reseat"),
        ({"sim_state": "unknown"}, "sim_ready", Result.WARN, "wait"),
        ({"imei": None}, "identity", Result.FAIL, "IMEI"),
        ({"iccid": None}, "identity", Result.FAIL, "ICCID"),
        ({"imei_luhn_ok": False}, "identity", Result.WARN, "rewritten"),
        ({"binding_status": "iccid_mismatch"}, "binding", Result.FAIL, "rebind token"),
        ({"binding_status": "not_provisioned"}, "binding", Result.FAIL, "bind accept"),
        ({"binding_status": "no_sim"}, "binding", Result.WARN, "insert"),
        ({"registration": "denied"}, "registered", Result.FAIL, "provider"),
        ({"registration": "searching"}, "registered", Result.WARN, "antenna"),
        ({"registration": "roaming"}, "registered", Result.PASS, "roaming"),
        ({"signal_dbm": None}, "signal", Result.WARN, "antenna"),
        ({"signal_dbm": -100}, "signal", Result.WARN, "weak"),
        ({"signal_dbm": -111}, "signal", Result.FAIL, "too weak"),
        # LTE RSRP runs some 20-30 dB below RSSI: -100 RSRP is a usable cell, not a weak one.
        ({"signal_dbm": -99, "signal_measure": "rsrp"}, "signal", Result.PASS, "-99 dBm RSRP"),
        ({"signal_dbm": -105, "signal_measure": "rsrp"}, "signal", Result.WARN, "weak"),
        ({"signal_dbm": -120, "signal_measure": "rsrp"}, "signal", Result.FAIL, "too weak"),
        ({"broker": {**HEALTHY["broker"], "reachable": False, "error": "timed out"}}, "broker", Result.FAIL, "timed out"),
        ({"broker": {**HEALTHY["broker"], "tls": "failed", "error": "certificate has expired"}}, "broker", Result.FAIL, "ca_file"),
        ({"broker": {**HEALTHY["broker"], "tls": "off"}}, "broker", Result.WARN, "TLS is off"),
        ({"clock_trusted": False}, "clock", Result.WARN, "NTP"),
        ({"disk": {"path": "/s", "free_bytes": 4 << 20, "total_bytes": 1 << 30}}, "disk", Result.FAIL, "free space"),
        ({"disk": {"path": "/s", "free_bytes": 20 << 20, "total_bytes": 1 << 30}}, "disk", Result.WARN, "20 MiB"),
        ({"disk": {"path": "/s", "error": "No such file or directory"}}, "disk", Result.FAIL, "No such file"),
        ({"outbox": {"event": 95_000, "telemetry": 0}}, "outbox", Result.FAIL, "dropped"),
        ({"outbox": {"event": 50, "telemetry": 0}, "outbox_caps": {"max_events": 50, "max_telemetry": 5}}, "outbox", Result.FAIL, "cap 50"),
        ({"outbox": {"event": 1500, "telemetry": 0}}, "outbox", Result.WARN, "1500 events"),
        ({"outbox": {"event": 0, "telemetry": 10_000}}, "outbox", Result.WARN, "telemetry"),
    ],
)
def test_each_problem_gives_its_result_and_a_one_line_hint(change, check, result, hint_word):
    outcome = results({**HEALTHY, **change})
    got, hint = outcome[check]
    assert got is result
    assert hint_word in hint and "\n" not in hint
    others = {name: r for name, (r, _) in outcome.items() if name != check}
    assert set(others.values()) == {Result.PASS}
    assert exit_code(run_checks({**HEALTHY, **change})) == (1 if result is Result.FAIL else 0)


def test_missing_facts_skip_with_a_hint_and_never_fail():
    checks = run_checks({"not_checked": {"outbox": "not checked: no state database in /x"}})
    assert {c.result for c in checks} == {Result.SKIP}
    assert all(c.hint.startswith("not checked") for c in checks)
    assert dict((c.name, c.hint) for c in checks)["outbox"] == "not checked: no state database in /x"
    assert exit_code(checks) == 0


def test_table_is_aligned():
    lines = format_table(run_checks({**HEALTHY, "clock_trusted": False})).splitlines()
    assert lines[0].split() == ["CHECK", "RESULT", "HINT"]
    column = lines[0].index("RESULT")
    assert all(line[column : column + 4] in {"PASS", "WARN", "FAIL", "SKIP"} for line in lines[1:])
    assert len(lines) == len(CHECKS) + 1


def test_disk_usage_of_a_real_directory(tmp_path):
    usage = disk_usage(tmp_path)
    assert 0 < usage["free_bytes"] <= usage["total_bytes"]
    assert disk_usage(tmp_path / "absent")["error"] == "No such file or directory"


def test_gather_facts_reads_the_store_without_changing_it(tmp_path):
    store = Store.open(tmp_path)
    for n in range(3):
        store.record("sim_inserted", {"n": n})
    with store.transaction() as tx:
        tx.enqueue_telemetry({"signal_dbm": -80}, store.clock.now())
    store.close()
    db = tmp_path / DB_NAME
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    facts = gather_facts(state_dir=tmp_path)
    assert facts["outbox"] == {"event": 3, "telemetry": 1}
    assert facts["disk"]["path"] == str(tmp_path)
    assert isinstance(facts["clock_trusted"], bool)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_gather_facts_never_creates_a_store(tmp_path):
    facts = gather_facts(state_dir=tmp_path)
    assert not (tmp_path / DB_NAME).exists()
    assert "outbox" not in facts
    outcome = results(facts)
    assert outcome["outbox"] == (Result.SKIP, f"not checked: {tmp_path / DB_NAME}: the state database is missing")
    assert outcome["disk"][0] is Result.PASS
    assert outcome["modem_found"] == (Result.SKIP, "not checked: the modem was not read")


# -- broker reachability and TLS, against real sockets --------------------------------------


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool):
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("test CA", ca_key, None, None, ca=True)
    other_ca = _cert("other CA", other_key, None, None, ca=True)
    server = _cert("localhost", server_key, ca.subject, ca_key, ca=False)
    files = {}
    for name, data in {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "other_ca": other_ca.public_bytes(serialization.Encoding.PEM),
        "server": server.public_bytes(serialization.Encoding.PEM),
        "server_key": server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }.items():
        files[name] = folder / f"{name}.pem"
        files[name].write_bytes(data)
    return files


class Listener:
    """A loopback server that accepts connections and, with a context, does a TLS handshake."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.context = context
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                if self.context is not None:
                    try:
                        with self.context.wrap_socket(conn, server_side=True):
                            pass
                    except (ssl.SSLError, OSError):
                        pass  # the client refused us; that is what some tests want

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def tls_listener(pki):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server"], pki["server_key"])
    listener = Listener(context)
    yield listener
    listener.close()


def test_broker_with_tls_verified_against_the_configured_ca(tls_listener, pki):
    probe = probe_broker(BrokerTarget("127.0.0.1", tls_listener.port, ca_file=str(pki["ca"])), timeout=3)
    assert probe == {"host": "127.0.0.1", "port": tls_listener.port, "reachable": True, "tls": "ok", "error": None}
    assert results({"broker": probe})["broker"][0] is Result.PASS


def test_broker_with_a_certificate_from_another_ca_fails_tls(tls_listener, pki):
    probe = probe_broker(BrokerTarget("127.0.0.1", tls_listener.port, ca_file=str(pki["other_ca"])), timeout=3)
    assert probe["reachable"] is True and probe["tls"] == "failed"
    assert "certificate" in probe["error"]
    result, hint = results({"broker": probe})["broker"]
    assert result is Result.FAIL and "ca_file" in hint


def test_broker_with_tls_off_is_a_warning():
    listener = Listener(None)
    try:
        probe = probe_broker(BrokerTarget("127.0.0.1", listener.port, tls=False), timeout=3)
    finally:
        listener.close()
    assert probe["reachable"] is True and probe["tls"] == "off"
    assert results({"broker": probe})["broker"][0] is Result.WARN


def test_unreachable_broker_fails_with_the_reason():
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    probe = probe_broker(BrokerTarget("127.0.0.1", port), timeout=3)
    assert probe["reachable"] is False and probe["error"] == "Connection refused"
    result, hint = results({"broker": probe})["broker"]
    assert result is Result.FAIL and "Connection refused" in hint


def test_gather_facts_probes_the_broker_it_is_given(tls_listener, pki):
    facts = gather_facts(broker=BrokerTarget("localhost", tls_listener.port, ca_file=str(pki["ca"])))
    assert facts["broker"]["tls"] == "ok"


# -- redaction and the support bundle -------------------------------------------------------

JWT = "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9.eyJzdWIiOiI4Njc2OTgwNDEyMzQ1NjMiLCJhY3QiOiJyZWJpbmQifQ.c2lnbmF0dXJlLWJ5dGVz"
SECRETS = {
    "mqtt_password": "Hunter2-mqtt-pass",
    "private_key_body": "MC4CAQAwBQYDK2VwBCIEIJ8pLhQ3tWc2zPlantedKeyMaterial",
    "jwt": JWT,
    "pin": "4711",
    "apn_password": "apnSecretXYZ",
    "api_token": "tok_live_9f8e7d6c",
    "env_password": "EnvPassw0rd!",
}
CONFIG = f"""
[device]
id = "imei"
state_dir = "/var/lib/simagent"

[mqtt]
host = "mqtt.example.com"
password = "{SECRETS['mqtt_password']}"
password_file = "/etc/simagent/mqtt.pass"

[mqtt.tls]
key_file = "/etc/simagent/client.key"

[binding]
trusted_keys = ["MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE="]
inline_key = '''
-----BEGIN PRIVATE KEY-----
{SECRETS['private_key_body']}
-----END PRIVATE KEY-----
'''
"""


def test_secrets_never_reach_the_bundle(tmp_path):
    bundle = write_bundle(
        tmp_path / "support.tar.gz",
        config_text=CONFIG,
        evidence_tail=[
            {"seq": 1, "type": "bound", "data": {"iccid": "89860312345678901234", "imei": "867698041234563"}},
            {"seq": 2, "type": "token_accepted", "data": {"token": JWT, "jti": "a1"}},
            {"seq": 3, "type": "token_refused", "data": {"reason": f"bad signature on {JWT}"}},
        ],
        transcript=(
            f'AT+CPIN="{SECRETS["pin"]}"\r\nOK\r\nAT+CPIN?\r\n+CPIN: READY\r\n'
            f'AT+QICSGP=1,1,"cmiot","user","{SECRETS["apn_password"]}",1\r\nOK\r\n'
        ),
        versions={"simagent": "0.1", "environment": f"MQTT_PASSWORD={SECRETS['env_password']}"},
        diag_result={"ok": True, "checks": [], "facts": {"api_token": SECRETS["api_token"]}},
    )
    assert stat.S_IMODE(os.stat(bundle).st_mode) == 0o600
    with tarfile.open(bundle) as tar:
        members = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    assert sorted(members) == [
        f"simagent-support/{n}"
        for n in ("at-transcript.txt", "config.toml", "diag.json", "evidence-tail.jsonl", "versions.json")
    ]
    everything = "\n".join(members.values())
    for name, secret in SECRETS.items():
        assert secret not in everything, name
    # What support needs is still there.
    assert "mqtt.example.com" in everything and "/etc/simagent/mqtt.pass" in everything
    assert "89860312345678901234" in everything and "+CPIN: READY" in everything
    assert "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=" in everything  # a public key
    json.loads(members["simagent-support/diag.json"])  # redaction keeps JSON parseable
    for line in members["simagent-support/evidence-tail.jsonl"].splitlines():
        json.loads(line)


def test_redaction_keeps_public_pem_blocks():
    cert = "-----BEGIN CERTIFICATE-----\nMIIBcert\n-----END CERTIFICATE-----\n"
    key = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIsecret\n-----END EC PRIVATE KEY-----\n"
    truncated = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEsecret"
    redacted = redact_text(cert + key + truncated)
    assert cert in redacted
    assert "MHcCAQEEIsecret" not in redacted and "b3BlbnNzaC1rZXktdjEsecret" not in redacted


def test_redaction_leaves_ordinary_text_alone():
    text = "ping: ok\nmonkey = banana\n+CPIN: READY\nkey_file = \"/k.pem\"\ndevice_pubkey: MCow"
    assert redact_text(text) == text
    assert redact_value({"device_pubkey": "MCow", "n": 3, "mqtt": {"token": "x"}}) == {
        "device_pubkey": "MCow",
        "n": 3,
        "mqtt": {"token": "[redacted]"},
    }


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(["password", "mqtt_password", "Token", "api-key", "secret", "PSK", "passphrase"]),
    secret=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="\"'\\,;}]"), min_size=6),
    style=st.sampled_from(['{n} = "{s}"', "{n}={s}", '"{n}": "{s}"', "{n}: {s}", "{n} = '{s}'"]),
)
def test_no_secret_field_leaks_whatever_its_value(name, secret, style):
    # A value that is part of what rightly stays (the field's name, the text around it,
    # the marker) cannot be told from a leak: `name="secret", secret="secret"`.
    assume(secret not in f"before {name} after {REDACTED}")
    line = style.format(n=name, s=secret)
    assert secret not in redact_text(f"before\n{line}\nafter")


# -- the sub-command ----------------------------------------------------------------------


def test_cli_json_output_and_exit_code(tmp_path, capsys, fake_modem, mosquitto):
    state = tmp_path / "state"
    Store.open(state).close()
    config = tmp_path / "agent.toml"
    config.write_text(f'[device]\nstate_dir = "{state}"\n[mqtt]\nhost = "127.0.0.1"\nport = {mosquitto.port}\n'
                      '[mqtt.tls]\nenabled = false\n')
    assert cli.main(["--config", str(config), "diag", "--json", "--port", fake_modem.port]) == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["outbox"]["result"] == "PASS" and by_name["disk"]["result"] == "PASS"
    assert by_name["broker"]["result"] == "WARN"  # reachable, but this test broker has no TLS
    assert by_name["modem_found"]["result"] == "PASS" and by_name["identity"]["result"] == "PASS"
    assert report["ok"] is True


def test_cli_fails_on_an_unreachable_broker(tmp_path, capsys, fake_modem):
    config = tmp_path / "agent.toml"
    config.write_text(f'[device]\nstate_dir = "{tmp_path}"\n[mqtt]\nhost = "127.0.0.1"\nport = 9\n')
    assert cli.main(["--config", str(config), "diag", "--json", "--port", fake_modem.port]) == 1
    by_name = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert by_name["broker"]["result"] == "FAIL"


def test_cli_fails_on_an_unusable_state_dir(tmp_path, capsys):
    assert cli.main(["diag", "--state-dir", str(tmp_path / "absent")]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["CHECK", "RESULT", "HINT"]
    assert "FAIL" in out


def test_cli_bundle_redacts_the_configuration(tmp_path, capsys):
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG)
    state = tmp_path / "state"
    store = Store.open(state)
    store.record("token_accepted", {"token": JWT})
    store.close()
    bundle = tmp_path / "b.tar.gz"
    cli.main(["--config", str(config), "diag", "--state-dir", str(state), "--bundle", str(bundle)])
    with tarfile.open(bundle) as tar:
        text = "\n".join(tar.extractfile(m).read().decode() for m in tar.getmembers())
    assert "mqtt.example.com" in text and "token_accepted" in text
    assert SECRETS["mqtt_password"] not in text and JWT not in text and SECRETS["private_key_body"] not in text


# issue 13: a condition that shows in several checks; each hint says what is true, and no
# check sends the technician after a part that is fine.
NO_SIM_RADIO_OFF = {"sim_state": "absent", "iccid": None, "cfun": 4, "signal_dbm": None, "registration": "idle",
                    "binding_status": "no_sim"}
LOCKED_RADIO_ON = {"sim_state": "locked", "cfun": 1, "signal_dbm": None, "registration": "idle",
                   "binding_status": "sim_locked"}


@pytest.mark.parametrize(
    ("condition", "check", "result", "hint_word", "never"),
    [
        (NO_SIM_RADIO_OFF, "identity", Result.PASS, "no card to read", "faulty"),
        (NO_SIM_RADIO_OFF, "signal", Result.WARN, "the radio is off (CFUN=4)", "antenna"),
        (NO_SIM_RADIO_OFF, "registered", Result.FAIL, "the radio is off (CFUN=4", "antenna"),
        (LOCKED_RADIO_ON, "registered", Result.FAIL, "the SIM is locked", "radio is off"),
        (LOCKED_RADIO_ON, "signal", Result.WARN, "the SIM is locked", "antenna"),
        ({"modem_found": True, "modem_port": "/dev/ttyUSB2", "at_ok": False, "at_problem": "busy"},
         "at_answers", Result.FAIL, "/dev/ttyUSB2 is held by another program", "no answer to AT"),
    ],
)
def test_a_hint_names_the_condition_that_produced_it(condition, check, result, hint_word, never):
    outcome = results({**HEALTHY, **condition})
    got, hint = outcome[check]
    assert got is result and hint_word in hint, (got, hint)
    assert not [h for _r, h in outcome.values() if never in h], outcome


def test_redaction_keeps_the_shipped_configuration_comments_readable():
    """Issue 13: `# Secret: the password is read from this file` is prose, not a field."""
    shipped = (__import__("pathlib").Path(__file__).resolve().parents[2] / "config" / "agent.toml").read_text()
    redacted = redact_text(shipped)
    assert "Secret: the password is read from this file" in redacted
    assert redacted == shipped  # the shipped file holds no secret values
    assert redact_text('# password = "hunter2"\n# token: "abc"\n') == '# password = "[redacted]"\n# token: "[redacted]"\n'
