"""Shared fixtures: a real mosquitto on a free loopback port, TLS material made in the test,
password/ACL files, an MQTT subscriber that checks every message against the shipped JSON
Schemas.

    broker = mosquitto                      # plain, anonymous
    broker = make_broker(tls=tls_material)  # TLS; require_certificate=True for client certs
    broker = make_broker(users={"agent": "pw"}, acl="user agent\\ntopic readwrite simagent/#")
    broker.stop(); broker.start()           # outage on the same port
    sub = subscriber(broker, "simagent/dev1/#")
    sub.wait_for(lambda msgs: any(m.topic.endswith("/status") for m in msgs))
    validate_message(payload)               # raises jsonschema.ValidationError
    fault.rng / fault.trials(4) / fault.record(...)   # the fault suite (marker `faults`)
    small_disk                              # a 1 MiB tmpfs that can fill up (root only)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import ipaddress
import json
import os
import random
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from simagent_lab.localbroker import Broker

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "agent" / "schemas"
SCHEMA_FILES = {
    "status": "status.json",
    "state": "state.json",
    "telemetry": "telemetry.json",
    "event": "event.json",
    "command": "command.json",
    "cmd_result": "cmd_result.json",
}
# Topic suffix under P -> schema kind, for messages the agent publishes.
TOPIC_KINDS = {"status": "status", "state": "state", "telemetry": "telemetry", "events": "event", "cmd/result": "cmd_result"}


# -- JSON Schema validation -------------------------------------------------------------
@functools.cache
def schema_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / SCHEMA_FILES[kind]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def validate_message(payload: bytes | str | dict, kind: str | None = None) -> dict:
    """Parses and validates one message; the kind comes from its `schema` field
    (`simagent/<kind>/1`) and must match `kind` when given (a command may omit its
    `schema`, so `kind` is then used). Returns the document."""
    document = payload if isinstance(payload, dict) else json.loads(payload)
    if not isinstance(document, dict):
        raise jsonschema.ValidationError(f"a message is a JSON object, got {type(document).__name__}")
    if "schema" not in document and kind == "command":
        schema_validator(kind).validate(document)
        return document
    parts = str(document.get("schema", "")).split("/")
    if len(parts) != 3 or parts[0] != "simagent" or parts[2] != "1" or parts[1] not in SCHEMA_FILES:
        raise jsonschema.ValidationError(f"no known simagent schema: {document.get('schema')!r}")
    if kind is not None and parts[1] != kind:
        raise jsonschema.ValidationError(f"expected a {kind} message, got {document['schema']}")
    schema_validator(parts[1]).validate(document)
    return document


def topic_kind(topic: str) -> str | None:
    for suffix, kind in TOPIC_KINDS.items():
        if topic.endswith("/" + suffix):
            return kind
    return None


# -- ports and processes ----------------------------------------------------------------
def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# -- TLS material -------------------------------------------------------------------------
@dataclass
class TlsMaterial:
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_file: Path  # a CA that signed nothing the broker uses
    encrypted_client_key: Path
    key_password: str


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())  # fast to make, unlike RSA


def _cert(subject: str, key, issuer_name: str, issuer_key, *, ca: bool, san: list | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_key(path: Path, key, password: bytes | None = None) -> Path:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    path.chmod(0o600)
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_tls_material(directory: Path) -> TlsMaterial:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, other_ca_key, server_key, client_key = _key(), _key(), _key(), _key()
    ca = _cert("simagent test CA", ca_key, "simagent test CA", ca_key, ca=True)
    other_ca = _cert("some other CA", other_ca_key, "some other CA", other_ca_key, ca=True)
    server = _cert("localhost", server_key, "simagent test CA", ca_key, ca=False,
                   san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _cert("simagent-device", client_key, "simagent test CA", ca_key, ca=False)
    password = "key-pass-phrase"
    return TlsMaterial(
        ca_file=_write_cert(directory / "ca.pem", ca),
        server_cert=_write_cert(directory / "server.pem", server),
        server_key=_write_key(directory / "server.key", server_key),
        client_cert=_write_cert(directory / "client.pem", client),
        client_key=_write_key(directory / "client.key", client_key),
        other_ca_file=_write_cert(directory / "other-ca.pem", other_ca),
        encrypted_client_key=_write_key(directory / "client-encrypted.key", client_key, password.encode()),
        key_password=password,
    )


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def make_broker(tmp_path):
    brokers: list[Broker] = []

    def make(**options) -> Broker:
        broker = Broker(tmp_path / f"broker{len(brokers)}", **options)
        brokers.append(broker)
        return broker.start()

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(make_broker) -> Broker:
    return make_broker()


# -- a subscriber -------------------------------------------------------------------------
@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    properties: Any

    def json(self) -> dict:
        return json.loads(self.payload)


class Subscriber:
    """A paho client on its own thread that collects what arrives and validates each
    agent message against its schema on arrival (messages on `.../cmd` are the tests'
    own input and are not validated)."""

    def __init__(self, broker: Broker, topic: str, *, protocol: int = mqtt.MQTTv5, username: str | None = None,
                 password: str | None = None, client_id: str = "", persistent: bool = False) -> None:
        self.topic = topic
        self._cond = threading.Condition()
        self._messages: list[Message] = []
        self.invalid: list[str] = []
        if persistent:  # a named 3.1.1 session the broker keeps while this client is away
            protocol, client_id = mqtt.MQTTv311, client_id or "platform"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                  clean_session=False if persistent else None)
        self.client.reconnect_delay_set(0.05, 0.5)
        if username:
            self.client.username_pw_set(username, password)
        if broker.tls:
            self.client.tls_set(ca_certs=str(broker.tls.ca_file), certfile=str(broker.tls.client_cert), keyfile=str(broker.tls.client_key))
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("subscriber could not subscribe")

    def _on_message(self, client, userdata, message) -> None:
        item = Message(message.topic, bytes(message.payload), bool(message.retain), message.qos, message.properties)
        kind = topic_kind(item.topic)
        if item.payload and not item.topic.endswith("/cmd"):
            try:
                validate_message(item.payload, kind)
            except (ValueError, jsonschema.ValidationError) as exc:
                self.invalid.append(f"{item.topic}: {exc}")
        with self._cond:
            self._messages.append(item)
            self._cond.notify_all()

    def messages(self, suffix: str | None = None) -> list[Message]:
        with self._cond:
            items = list(self._messages)
        return [m for m in items if suffix is None or m.topic.endswith(suffix)]

    def documents(self, suffix: str) -> list[dict]:
        return [m.json() for m in self.messages(suffix) if m.payload]

    def wait_for(self, predicate: Callable[["Subscriber"], Any], timeout: float = 10.0, what: str = "messages") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            assert not self.invalid, f"schema-invalid messages: {self.invalid}"
            value = predicate(self)
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                recent = [(m.topic, m.payload[:200]) for m in self.messages()[-20:]]
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; last messages: {recent}")
            with self._cond:
                self._cond.wait(min(remaining, 0.05))

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, properties=None) -> None:
        self.client.publish(topic, payload, qos=qos, properties=properties).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber():
    """`subscriber(broker, topic, **options)` -> Subscriber; every one is checked at the end
    for schema-invalid messages."""
    subscribers: list[Subscriber] = []

    def make(broker: Broker, topic: str = "#", **options) -> Subscriber:
        sub = Subscriber(broker, topic, **options)
        subscribers.append(sub)
        return sub

    yield make
    for sub in subscribers:
        sub.close()
    invalid = [problem for sub in subscribers for problem in sub.invalid]
    assert not invalid, f"schema-invalid messages: {invalid}"


@pytest.fixture(name="validate_message")
def validate_message_fixture():
    """`validate_message(payload, kind=None) -> dict`, for tests in any folder."""
    return validate_message


# -- the fault suite ----------------------------------------------------------------------
# Tests marked `faults` (`./dev.sh faults [--long]`) break something real - kill -9, a
# broker outage, a damaged or unavailable state database, a full disk, a wrong clock - and
# record what they saw through the `fault` fixture: trials, events committed, received
# (unique), lost and duplicated. SIMAGENT_FAULT_TRIALS raises every test's trial count (the
# long run), SIMAGENT_FAULT_SEED replays a seed, SIMAGENT_FAULT_REPORT=FILE writes the
# rows as JSON (tests/fault_table.py prints them as the README's table).
FAULT_SEED = 1010  # the CI run's seed


@dataclass
class Fault:
    name: str
    seed: int
    rng: random.Random
    rows: list[dict]

    @staticmethod
    def trials(ci: int) -> int:
        """`ci` trials, or SIMAGENT_FAULT_TRIALS when that is more (the long run)."""
        return max(ci, int(os.environ.get("SIMAGENT_FAULT_TRIALS") or 0))

    def record(self, fault: str, *, trials: int, committed: Iterable, received: Iterable) -> dict:
        """One row of figures: `committed` are the keys (seq or id) of every event the
        agent committed, `received` the keys of every event an independent subscriber
        got, repeats included. Returns the row (the test asserts on it)."""
        committed, received = set(committed), list(received)
        got = set(received) & committed
        row = {"test": self.name, "fault": fault, "trials": trials, "committed": len(committed), "received": len(got),
               "lost": len(committed - got), "duplicated": len(received) - len(set(received)), "seed": self.seed}
        self.rows.append(row)
        print(f"fault figures: {row}")
        return row


@pytest.fixture(scope="session")
def _fault_rows() -> Iterable[list[dict]]:
    rows: list[dict] = []
    yield rows
    if os.environ.get("SIMAGENT_FAULT_REPORT"):
        Path(os.environ["SIMAGENT_FAULT_REPORT"]).write_text(json.dumps(rows, indent=1) + "\n")


@pytest.fixture
def fault(request, _fault_rows) -> Fault:
    """A seeded random source for this test (the seed is printed; SIMAGENT_FAULT_SEED
    replays it), its trial count and `record(...)` for the figures table."""
    seed = int(os.environ.get("SIMAGENT_FAULT_SEED") or FAULT_SEED)
    print(f"fault seed {seed} (replay: SIMAGENT_FAULT_SEED={seed})")
    return Fault(request.node.name, seed, random.Random(f"{seed}:{request.node.name}"), _fault_rows)


@dataclass
class SmallDisk:
    """A tmpfs of a few MiB: `fill()` writes a file until ENOSPC, `free()` removes it,
    `read_only(True|False)` remounts it."""
    path: Path

    def fill(self) -> None:
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass  # ENOSPC: the disk is full
        finally:
            os.close(fd)

    def free(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)

    def read_only(self, flag: bool) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if flag else 'rw'}", str(self.path)], check=True, capture_output=True)


@pytest.fixture
def make_small_disk(tmp_path):
    """`make_small_disk(size="1m")` -> SmallDisk: a tmpfs (root only; CI runs as root) that
    can really fill up; the test is skipped where it cannot be mounted."""
    mounts: list[Path] = []

    def make(size: str = "1m") -> SmallDisk:
        mount = tmp_path / f"disk{len(mounts)}"
        mount.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounts.append(mount)
        return SmallDisk(mount)

    yield make
    for mount in mounts:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(make_small_disk) -> SmallDisk:
    return make_small_disk()
# -- a broker limited to MQTT 3.1.1 ---------------------------------------------------------
class Mqtt311Front:
    """A real TCP listener in front of a mosquitto that refuses MQTT 5, as a 3.1.1-only
    broker does: a CONNECT with protocol level 5 gets the "unacceptable protocol version"
    CONNACK (`answer="3.1.1"`: the 3.1.1 packet, code 1, which MQTT 5 asks old servers to
    send; `answer="5"`: an MQTT 5 CONNACK with reason 0x84) and the connection is closed
    (`answer="close"`: closed without a CONNACK, as RabbitMQ 3.x does); any other CONNECT is
    relayed to the broker byte for byte (a stopped broker: closed without a CONNACK). mosquitto 2.0 has no option
    to refuse a protocol version (`accept_protocol_versions` came in 2.1), hence this.
    `levels` lists the protocol level of every CONNECT seen."""

    REFUSALS = {"3.1.1": b"\x20\x02\x00\x01", "5": b"\x20\x03\x00\x84\x00", "close": b""}

    def __init__(self, broker: Broker, answer: str = "3.1.1") -> None:
        self.broker, self.refusal = broker, self.REFUSALS[answer]
        self.levels: list[int] = []
        self.host = "127.0.0.1"
        self.tls = None
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _read_packet(sock: socket.socket) -> bytes:
        """One MQTT packet: fixed header byte, variable-length remaining length, body."""
        def read(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = sock.recv(n - len(data))
                if not chunk:
                    raise ConnectionError("closed")
                data += chunk
            return data

        header = read(1)
        length, shift, length_bytes = 0, 0, b""
        while True:
            byte = read(1)
            length_bytes += byte
            length |= (byte[0] & 0x7F) << shift
            shift += 7
            if not byte[0] & 0x80 or shift > 21:
                break
        return header + length_bytes + read(length)

    def _serve(self, client: socket.socket) -> None:
        try:
            connect = self._read_packet(client)
            offset = 2 + next(i for i, b in enumerate(connect[1:5]) if not b & 0x80)  # past the remaining length
            name_length = int.from_bytes(connect[offset:offset + 2], "big")
            level = connect[offset + 2 + name_length]
            self.levels.append(level)
            if level == 5:
                client.sendall(self.refusal)
                client.close()
                return
            upstream = socket.create_connection((self.broker.host, self.broker.port))
            self._sockets.append(upstream)
            upstream.sendall(connect)
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
            self._pipe(client, upstream)
        except (OSError, ConnectionError, StopIteration, IndexError):
            client.close()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the relay threads; close() alone would not
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture
def mqtt311_only():
    """`mqtt311_only(broker, answer="3.1.1")` -> a Mqtt311Front (host, port) before `broker`."""
    fronts: list[Mqtt311Front] = []

    def make(broker: Broker, answer: str = "3.1.1") -> Mqtt311Front:
        fronts.append(Mqtt311Front(broker, answer))
        return fronts[-1]

    yield make
    for front in fronts:
        front.close()
