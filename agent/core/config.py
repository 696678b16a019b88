"""Configuration (SPEC §2): one declarative schema drives loading, validation, defaults,
redaction and the documentation test of ``config/agent.toml``.

The file is TOML. Its path is ``--config PATH``, else ``$SIMAGENT_CONFIG``, else
``/etc/simagent/agent.toml``; a missing default file means "all defaults", a missing
file that was asked for explicitly is an error. Every error names the file and the key::

    /etc/simagent/agent.toml: [binding] on_violation: expected one of radio-off, detach, report, got "radiooff"

The result is a tree of typed, frozen dataclasses, one per section (``BindingConfig``,
``MqttConfig``...): ``cfg.binding.mode``, ``cfg.mqtt.tls.ca_file``; their fields are the
schema. Keys flagged secret hold the *path* of a file with the secret;
the secret itself is read only by :meth:`Config.read_secret` and never logged.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import sys
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent import exitcodes
from agent.core import binding
from agent.core.evidence import public_key_bytes  # the one key parser: tokens and evidence use it too
from agent.core.files import MIB, read_bounded, read_secret

if TYPE_CHECKING:  # `simagent check-config`'s types; the daemon imports this module without argparse
    import argparse

DEFAULT_PATH = "/etc/simagent/agent.toml"
ENV_VAR = "SIMAGENT_CONFIG"
REDACTED = "<redacted>"
MAX_CONFIG_BYTES = 1 * MIB  # a real configuration is a few KiB; a larger file is not one


class ConfigError(Exception):
    """A configuration problem; ``str()`` is the one line shown to the user."""

    def __init__(self, file: str, key: str | None, message: str) -> None:
        self.file = file
        self.key = key  # "[section] key", "[section]" or None (whole file)
        self.message = message
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


# ---------------------------------------------------------------------------
# Value checks. Each takes the (already type-checked) value and returns an error
# message or None; they are pure so the schema table stays declarative.

_Check = Callable[[Any], "str | None"]


def _pattern(regex: str, what: str) -> _Check:
    compiled = re.compile(regex)
    return lambda v: None if compiled.fullmatch(v) else f"expected {what}, got {_show(v)}"


def _each(check: _Check) -> _Check:
    def run(values: list) -> str | None:
        for i, v in enumerate(values):
            problem = check(v)
            if problem:
                return f"item {i + 1}: {problem}"
        return None

    return run


_ABSOLUTE_PATH = _pattern(r"/[^\x00]*", "an absolute path")
_OPTIONAL_PATH = _pattern(r"(/[^\x00]*)?", 'an absolute path or "" (none)')
# pyserial URL handlers that make sense for an AT port (serial.serial_for_url).
_SERIAL_URL_SCHEMES = ("socket", "rfc2217", "loop", "spy", "alt", "hwgrep")


# sun_path holds 107 bytes; the control socket is first bound as DIR/.cXXXXXXXX/s (a
# private staging directory, agent.service.control), 13 bytes longer than DIR.
_SUN_PATH_MAX = 107
_CONTROL_STAGING_EXTRA = 13


def _check_control_socket(value: str) -> str | None:
    problem = _ABSOLUTE_PATH(value)
    if problem:
        return problem
    directory = os.path.dirname(value.encode())
    if len(value.encode()) > _SUN_PATH_MAX or len(directory) + _CONTROL_STAGING_EXTRA > _SUN_PATH_MAX:
        return (f"a Unix socket path may hold {_SUN_PATH_MAX} bytes and simagent binds it in a staging directory "
                f"{_CONTROL_STAGING_EXTRA} bytes longer than its directory: choose a shorter one, got {_show(value)}")
    return None


def _check_port(value: str) -> str | None:
    if value == "auto" or value.startswith("/"):
        return None
    scheme, sep, rest = value.partition("://")
    if sep and scheme in _SERIAL_URL_SCHEMES and rest:
        return None
    return f'expected "auto", a device path or a pyserial URL ({", ".join(s + "://" for s in _SERIAL_URL_SCHEMES)}), got {_show(value)}'


def _check_profile(value: str) -> str | None:
    from at_commands.profiles import PROFILES  # late: profiles may grow at run time in tests

    names = ["auto", *sorted(PROFILES)]
    return None if value in names else f"expected one of {', '.join(names)}, got {_show(value)}"


def _check_device_id(value: str) -> str | None:
    if value == "imei" or re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        return None
    return f'expected "imei" or 1-64 characters of A-Z a-z 0-9 . _ - (used in MQTT topics), got {_show(value)}'


def _check_template(value: str) -> str | None:
    """topic_prefix / client_id: text with at most the ``{device_id}`` placeholder."""
    try:
        expanded = value.format(device_id="x")
    except (KeyError, IndexError, ValueError):
        return f"only the placeholder {{device_id}} is allowed, got {_show(value)}"
    if not expanded:
        return "must not be empty"
    return None


def _check_topic_prefix(value: str) -> str | None:
    problem = _check_template(value)
    if problem:
        return problem
    if any(c in value for c in "+#\x00") or value.startswith("/") or value.endswith("/"):
        return f"must not contain + # or a leading/trailing /, got {_show(value)}"
    return None


@dataclass(frozen=True)
class Endpoint:
    """One broker address of `[mqtt] endpoints`; ``str()`` is how it is written there."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
