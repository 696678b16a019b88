"""agent.core.config: schema-driven loading, one test per error class, the shipped file."""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import resource
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from agent.core import config as cfgmod
from agent.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "agent.toml"


def _ed25519_pem() -> str:
    pub = Ed25519PrivateKey.generate().public_key()
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _ed25519_raw_b64() -> str:
    pub = Ed25519PrivateKey.generate().public_key()
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def _rsa_pem() -> str:
    pub = generate_private_key(public_exponent=65537, key_size=1024).public_key()
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


F = "/etc/simagent/agent.toml"

# (TOML text, exact error line)
ERRORS = [
    pytest.param('[binding]\non_violation = "radiooff"\n',
                 f'{F}: [binding] on_violation: expected one of radio-off, detach, report, got "radiooff"', id="choice"),
    pytest.param("[binding]\nfoo = 1\n",
                 f"{F}: [binding] foo: unknown key (known: mode, imei_allowlist, iccid_prefixes, on_violation, radio_gate, trusted_keys, provision_file)", id="unknown-key"),
    pytest.param("[mqtt.tls]\nverify = false\n",
                 f"{F}: [mqtt.tls] verify: unknown key (known: enabled, ca_file, cert_file, key_file, key_password_file)", id="unknown-nested-key"),
    pytest.param("[modems]\nport = \"auto\"\n",
                 f"{F}: [modems]: unknown section (known: device, modem, binding, mqtt, mqtt.tls, telemetry, outbox, control, log)", id="unknown-section"),
    pytest.param("level = \"info\"\n",
                 f"{F}: [level]: unknown section (known: device, modem, binding, mqtt, mqtt.tls, telemetry, outbox, control, log)", id="top-level-key"),
    pytest.param("log = 3\n", f"{F}: [log]: expected a table, got 3", id="section-not-table"),
    pytest.param("[mqtt]\nport = \"1883\"\n", f'{F}: [mqtt] port: expected an integer, got "1883"', id="type-int"),
    pytest.param("[mqtt]\nport = 1883.0\n", f"{F}: [mqtt] port: expected an integer, got 1883.0", id="type-float-for-int"),
    pytest.param("[binding]\nradio_gate = 1\n", f"{F}: [binding] radio_gate: expected true or false, got 1", id="type-bool"),
    pytest.param("[telemetry]\ninterval = true\n", f"{F}: [telemetry] interval: expected a number, got true", id="type-bool-for-number"),
    pytest.param("[binding]\nimei_allowlist = [490154203237518]\n",
                 f"{F}: [binding] imei_allowlist: expected a list of strings, got [490154203237518]", id="type-list-items"),
    pytest.param("[mqtt]\nport = 70000\n", f"{F}: [mqtt] port: expected a value in 1..65535, got 70000", id="range-high"),
    pytest.param("[modem]\ncommand_timeout = 0\n", f"{F}: [modem] command_timeout: expected a value in 0.1..300, got 0", id="range-low"),
    pytest.param('[binding]\nimei_allowlist = ["490154203237518", "12345"]\n',
                 f'{F}: [binding] imei_allowlist: item 2: expected a 15-digit IMEI string, got "12345"', id="imei"),
    pytest.param('[binding]\niccid_prefixes = ["1234"]\n',
                 f'{F}: [binding] iccid_prefixes: item 1: expected an ICCID prefix starting with "89", got "1234"', id="iccid-prefix"),
    pytest.param('[binding]\ntrusted_keys = ["not a key"]\n',
                 f"{F}: [binding] trusted_keys: item 1: not a usable Ed25519 public key: neither PEM nor base64", id="key-garbage"),
    pytest.param(f'[binding]\ntrusted_keys = ["""{_rsa_pem()}"""]\n',
                 f"{F}: [binding] trusted_keys: item 1: not a usable Ed25519 public key: PEM key is not Ed25519", id="key-rsa"),
    pytest.param('[modem]\nprofile = "nokia"\n', re.compile(rf'{F}: \[modem\] profile: expected one of auto, .*generic.*, got "nokia"'), id="profile"),
    pytest.param('[modem]\nport = "COM3"\n', re.compile(rf'{F}: \[modem\] port: expected "auto", a device path or a pyserial URL .*, got "COM3"'), id="port"),
    pytest.param('[device]\nid = "my device"\n', re.compile(rf'{F}: \[device\] id: expected "imei" or 1-64 characters .*, got "my device"'), id="device-id"),
    pytest.param('[device]\nstate_dir = "var/lib"\n', f'{F}: [device] state_dir: expected an absolute path, got "var/lib"', id="relative-path"),
    pytest.param('[mqtt]\ntopic_prefix = "fleet/{imei}"\n',
                 f'{F}: [mqtt] topic_prefix: only the placeholder {{device_id}} is allowed, got "fleet/{{imei}}"', id="template"),
    pytest.param('[mqtt]\ntopic_prefix = "fleet/#"\n',
                 f'{F}: [mqtt] topic_prefix: must not contain + # or a leading/trailing /, got "fleet/#"', id="topic-wildcard"),
    pytest.param('[mqtt]\nendpoints = ["mqtt-a.example:8883", "::1"]\n',
                 f'{F}: [mqtt] endpoints: item 2: an IPv6 address goes in brackets, as in "[::1]:8883"', id="endpoint-ipv6-bare"),
    pytest.param('[mqtt]\nendpoints = ["[fe80::zz]:8883"]\n',
                 f'{F}: [mqtt] endpoints: item 1: not an IPv6 address in brackets: "[fe80::zz]:8883"', id="endpoint-ipv6-bad"),
    pytest.param('[mqtt]\nendpoints = ["mqtt-a.example:0"]\n',
                 f'{F}: [mqtt] endpoints: item 1: port must be 1..65535, got "mqtt-a.example:0"', id="endpoint-port-low"),
    pytest.param('[mqtt]\nendpoints = ["mqtt-a.example:65536"]\n',
                 f'{F}: [mqtt] endpoints: item 1: port must be 1..65535, got "mqtt-a.example:65536"', id="endpoint-port-high"),
    pytest.param('[mqtt]\nendpoints = ["mqtt a:8883"]\n',
                 f'{F}: [mqtt] endpoints: item 1: expected a host name or IPv4 address before the port, got "mqtt a:8883"', id="endpoint-host"),
    pytest.param('[mqtt]\nendpoints = ["mqtt-a:1:2"]\n',
                 f'{F}: [mqtt] endpoints: item 1: expected "host", "host:port" or "[IPv6]:port", got "mqtt-a:1:2"', id="endpoint-shape"),
    pytest.param('[mqtt]\nhost = "mqtt-a.example"\nendpoints = ["mqtt-b.example"]\n',
                 f"{F}: [mqtt] host: set either host (one broker) or endpoints (several), not both", id="endpoint-and-host"),
    pytest.param('[mqtt.tls]\ncert_file = "/etc/simagent/client.crt"\n',
                 f"{F}: [mqtt.tls] key_file: cert_file and key_file go together (client certificate)", id="cross-key"),
    pytest.param("[mqtt]\nport = 1883\nport = 1884\n",
                 re.compile(rf"{F}: line 3, column \d+: TOML syntax error: .*"), id="toml-duplicate"),
    pytest.param("[mqtt]\nhost = \n", re.compile(rf"{F}: line 2, column \d+: TOML syntax error: Invalid value"), id="toml-syntax"),
    pytest.param("[mqtt]\nhost = [\n", re.compile(rf"{F}: line \d, end of file: TOML syntax error: .*"), id="toml-eof"),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_errors_name_file_and_key(text: str, expected) -> None:
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.parse(text, F)
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(str(info.value)), str(info.value)
    else:
        assert str(info.value) == expected


def test_valid_values_are_typed_and_normalised() -> None:
    pem, raw = _ed25519_pem(), _ed25519_raw_b64()
    cfg = cfgmod.parse(
        f"""
[device]
id = "dashcam-0042"
[modem]
port = "socket://127.0.0.1:7000"
port_role = "primary"
command_timeout = 2
[binding]
mode = "provisioned"
imei_allowlist = ["490154203237518"]
iccid_prefixes = ["8986ab"]
trusted_keys = ['''{pem}''', "{raw}"]
[mqtt]
protocol = "5"
[mqtt.tls]
enabled = false
""",
        "/tmp/x.toml",
    )
    assert cfg.device.id == "dashcam-0042"
    assert cfg.modem.port_role == "primary"
    assert cfg.modem.command_timeout == 2.0 and isinstance(cfg.modem.command_timeout, float)
    assert cfg.binding.imei_allowlist == ("490154203237518",)
    assert cfg.binding.iccid_prefixes == ("8986AB",)
    assert len(cfg.binding.trusted_keys) == 2
    assert cfg.mqtt.tls.enabled is False and cfg.mqtt.protocol == "5"
    assert cfg.mqtt.port == 8883  # untouched keys keep their defaults
    assert cfg.source == "/tmp/x.toml"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.binding.mode = "observe"  # type: ignore[misc]


def test_endpoints_are_tried_in_order_and_host_port_is_the_one_endpoint_form() -> None:
    Endpoint = cfgmod.Endpoint
    assert cfgmod.parse("").mqtt.brokers() == (Endpoint("localhost", 8883),)
    assert cfgmod.parse('[mqtt]\nhost = "10.0.0.1"\nport = 1883\n').mqtt.brokers() == (Endpoint("10.0.0.1", 1883),)
    text = '[mqtt]\nport = 1883\nendpoints = ["mqtt-a.example:8883", "10.0.0.2", "[2001:db8::2]:8884", "[::1]"]\n'
    brokers = cfgmod.parse(text).mqtt.brokers()
    assert brokers == (Endpoint("mqtt-a.example", 8883), Endpoint("10.0.0.2", 1883),  # no port: [mqtt] port
                       Endpoint("2001:db8::2", 8884), Endpoint("::1", 1883))
    assert [str(b) for b in brokers] == ["mqtt-a.example:8883", "10.0.0.2:1883", "[2001:db8::2]:8884", "[::1]:1883"]


def test_every_profile_name_is_accepted() -> None:
    from at_commands.profiles import PROFILES

    for name in PROFILES:
        assert cfgmod.parse(f'[modem]\nprofile = "{name}"\n').modem.profile == name


def test_shipped_file_documents_every_key_with_its_default() -> None:
    text = SHIPPED.read_text()
    assert tomllib.loads(text) == cfgmod.defaults()  # every key, no extra, default values
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line):
            assert lines[i - 1].startswith("#"), f"config/agent.toml:{i + 1}: {line!r} has no comment"
    assert cfgmod.parse(text).as_dict() == cfgmod.defaults()


