"""A blocking MQTT client for the platform commands: one broker URL, the agent's TLS and
secret handling (`agent.service.reporter`), MQTT 5 with the agent's fall back to 3.1.1.

    link = Link(LinkOptions.parse("mqtts://broker:8883", ca_file=...)).connect()
    link.subscribe(["simagent/+/status"])
    link.publish("simagent/864.../cmd", payload)     # waits for the PUBACK
    message = link.next_message(timeout=1.0)         # None when nothing came
    link.close()

What arrives is bounded: MQTT 5 tells the broker our Maximum Packet Size, a larger
payload is dropped in any case, and at most QUEUE messages wait for the caller (then
paho's thread waits, and the broker's sends wait in TCP).
"""

from __future__ import annotations

import queue
import secrets
import ssl
import sys
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.platform.errors import BrokerUnavailable, PlatformError, UsageError
from agent.service.reporter import SettingsError, build_tls_context, describe_connect_error, read_secret, refuses_protocol_version
from agent.core.config import TlsConfig

MAX_PAYLOAD = 1024 * 1024  # the largest reply is an evidence export of at most 256 KiB
QUEUE = 10_000
SCHEMES = {"mqtt": (1883, False), "mqtts": (8883, True)}


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class LinkOptions:
    host: str
    port: int
    tls: ssl.SSLContext | None
    username: str | None = None
    password: str | None = None
    protocol: str = "5"  # or "3.1.1"
    timeout: float = 10.0

    @classmethod
    def parse(cls, url: str, *, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
              username: str | None = None, password_file: str | None = None, protocol: str = "5",
              timeout: float = 10.0) -> "LinkOptions":
        """`mqtt://HOST[:PORT]` (plain, 1883) or `mqtts://HOST[:PORT]` (TLS with server
        verification, 8883); the TLS files make sense only with mqtts."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise UsageError(f"--broker: {exc}: {url[:80]!r}") from None
        if parts.scheme not in SCHEMES or not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
            raise UsageError(f"--broker: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {url[:80]!r}")
        default_port, tls = SCHEMES[parts.scheme]
        if not tls and (ca_file or cert_file or key_file):
            raise UsageError("--ca-file, --cert-file and --key-file need an mqtts:// broker")
        try:
            context = build_tls_context(TlsConfig(True, ca_file, cert_file, key_file)) if tls else None
            password = read_secret(password_file, "--password-file") if password_file else None
        except SettingsError as exc:
            raise UsageError(str(exc)) from None
        return cls(parts.hostname, port or default_port, context, username, password, protocol, timeout)


class Link:
    def __init__(self, options: LinkOptions) -> None:
        self.options = options
        self.protocol = options.protocol
        self._client: mqtt.Client | None = None
        self._messages: queue.Queue[Message] = queue.Queue(QUEUE)
        self._connack = threading.Event()
        self._connack_reason: Any = None
        self._lost = threading.Event()
        self._acks: dict[int, tuple[threading.Event, list]] = {}
        self._lock = threading.Lock()

    # -- connection ---------------------------------------------------------------------
    def connect(self) -> "Link":
        reason = self._connect_once()
        if reason is not None and self.protocol == "5" and refuses_protocol_version(reason):
            print(f"simagent-platform: {self._where()} refuses MQTT 5 ({reason}): using MQTT 3.1.1", file=sys.stderr)
            self.close()
            self.protocol = "3.1.1"
            reason = self._connect_once()
        if reason is not None:
            self.close()
            raise BrokerUnavailable(f"{self._where()}: broker refused the connection: {reason}")
        return self

    def _where(self) -> str:
        return f"{self.options.host}:{self.options.port}"

    def _connect_once(self) -> Any:
        """Connects and starts paho's thread; returns None, or the CONNACK's refusal."""
        v5 = self.protocol == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"simagent-platform-{secrets.token_hex(6)}",
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else True)
        client.connect_timeout = self.options.timeout
        if self.options.username:
            client.username_pw_set(self.options.username, self.options.password)
        if self.options.tls is not None:
            client.tls_set_context(self.options.tls)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *args: self._lost.set()
        client.on_message = self._on_message
        client.on_publish = self._on_ack
        client.on_subscribe = self._on_ack
        self._connack.clear()
        self._lost.clear()
        self._client = client
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.MaximumPacketSize = MAX_PAYLOAD + 64 * 1024  # payload, topic and properties
        try:
            client.connect(self.options.host, self.options.port, keepalive=30, clean_start=True if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                           properties=properties)
        except Exception as exc:  # DNS, TCP, TLS: one line naming the cause
            raise BrokerUnavailable(f"{self._where()}: {describe_connect_error(exc)}") from None
        client.loop_start()
        if not self._connack.wait(self.options.timeout):
            self.close()
            raise BrokerUnavailable(f"{self._where()}: no answer to CONNECT within {self.options.timeout:g} s")
        reason = self._connack_reason
        return reason if reason is not None and reason.is_failure else None

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack_reason = reason_code
        self._connack.set()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    # -- traffic --------------------------------------------------------------------------
    def subscribe(self, topics: list[str]) -> None:
        """Subscribes at QoS 1 and waits for the SUBACK; a refused filter is an error."""
        result, mid = self._require_client().subscribe([(topic, 1) for topic in topics])
        granted = self._wait_ack(result, mid, f"subscribe to {', '.join(topics)}")
        refused = [topic for topic, code in zip(topics, granted) if getattr(code, "is_failure", False) or code == 0x80]
        if refused:
            raise PlatformError(f"{self._where()}: the broker refused the subscription to {', '.join(refused)}")

    def publish(self, topic: str, payload: bytes | str, *, properties: Properties | None = None) -> None:
        """Publishes at QoS 1 and waits for the PUBACK; under MQTT 5 a refusal (ACL) is an error."""
        info = self._require_client().publish(topic, payload, qos=1, properties=properties)
        (reason,) = self._wait_ack(info.rc, info.mid, f"publish to {topic}") or (None,)
        if reason is not None and getattr(reason, "is_failure", False):
            raise PlatformError(f"{self._where()}: the broker refused the publish to {topic}: {reason}")

    def next_message(self, timeout: float) -> Message | None:
        """The next message that arrived, or None after `timeout` seconds; raises
        BrokerUnavailable when the link is gone and nothing is left to read."""
        try:
            return self._messages.get(timeout=timeout) if timeout > 0 else self._messages.get_nowait()
        except queue.Empty:
            if self._lost.is_set():
                raise BrokerUnavailable(f"{self._where()}: the connection to the broker was lost") from None
            return None

    def _require_client(self) -> mqtt.Client:
        if self._client is None:
            raise BrokerUnavailable(f"{self._where()}: not connected")
        return self._client

    def _wait_ack(self, rc: MQTTErrorCode, mid: int | None, what: str) -> list:
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerUnavailable(f"{self._where()}: cannot {what}: {mqtt.error_string(rc)}")
        with self._lock:
            waiter = self._acks.setdefault(mid, (threading.Event(), []))
        acknowledged = waiter[0].wait(self.options.timeout)
        with self._lock:
            self._acks.pop(mid, None)
        if not acknowledged:
            raise BrokerUnavailable(f"{self._where()}: no acknowledgement to {what} within {self.options.timeout:g} s")
        return waiter[1]

    def _on_ack(self, client, userdata, mid, reason_codes, properties) -> None:
        codes = reason_codes if isinstance(reason_codes, list) else [reason_codes]
        with self._lock:
            event, found = self._acks.setdefault(mid, (threading.Event(), []))
        found.extend(codes)
        event.set()

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        if len(message.payload) > MAX_PAYLOAD:
            print(f"simagent-platform: {message.topic[:120]}: {len(message.payload)}-byte message ignored "
                  f"(limit {MAX_PAYLOAD})", file=sys.stderr)
            return
        self._messages.put(Message(message.topic, bytes(message.payload), bool(message.retain)))