_ENDPOINT = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*))(?::(?P<port>[^:]*))?")


def parse_endpoint(text: str, default_port: int) -> Endpoint:
    """ "host", "host:port", "[IPv6]" or "[IPv6]:port" -> Endpoint; ValueError says why not."""
    m = _ENDPOINT.fullmatch(text)
    if m is None:
        if _is_ipv6(text):
            raise ValueError(f"an IPv6 address goes in brackets, as in \"[{text}]:8883\"")
        raise ValueError(f'expected "host", "host:port" or "[IPv6]:port", got {_show(text)}')
    if m["v6"] is not None:
        if not _is_ipv6(m["v6"]):
            raise ValueError(f"not an IPv6 address in brackets: {_show(text)}")
        host = m["v6"]
    else:
        host = m["host"]
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(f"expected a host name or IPv4 address before the port, got {_show(text)}")
    port = default_port
    if m["port"] is not None:
        if not m["port"].isdigit() or not 1 <= int(m["port"]) <= 65535:
            raise ValueError(f"port must be 1..65535, got {_show(text)}")
        port = int(m["port"])
    return Endpoint(host, port)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _check_endpoint(value: str) -> str | None:
    try:
        parse_endpoint(value, default_port=1)
    except ValueError as exc:
        return str(exc)
    return None


def _check_public_key(value: str) -> str | None:
    try:
        public_key_bytes(value)
    except ValueError as exc:
        return f"not a usable Ed25519 public key: {exc}"
    return None


# ---------------------------------------------------------------------------
# The sections: typed, frozen dataclasses; each field's ``setting(...)`` is its row of the
# schema (default and checks). The validators of a key another module owns are that
# module's (binding modes, the Ed25519 key parser).


def setting(default: Any, *, choices: tuple[str, ...] = (), range: tuple[float, float] | None = None,
            check: _Check | None = None, secret: bool = False, normalise: Callable[[Any], Any] | None = None) -> Any:
    """A configuration key: its default and how a value is checked. ``secret``: the value
    is the path of a file holding a secret; ``normalise`` is applied after validation."""
    spec = {"choices": choices, "range": range, "check": check, "secret": secret, "normalise": normalise}
    return field(default=_freeze(default), metadata={"setting": spec})


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class DeviceConfig:
    id: str = setting("imei", check=_check_device_id)
    state_dir: str = setting("/var/lib/simagent", check=_ABSOLUTE_PATH)


@dataclass(frozen=True)
class ModemConfig:
    port: str = setting("auto", check=_check_port)
    port_role: str = setting("secondary", choices=("primary", "secondary"))
    baudrate: int = setting(115200, range=(300, 4_000_000))
    profile: str = setting("auto", check=_check_profile)
    command_timeout: float = setting(5.0, range=(0.1, 300))
    sim_poll_interval: float = setting(5.0, range=(0.5, 3600))