def test_result_classes_follow_the_schema() -> None:
    cfg = cfgmod.from_mapping({})
    top = [f.name for f in dataclasses.fields(cfg) if f.name != "source"]
    assert top == [s for s in cfgmod.SECTIONS if "." not in s]
    for section in cfgmod.SECTIONS:
        names = [f.name for f in dataclasses.fields(cfg.section(section))]
        keys = [k.name for k in cfgmod.SCHEMA if k.section == section]
        assert names[: len(keys)] == keys


def test_path_resolution(tmp_path: Path) -> None:
    assert cfgmod.resolve_path("/a.toml", {"SIMAGENT_CONFIG": "/b.toml"}) == ("/a.toml", True)
    assert cfgmod.resolve_path(None, {"SIMAGENT_CONFIG": "/b.toml"}) == ("/b.toml", True)
    assert cfgmod.resolve_path(None, {}) == (cfgmod.DEFAULT_PATH, False)
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(cfgmod.ConfigError, match=f"^{missing}: no such file$"):
        cfgmod.load(missing)
    with pytest.raises(cfgmod.ConfigError, match=f"^{missing}: no such file$"):
        cfgmod.load(None, {"SIMAGENT_CONFIG": missing})
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[mqtt]\nusername = "j\xf6rg"\n')
    with pytest.raises(cfgmod.ConfigError, match="not UTF-8"):
        cfgmod.load(str(bad))