@dataclass(frozen=True)
class BindingConfig:
    mode: str = setting("first-use", choices=binding.MODES)
    imei_allowlist: tuple[str, ...] = setting([], check=_each(_pattern(r"[0-9]{15}", "a 15-digit IMEI string")))
    iccid_prefixes: tuple[str, ...] = setting(
        [], check=_each(_pattern(r"89[0-9A-Fa-f]{0,18}", 'an ICCID prefix starting with "89"')),
        normalise=lambda prefixes: [p.upper() for p in prefixes],  # ICCIDs are normalised upper-case
    )
    on_violation: str = setting("radio-off", choices=binding.ON_VIOLATION)
    radio_gate: bool = setting(True)
    trusted_keys: tuple[str, ...] = setting([], check=_each(_check_public_key))
    provision_file: str = setting("", check=_OPTIONAL_PATH)

    def policy(self) -> binding.BindingPolicy:
        """The binding decision's policy these settings describe."""
        return binding.BindingPolicy(mode=self.mode, imei_allowlist=self.imei_allowlist,
                                     iccid_prefixes=self.iccid_prefixes, on_violation=self.on_violation,
                                     radio_gate=self.radio_gate)


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = setting(True)
    ca_file: str = setting("", check=_OPTIONAL_PATH)  # "": the system's trusted CAs
    cert_file: str = setting("", check=_OPTIONAL_PATH)
    key_file: str = setting("", check=_OPTIONAL_PATH, secret=True)
    key_password_file: str = setting("", check=_OPTIONAL_PATH, secret=True)


@dataclass(frozen=True)
class MqttConfig:
    host: str = setting("localhost", check=_pattern(r"[A-Za-z0-9.:_-]+", "a host name or address"))
    port: int = setting(8883, range=(1, 65535))
    # Brokers tried in order (round robin) instead of host; an entry without a port uses `port`.
    endpoints: tuple[str, ...] = setting([], check=_each(_check_endpoint))
    client_id: str = setting("simagent-{device_id}", check=_check_template)
    topic_prefix: str = setting("simagent/{device_id}", check=_check_topic_prefix)
    keepalive: int = setting(60, range=(5, 3600))
    protocol: str = setting("5", choices=("5", "3.1.1"))  # "5" falls back to 3.1.1 when the broker refuses it
    username: str = setting("")
    password_file: str = setting("", check=_OPTIONAL_PATH, secret=True)
    tls: TlsConfig = field(default_factory=TlsConfig)

    def brokers(self) -> tuple[Endpoint, ...]:
        """The endpoints in the order they are tried: `endpoints`, else `host`:`port`."""
        if self.endpoints:
            return tuple(parse_endpoint(text, self.port) for text in self.endpoints)
        return (Endpoint(self.host, self.port),)


@dataclass(frozen=True)
class TelemetryConfig:
    interval: float = setting(60.0, range=(5, 86400))


@dataclass(frozen=True)
class OutboxConfig:
    max_events: int = setting(100_000, range=(100, 10_000_000))
    max_telemetry: int = setting(10_000, range=(0, 10_000_000))


@dataclass(frozen=True)
class ControlConfig:
    socket: str = setting("/run/simagent/control.sock", check=_check_control_socket)


@dataclass(frozen=True)
class LogConfig:
    level: str = setting("info", choices=("debug", "info", "warning", "error"))


# Section name (TOML table) -> its class, parents before their nested tables.
_SECTION_CLASSES: dict[str, type] = {
    "device": DeviceConfig, "modem": ModemConfig, "binding": BindingConfig, "mqtt": MqttConfig,
    "mqtt.tls": TlsConfig, "telemetry": TelemetryConfig, "outbox": OutboxConfig, "control": ControlConfig,
    "log": LogConfig,
}


@dataclass(frozen=True)
class Key:
    section: str  # "mqtt.tls" for the nested table
    name: str
    type: type  # str, int, float, bool or list (of str)
    default: Any
    choices: tuple[str, ...] = ()
    range: tuple[float, float] | None = None  # inclusive
    check: _Check | None = None
    secret: bool = False  # value is the path of a file holding a secret
    normalise: Callable[[Any], Any] | None = None  # applied after validation

    @property
    def label(self) -> str:
        return f"[{self.section}] {self.name}"


def _schema() -> tuple[Key, ...]:
    keys = []
    for section, cls in _SECTION_CLASSES.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "setting" in f.metadata:
                kind = list if typing.get_origin(hints[f.name]) is tuple else hints[f.name]
                keys.append(Key(section, f.name, kind, list(f.default) if kind is list else f.default,
                                **f.metadata["setting"]))
    return tuple(keys)


# The schema, one row per key: loading, validation, defaults, redaction and the
# documentation test of config/agent.toml read it.
SCHEMA: tuple[Key, ...] = _schema()
SECTIONS: tuple[str, ...] = tuple(_SECTION_CLASSES)
_TOP_SECTIONS = [s for s in SECTIONS if "." not in s]


def _cross_checks(values: dict[str, dict[str, Any]], given: Mapping[str, Any]) -> tuple[str, str] | None:
    """Rules that involve two keys; returns (label, message) of the first one broken.
    `given` is the file's own mapping (to tell a key set from its default)."""
    if values["mqtt"]["endpoints"] and "host" in given.get("mqtt", {}):
        return "[mqtt] host", "set either host (one broker) or endpoints (several), not both"
    tls = values["mqtt.tls"]
    if bool(tls["cert_file"]) != bool(tls["key_file"]):
        return "[mqtt.tls] key_file", "cert_file and key_file go together (client certificate)"
    if tls["key_password_file"] and not tls["key_file"]:
        return "[mqtt.tls] key_password_file", "set without key_file"
    return None


@dataclass(frozen=True)
class Config:
    device: DeviceConfig = field(default_factory=DeviceConfig)
    modem: ModemConfig = field(default_factory=ModemConfig)
    binding: BindingConfig = field(default_factory=BindingConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = DEFAULT_PATH  # the file the values came from (shown in errors)

    def section(self, section: str) -> Any:
        obj: Any = self
        for part in section.split("."):
            obj = getattr(obj, part)
        return obj

    def as_dict(self, redact: bool = False) -> dict[str, Any]:
        """The TOML structure (``{"mqtt": {"tls": {...}}}``) of every schema key."""
        out: dict[str, Any] = {}
        for key in SCHEMA:
            value = getattr(self.section(key.section), key.name)
            if redact and key.secret and value:
                value = REDACTED
            _table(out, key.section)[key.name] = list(value) if isinstance(value, tuple) else value
        return out

    def redacted(self) -> dict[str, Any]:
        """The configuration for support bundles: secret keys replaced by ``<redacted>``."""
        return self.as_dict(redact=True)

    def read_secret(self, section: str, name: str) -> str | None:
        """The secret in the file a secret key names (its first line), or None when the key
        is empty. Errors name the key and the path, never the contents."""
        key = _KEYS[(section, name)]
        if not key.secret:
            raise ValueError(f"{key.label} is not a secret key")
        path = getattr(self.section(section), name)
        if not path:
            return None
        try:
            return read_secret(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(self.source, key.label, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc.__class__.__name__}") from None


_KEYS: dict[tuple[str, str], Key] = {(k.section, k.name): k for k in SCHEMA}


def _table(root: dict[str, Any], section: str) -> dict[str, Any]:
    for part in section.split("."):
        root = root.setdefault(part, {})
    return root


def defaults() -> dict[str, Any]:
    """The TOML structure of every key at its default (what config/agent.toml ships)."""
    out: dict[str, Any] = {}
    for key in SCHEMA:
        _table(out, key.section)[key.name] = list(key.default) if key.type is list else key.default
    return out


# ---------------------------------------------------------------------------
# Loading


def _show(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list of strings"}


def _type_ok(key: Key, value: Any) -> bool:
    if key.type is bool:
        return isinstance(value, bool)
    if key.type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if key.type is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if key.type is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, key.type)


def _validate_value(key: Key, value: Any) -> tuple[Any, str | None]:
    if not _type_ok(key, value):
        return value, f"expected {_TYPE_WORDS[key.type]}, got {_show(value)}"
    if key.choices and value not in key.choices:
        return value, f"expected one of {', '.join(key.choices)}, got {_show(value)}"
    if key.range and not key.range[0] <= value <= key.range[1]:
        lo, hi = (int(b) if float(b).is_integer() else b for b in key.range)
        return value, f"expected a value in {lo}..{hi}, got {_show(value)}"
    if key.check:
        problem = key.check(value)
        if problem:
            return value, problem
    if key.type is float:
        value = float(value)
    return (key.normalise(value) if key.normalise else value), None


def _toml_error(file: str, exc: tomllib.TOMLDecodeError, last_line: int) -> ConfigError:
    text = str(exc)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", text)
    if m:
        return ConfigError(file, None, f"line {m.group(1)}, column {m.group(2)}: TOML syntax error: {text[: m.start()]}")
    m = re.search(r"\s*\(at end of document\)$", text)
    if m:
        return ConfigError(file, None, f"line {last_line}, end of file: TOML syntax error: {text[: m.start()]}")
    return ConfigError(file, None, f"TOML syntax error: {text}")


def parse(text: str, file: str = DEFAULT_PATH) -> Config:
    """Validate TOML text against the schema; raises ConfigError naming file and key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(file, exc, text.count("\n") + 1) from None
    except RecursionError:  # arrays or inline tables nested a thousand deep
        raise ConfigError(file, None, "nested too deeply") from None
    return from_mapping(data, file)


def from_mapping(data: Mapping[str, Any], file: str = DEFAULT_PATH) -> Config:
    values = {s: {} for s in SECTIONS}
    _collect(data, "", values, file)
    for key in SCHEMA:
        values[key.section].setdefault(key.name, _freeze(key.default))
    broken = _cross_checks(values, data)
    if broken:
        raise ConfigError(file, *broken)
    built: dict[str, Any] = {}
    for section in sorted(SECTIONS, key=lambda s: -s.count(".")):
        kwargs = dict(values[section])
        for child in SECTIONS:
            if child.startswith(section + ".") and child.count(".") == section.count(".") + 1:
                kwargs[child.rpartition(".")[2]] = built[child]
        built[section] = _SECTION_CLASSES[section](**kwargs)
    return Config(**{s: built[s] for s in _TOP_SECTIONS}, source=file)


def _collect(table: Mapping[str, Any], prefix: str, values: dict[str, dict[str, Any]], file: str) -> None:
    for name, value in table.items():
        path = f"{prefix}.{name}" if prefix else name
        if path in values:
            if not isinstance(value, dict):
                raise ConfigError(file, f"[{path}]", f"expected a table, got {_show(value)}")
            _collect(value, path, values, file)
        elif not prefix:
            raise ConfigError(file, f"[{path}]", f"unknown section (known: {', '.join(SECTIONS)})")
        else:
            key = _KEYS.get((prefix, name))
            if key is None:
                known = [k.name for k in SCHEMA if k.section == prefix]
                raise ConfigError(file, f"[{prefix}] {name}", f"unknown key (known: {', '.join(known)})")
            checked, problem = _validate_value(key, value)
            if problem:
                raise ConfigError(file, key.label, problem)
            values[prefix][name] = _freeze(checked)


def resolve_path(explicit: str | None, environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(path, required): the file to read and whether its absence is an error."""
    environ = os.environ if environ is None else environ
    if explicit:
        return explicit, True
    if environ.get(ENV_VAR):
        return environ[ENV_VAR], True
    return DEFAULT_PATH, False


def load(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load the configuration the daemon and CLI use (see module docstring)."""
    path, required = resolve_path(explicit, environ)
    try:
        raw = read_bounded(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        if required:
            raise ConfigError(path, None, "no such file") from None
        return from_mapping({}, path)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not UTF-8 (byte {exc.start})") from None
    return parse(text, path)


def check_files(config: Config) -> list[ConfigError]:
    """Files the configuration names that cannot be read now (check-config reports them;
    the daemon meets the same errors when it opens them)."""
    problems = []
    for key in SCHEMA:
        if key.type is str and key.name.endswith("_file"):
            path = getattr(config.section(key.section), key.name)
            if path and not os.access(path, os.R_OK):
                problems.append(ConfigError(config.source, key.label, f"cannot read {path}"))
    return problems


# ---------------------------------------------------------------------------
# `simagent check-config`


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("check-config", help="validate the configuration file", description="Validate the configuration and the files it names; exit 0 when usable, 78 when not.")
    p.set_defaults(func=run_check_config)


def run_check_config(args: argparse.Namespace) -> int:
    explicit = getattr(args, "config", None)
    try:
        config = load(explicit)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return exitcodes.CONFIG
    problems = check_files(config)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return exitcodes.CONFIG
    path, required = resolve_path(explicit)
    if not required and not os.path.exists(path):
        print(f"OK {path} (not present: all defaults)")
    else:
        print(f"OK {path}")
    return exitcodes.OK