def test_secrets_are_read_from_files_and_redacted(tmp_path: Path) -> None:
    password = tmp_path / "mqtt.pass"
    password.write_text("s3cr3t-pa55\n")
    cfg = cfgmod.parse(f'[mqtt]\nusername = "dev"\npassword_file = "{password}"\n', "/x.toml")
    assert cfg.read_secret("mqtt", "password_file") == "s3cr3t-pa55"
    assert cfg.read_secret("mqtt.tls", "key_password_file") is None
    red = cfg.redacted()
    assert red["mqtt"]["password_file"] == cfgmod.REDACTED
    assert red["mqtt"]["username"] == "dev"
    assert red["mqtt"]["tls"]["key_file"] == ""  # unset stays visibly unset
    assert "s3cr3t" not in repr(red) and str(password) not in repr(red)
    with pytest.raises(ValueError):
        cfg.read_secret("mqtt", "username")
    password.unlink()
    with pytest.raises(cfgmod.ConfigError) as info:
        cfg.read_secret("mqtt", "password_file")
    assert str(info.value) == f"/x.toml: [mqtt] password_file: cannot read {password}: No such file or directory"


def _check_config(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_check_config_command(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("SIMAGENT_CONFIG", raising=False)
    good = tmp_path / "good.toml"
    good.write_text('[log]\nlevel = "debug"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[binding]\non_violation = "radiooff"\n')
    assert _check_config(capsys, ["check-config", "--config", str(good)]) == (0, f"OK {good}\n", "")
    assert _check_config(capsys, ["--config", str(good), "check-config"]) == (0, f"OK {good}\n", "")
    code, out, err = _check_config(capsys, ["--config", str(good), "check-config", "--config", str(bad)])
    assert (code, out) == (78, "")
    assert err == f'{bad}: [binding] on_violation: expected one of radio-off, detach, report, got "radiooff"\n'
    monkeypatch.setenv("SIMAGENT_CONFIG", str(bad))
    assert _check_config(capsys, ["check-config"])[0] == 78
    # a file the configuration names must be readable
    missing_ca = tmp_path / "ca.pem"
    named = tmp_path / "named.toml"
    named.write_text(f'[mqtt.tls]\nca_file = "{missing_ca}"\n')
    code, out, err = _check_config(capsys, ["check-config", "--config", str(named)])
    assert (code, err) == (78, f"{named}: [mqtt.tls] ca_file: cannot read {missing_ca}\n")
    missing_ca.write_text("x")
    assert _check_config(capsys, ["check-config", "--config", str(named)])[0] == 0


def test_check_config_entry_point_exit_code(tmp_path: Path) -> None:
    """The installed console script, as systemd and technicians run it."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nport = 0\n")
    proc = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 78
    assert proc.stderr.strip() == f"{bad}: [mqtt] port: expected a value in 1..65535, got 0"


def _hostile_config(path: Path, kind: str) -> str:
    """Makes `path` a hostile configuration of `kind`; returns what the one line says."""
    if kind == "deep_array":
        path.write_text("a = " + "[" * 1000 + "]" * 1000 + "\n")  # 2 kB
    elif kind == "deep_table":
        path.write_text("[device]\nid = " + "{a=" * 1000 + "1" + "}" * 1000 + "\n")
    elif kind == "huge":
        path.write_text("# " + "x" * cfgmod.MAX_CONFIG_BYTES + "\n")
        return "larger than 1 MiB"
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
        return "not a regular file"
    else:
        os.mkfifo(path)
        return "not a regular file"
    return "nested too deeply"


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("kind", ["deep_array", "deep_table", "huge", "dev_zero", "fifo"])
def test_a_hostile_config_file_is_one_line_and_exit_78(tmp_path: Path, kind: str, command: str) -> None:
    """Not a traceback (RecursionError), a hang (a FIFO) or the memory filled (/dev/zero)."""
    path = tmp_path / "agent.toml"
    said = _hostile_config(path, kind)
    try:
        done = subprocess.run([sys.executable, "-m", "agent", command, "--config", str(path)], capture_output=True,
                              text=True, timeout=20, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (2**29, 2**29)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{command} hung on a {kind} configuration")
    assert done.returncode == 78, done.stderr[-300:]
    assert len(done.stderr.strip().splitlines()) == 1 and str(path) in done.stderr and said in done.stderr, done.stderr[-300:]


def test_a_secret_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    password = tmp_path / "mqtt.pass"
    os.mkfifo(password)
    cfg = cfgmod.parse(f'[mqtt]\nusername = "dev"\npassword_file = "{password}"\n', "/x.toml")
    with pytest.raises(cfgmod.ConfigError) as info:
        cfg.read_secret("mqtt", "password_file")
    assert str(info.value) == f"/x.toml: [mqtt] password_file: cannot read {password}: not a regular file"


def test_a_control_socket_path_run_could_not_bind_is_refused() -> None:
    """104 bytes is a valid sun_path, but the daemon binds in a staging directory 13
    bytes longer than the socket's directory: check-config must say so, not run crash."""
    long_dir = "/run/" + "d" * 95
    with pytest.raises(cfgmod.ConfigError, match=r"\[control\] socket.*staging"):
        cfgmod.from_mapping({"control": {"socket": long_dir + "/c"}}, F)
    cfgmod.from_mapping({"control": {"socket": "/run/" + "d" * 80 + "/control.sock"}}, F)


def test_config_and_tokens_parse_keys_alike() -> None:
    """One Ed25519 parser: a base64 DER key check-config accepts is a key tokens accept."""
    from agent.core.tokens import load_trusted_keys

    public = Ed25519PrivateKey.generate().public_key()
    der = base64.b64encode(public.public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    for key in (der, _ed25519_raw_b64(), _ed25519_pem()):
        cfgmod.from_mapping({"binding": {"trusted_keys": [key]}}, F)
        assert len(load_trusted_keys([key])) == 1
    for bad in ("AAAA", _rsa_pem()):
        with pytest.raises(cfgmod.ConfigError, match="trusted_keys"):
            cfgmod.from_mapping({"binding": {"trusted_keys": [bad]}}, F)
        with pytest.raises(ValueError):
            load_trusted_keys([bad])
