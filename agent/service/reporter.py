"""MQTT reporter: status, state, telemetry and the durable event outbox (SPEC §6, §7).

Integration with the daemon's asyncio loop
------------------------------------------
paho-mqtt is driven by the daemon's single asyncio loop through its external-loop
hooks (as in paho's `examples/loop_asyncio.py`): the socket callbacks register the
socket with `loop.add_reader` / `loop.add_writer`, which call `loop_read()` /
`loop_write()`, and a timer calls `loop_misc()` for keepalive. All paho callbacks
therefore run on the loop, so the reporter needs no locks of its own.

The one blocking step in paho is `connect()` (DNS, TCP connect, TLS handshake, up to
its connect timeout). It runs in a worker thread (`asyncio.to_thread`) so a dead broker
never stalls binding enforcement on the loop; socket callbacks paho makes from that
thread are ignored and the socket is attached to the loop once `connect()` returns.
Nothing else touches the client while that thread runs.

Each connection uses a fresh paho client, so no message queued inside paho survives a
disconnect: what must survive lives in the store's outbox and is sent again from there.

Delivery (SPEC §7)
------------------
Outbox rows are published at QoS 1 in position order with at most `window` in flight.
A row is deleted only after its PUBACK (MQTT 5: a reason code below 0x80); a refused
row stays and is retried after `retry_refused_after` seconds. Deletions are batched
(one commit per batch); a crash before the batch commits only causes duplicates, which
the platform drops by event id. After a reconnect or a restart every row still in the
outbox is sent again. The store is never locked across `publish()`. The last refusal is
shown in `link_status()` (`simagent status --json`, `mqtt.refused`) until a row is accepted.

Endpoints
---------
`[mqtt] endpoints` lists brokers (a cluster's nodes) tried round robin: a failed connect
or a lost session moves to the next one. Every attempt after a failure waits for the
jittered backoff, the move included: a node's death drops a whole fleet at once, and an
immediate retry on the survivor would be the synchronized storm the jitter exists to
prevent; per attempt (not per round of the list) also keeps a fleet's connect rate the
same however many endpoints it lists. Nothing in flight is lost in the move: the rows
not yet PUBACKed stay in the outbox and the new connection sends them again from the
oldest, in position order, before anything newer.

Protocol version
----------------
MQTT 5 is the default because under 3.1.1 a broker has no way to refuse a publish: a
message its ACL denies is PUBACKed and dropped (mosquitto does so), and the outbox would
delete an event nobody received. A broker that does not speak MQTT 5 answers the CONNECT
with "unacceptable protocol version" (3.1.1 CONNACK code 1, or MQTT 5 reason 0x84), or,
as RabbitMQ 3.x does, closes the connection without any CONNACK. On the first the
reporter logs a warning and connects again at once with 3.1.1, for that endpoint and the
reporter's life (a broker upgrade is picked up at the next start). A bare close may have
another cause (a TLS alert, a broker going down), so it earns 3.1.1 for one session only:
the next attempt goes at once with 3.1.1, and the session after that asks for MQTT 5
again; a transient close never pins an endpoint to 3.1.1. Both are per endpoint. MQTT 5
sessions are persistent by Session Expiry (a week) with Clean Start off, and Receive
Maximum bounds the commands the broker may have in flight to us; 3.1.1 uses the
clean-session flag off instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sqlite3
import ssl
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import __version__
from agent.core.backoff import Backoff
from agent.core.config import Endpoint, MqttConfig, TlsConfig
from agent.core import files
from agent.core.facts import STATE_SCHEMA
from agent.core.store import Store, TELEMETRY_SCHEMA

log = logging.getLogger(__name__)

STATUS_SCHEMA = "simagent/status/1"
SESSION_EXPIRY_S = 7 * 24 * 3600  # MQTT 5: commands queued while offline survive a week
ACK_FLUSH_DELAY_S = 0.05  # acknowledged rows are deleted in batches at most this late
ACK_FLUSH_RETRY_S = 1.0  # after a failed delete (disk full): how soon to try again

ACL_CAVEAT = "where a publish the broker's ACL denies is acknowledged and lost"
UNSUPPORTED_PROTOCOL_VERSION = 0x84  # MQTT 5 CONNACK reason; paho maps a 3.1.1 CONNACK code 1 to it


def refuses_protocol_version(reason_code: Any) -> bool:
    """A CONNACK that says the broker does not speak the protocol version we asked for."""
    return getattr(reason_code, "value", None) == UNSUPPORTED_PROTOCOL_VERSION

AGENT_TOPICS = ("status", "state", "telemetry", "events", "cmd", "cmd/result")  # under each device's prefix


class SettingsError(Exception):
    """The MQTT settings cannot be used (unreadable secret, encrypted key without a
    password, bad certificate file, ...). The message names the file, never a secret."""


@dataclass(frozen=True)
class Topics:
    prefix: str
    fleet: str = ""  # the prefix with "+" for the device id: where every device's topics are

    @classmethod
    def for_device(cls, topic_prefix: str, device_id: str) -> "Topics":
        return cls(topic_prefix.replace("{device_id}", device_id).rstrip("/"),
                   topic_prefix.replace("{device_id}", "+").rstrip("/"))

    def is_an_agents(self, topic: str) -> bool:
        """One of this or another device's agent topics (status, state, telemetry, events,
        cmd, cmd/result)."""
        return any(mqtt.topic_matches_sub(f"{prefix}/{kind}", topic) for prefix in (self.prefix, self.fleet or self.prefix)
                   for kind in AGENT_TOPICS)

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    @property
    def state(self) -> str:
        return f"{self.prefix}/state"

    @property
    def telemetry(self) -> str:
        return f"{self.prefix}/telemetry"

    @property
    def events(self) -> str:
        return f"{self.prefix}/events"

    @property
    def cmd(self) -> str:
        return f"{self.prefix}/cmd"

    @property
    def cmd_result(self) -> str:
        return f"{self.prefix}/cmd/result"


def read_secret(path: str, what: str) -> str:
    """The first line of a secret file. Errors name the file, never its content."""
    try:
        return files.read_secret(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or type(exc).__name__}") from None


def build_tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """Server verification against `ca_file` (system CAs when unset), host name checked,
    optional client certificate. Never prompts for a key password."""
    try:
        context = ssl.create_default_context(cafile=tls.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"cannot load [mqtt.tls] ca_file {tls.ca_file}: {exc}") from None
    if tls.cert_file:
        def key_password() -> str:
            # Without this callback OpenSSL would prompt on the terminal.
            if not tls.key_password_file:
                raise SettingsError(f"[mqtt.tls] key_file {tls.key_file or tls.cert_file} is encrypted and no key_password_file is set")
            return read_secret(tls.key_password_file, "[mqtt.tls] key_password_file")

        try:
            context.load_cert_chain(tls.cert_file, tls.key_file or None, password=key_password)
        except SettingsError:
            raise
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(
                f"cannot load the client certificate {tls.cert_file} / key {tls.key_file}: {exc} "
                "(wrong key_password_file?)"
            ) from None
    elif tls.key_file:
        raise SettingsError("[mqtt.tls] key_file is set but cert_file is not")
    return context


def connection_credentials(settings: MqttConfig) -> tuple[str | None, ssl.SSLContext | None]:
    """The password and the TLS context (None: TLS disabled) the `[mqtt]` settings name,
    read from their files; SettingsError says why they cannot be. The daemon builds them
    before it replaces a working reporter, so a reload naming an unusable file is refused."""
    password = read_secret(settings.password_file, "[mqtt] password_file") if settings.password_file else None
    return password, build_tls_context(settings.tls) if settings.tls.enabled else None


def describe_connect_error(exc: BaseException) -> str:
    """One line naming the cause of a failed connection attempt."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: broker certificate not accepted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (broker down?)"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "connection timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror})"
    if isinstance(exc, OSError):
        return f"network error ({exc.strerror or exc})"
    return f"{type(exc).__name__}: {exc}"


def payload_json(message: dict[str, Any]) -> str:
    """Every topic's JSON style: compact, as the outbox stores events."""
    return json.dumps(message, separators=(",", ":"))


class Reporter:
    """Publishes to `P/...` and receives `P/cmd`. Create and use it on the daemon's loop:
    `task = reporter.start()`; `reporter.publish_state(doc)`; `reporter.publish_telemetry(sample)`;
    `await reporter.stop()` on SIGTERM."""

    def __init__(
        self,
        settings: MqttConfig,  # the `[mqtt]` section
        store: Store,
        *,
        device_id: str,
        agent_version: str = __version__,
        on_command: Callable[..., Awaitable[dict[str, Any]]] | None = None,  # (payload, *, retained) -> reply
        backoff: Backoff | None = None,
        window: int = 20,
        retry_refused_after: float = 5.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.device_id = device_id
        self.agent_version = agent_version
        self.topics = Topics.for_device(settings.topic_prefix, device_id)
        self.client_id = (settings.client_id or "simagent-{device_id}").replace("{device_id}", device_id)
        self._brokers = settings.brokers()
        self._broker_index = 0  # the endpoint connected to, or tried next
        self._mqtt311: set[Endpoint] = set()  # endpoints that refused MQTT 5 (fall back, per endpoint)
        self._mqtt311_this_session: Endpoint | None = None  # closed an MQTT 5 CONNECT unanswered: 3.1.1 until the session ends
        self._reconnect_now = False  # the session ended by a protocol fall back: no backoff
        self.refused: str | None = None  # the broker's last refusal of an outbox row, until one is accepted
        self._on_command = on_command
        self._backoff = backoff or Backoff()
        self._window = window
        self._retry_refused_after = retry_refused_after
        self._connect_timeout = connect_timeout
        self._password, self._tls_context = connection_credentials(settings)
        if self._tls_context is None:
            log.warning("MQTT TLS is disabled ([mqtt.tls] enabled = false): traffic to %s is plaintext",
                        ", ".join(map(str, self._brokers)))

        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._client: mqtt.Client | None = None
        self._attached = False  # socket callbacks act only once the socket is on the loop
        self._misc_timer: asyncio.TimerHandle | None = None
        self._connack_timer: asyncio.TimerHandle | None = None
        self._session_end: asyncio.Future[str] | None = None
        self._stop_requested = asyncio.Event()
        self.connected = False  # CONNACK received and accepted
        self.last_error: str | None = None
        self._logged_cause: str | None = None
        self._socket_error: str | None = None

        self._state_doc: dict[str, Any] | None = None
        self._inflight: dict[int, int] = {}  # paho mid -> outbox position
        self._cursor = 0  # highest outbox position handed to paho on this connection
        self._acked: list[int] = []  # acknowledged positions not yet deleted
        self._ack_flush: asyncio.TimerHandle | None = None
        self._pump_scheduled = False
        self._refused_until: float | None = None  # loop time before which no row is sent
        self._control_pending: dict[int, asyncio.Future[bool]] = {}  # mids of status waits
        # (payload, properties, client, mid, qos); a command is acknowledged (PUBACK) only
        # once it has been handled, so none is lost to a full queue: see _on_message.
        self._commands: asyncio.Queue[tuple[bytes, Any, mqtt.Client, int, int]] = asyncio.Queue()
        self._command_worker: asyncio.Task | None = None
        self._read_paused: mqtt.Client | None = None  # reading stopped while the command queue is full

    # -- public API, on the loop ------------------------------------------------------
    def start(self) -> asyncio.Task:
        self._loop = asyncio.get_running_loop()
        self.store.outbox_listener = self.notify_outbox
        self._task = self._loop.create_task(self._run(), name="mqtt-reporter")
        if self._on_command is not None:
            self._command_worker = self._loop.create_task(self._serve_commands(), name="mqtt-commands")
        return self._task

    async def run(self) -> None:
        """`start()`, then until `stop()`; raises what killed the connection loop or the
        command worker, so the daemon's supervisor sees it."""
        tasks = [self.start()] + ([self._command_worker] if self._command_worker is not None else [])
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()

    def notify_outbox(self) -> None:
        """New rows were committed: send them now. Safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._schedule_pump()
        else:
            loop.call_soon_threadsafe(self._schedule_pump)

    def publish_state(self, doc: dict[str, Any]) -> None:
        """Retained `P/state`; republished on change and after every reconnect, each time
        with the `ts` it is published at."""
        message = {"schema": STATE_SCHEMA, **doc}
        if message == self._state_doc:
            return
        self._state_doc = message
        if self.connected:
            self._publish_state()

    def _publish_state(self) -> None:
        if self._state_doc is not None:
            self._publish(self.topics.state, {**self._state_doc, "ts": self.store.clock.now().iso()}, qos=1, retain=True)

    def publish_telemetry(self, sample: dict[str, Any]) -> None:
        """QoS 0 when connected; otherwise queued in the store and replayed at QoS 1."""
        stamp = self.store.clock.now()
        if self.connected:
            message = {"schema": TELEMETRY_SCHEMA, "id": str(uuid.uuid4()), "ts": stamp.iso(), "time_trusted": stamp.trusted, **sample}
            self._publish(self.topics.telemetry, message, qos=0)
            return
        with self.store.transaction() as tx:
            tx.enqueue_telemetry(sample, stamp)

    @property
    def broker(self) -> Endpoint:
        """The endpoint connected to, or the one tried next."""
        return self._brokers[self._broker_index]

    @property
    def _v5(self) -> bool:
        return str(self.settings.protocol) == "5" and self.broker not in self._mqtt311 and self.broker != self._mqtt311_this_session

    @property
    def protocol(self) -> str:
        return "5" if self._v5 else "3.1.1"

    def link_status(self) -> dict[str, Any]:
        return {"connected": self.connected, "broker": str(self.broker), "endpoints": [str(b) for b in self._brokers],
                "tls": self._tls_context is not None, "protocol": self.protocol, "last_error": self.last_error,
                "refused": self.refused}

    async def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop: send what is queued (bounded by `timeout`), publish the offline
        status, disconnect. Idempotent. Cancelling it cuts the goodbye short, never the
        end: the connection is closed and the tasks are ended whatever happens (a reporter
        left running would go on taking commands from a broker the configuration left)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._stop_requested.set()
        try:
            if self.connected:
                await self._drain_until(deadline)
                status = self._publish(self.topics.status, self._status(False), qos=1, retain=True)
                if status is not None:
                    waiter = loop.create_future()
                    self._control_pending[status.mid] = waiter
                    await _wait(waiter, deadline - loop.time())
                client = self._client
                if client is not None and self.connected:
                    client.disconnect()
            if self._task is not None:
                await _wait(asyncio.shield(self._task), max(deadline - loop.time(), 0.5))
        finally:
            # Cancelled at once, awaited after: a second cancel of this stop cannot undo them
            # (the connection task closes its socket as it ends).
            tasks = [task for task in (self._task, self._command_worker) if task is not None]
            for task in tasks:
                task.cancel()
            if self.store.outbox_listener == self.notify_outbox:
                self.store.outbox_listener = None
            await asyncio.gather(*tasks, return_exceptions=True)
            self._flush_acks()

    # -- connection life cycle --------------------------------------------------------
    async def _run(self) -> None:
        while not self._stop_requested.is_set():
            cause = await self._session()
            if self._stop_requested.is_set():
                break
            if self._reconnect_now:
                self._reconnect_now = False
                continue
            self._mqtt311_this_session = None  # the next session asks for MQTT 5 again
            failed = self.broker
            self._broker_index = (self._broker_index + 1) % len(self._brokers)
            delay = self._backoff.next_delay()
            self._log_cause(failed, cause, delay)
            try:
                await asyncio.wait_for(self._stop_requested.wait(), delay)
            except TimeoutError:
                pass

    async def _session(self) -> str:
        """One connection: connect, serve until it ends. Returns why it ended."""
        client = self._new_client()
        self._attached = False
        try:
            await asyncio.to_thread(self._connect_blocking, client)
        except Exception as exc:  # every failure is a cause to log, never a crash
            return describe_connect_error(exc)
        self._client = client
        self._session_end = self._loop.create_future()
        self._attach(client)
        try:
            return await self._session_end
        finally:
            self._detach()

    def _connect_blocking(self, client: mqtt.Client) -> None:
        """Runs in a worker thread: DNS, TCP and TLS may block."""
        broker, keepalive = self.broker, self.settings.keepalive
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
            properties.ReceiveMaximum = COMMAND_QUEUE  # the broker never has more commands in flight to us
            client.connect(broker.host, broker.port, keepalive, clean_start=False, properties=properties)
        else:
            client.connect(broker.host, broker.port, keepalive)

    def _new_client(self) -> mqtt.Client:
        protocol = mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            # A persistent session keeps commands sent while the terminal was offline.
            clean_session=None if self._v5 else False,
        )
        client.connect_timeout = self._connect_timeout
        client.max_inflight_messages_set(0)  # the reporter bounds its own window
        client.max_queued_messages_set(0)
        client.manual_ack_set(True)  # a command is PUBACKed once handled, not on arrival
        if self.settings.username:
            client.username_pw_set(self.settings.username, self._password)
        if self._tls_context is not None:
            client.tls_set_context(self._tls_context)
        client.will_set(self.topics.status, payload_json(self._last_will()), qos=1, retain=True)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_log = self._on_paho_log
        self._socket_error = None
        return client

    # -- paho socket hooks (on the loop once attached) ---------------------------------
    def _attach(self, client: mqtt.Client) -> None:
        sock = client.socket()
        self._attached = True
        if sock is None:  # closed between connect() and here
            self._end_session("connection closed during connect")
            return
        self._loop.add_reader(sock, self._readable, client)
        if client.want_write():
            self._loop.add_writer(sock, self._writable, client)
        self._schedule_misc(client)
        # The CONNACK is awaited as long as the TCP connect is, not paho's keepalive (twice,
        # with the 3.1.1 try a close earns): a frozen node completes handshakes from its
        # backlog and never answers, and failover must not wait minutes for it.
        self._connack_timer = self._loop.call_later(self._connect_timeout, self._connack_overdue)

    def _connack_overdue(self) -> None:
        self._connack_timer = None
        if not self.connected:
            self._end_session(f"no CONNACK within {self._connect_timeout:g} s")

    def _detach(self) -> None:
        self._attached = False
        self.connected = False
        if self._connack_timer is not None:
            self._connack_timer.cancel()
            self._connack_timer = None
        if self._misc_timer is not None:
            self._misc_timer.cancel()
            self._misc_timer = None
        client, self._client = self._client, None
        if client is not None and client.socket() is not None:
            # Off the loop's selector before the close (not through _on_socket_close, which
            # _attached = False silences): a registration left behind would meet the next
            # connection's socket under the same fd number (epoll: ENOENT on add_reader).
            sock = client.socket()
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            sock.close()
        # Whatever was in flight on this connection is sent again on the next one.
        self._inflight.clear()
        for waiter in self._control_pending.values():
            if not waiter.done():
                waiter.set_result(False)
        self._control_pending.clear()
        self._flush_acks()
        self._cursor = 0

    def _on_socket_open(self, client, userdata, sock) -> None:
        if self._attached:
            self._loop.add_reader(sock, self._readable, client)

    def _on_socket_close(self, client, userdata, sock) -> None:
        if self._attached and self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)

    def _on_socket_register_write(self, client, userdata, sock) -> None:
        if self._attached:
            self._loop.add_writer(sock, self._writable, client)

    def _on_socket_unregister_write(self, client, userdata, sock) -> None:
        if self._attached:
            self._loop.remove_writer(sock)

    def _readable(self, client: mqtt.Client) -> None:
        if self._commands.qsize() >= COMMAND_QUEUE:
            # Backpressure: with the command queue full, stop reading the socket (the
            # broker's sends then wait in TCP) until the command worker takes one.
            sock = client.socket()
            if sock is not None:
                self._loop.remove_reader(sock)
                self._read_paused = client
            return
        client.loop_read()

    def _resume_reading(self) -> None:
        client, self._read_paused = self._read_paused, None
        sock = client.socket() if client is not None else None
        if sock is not None and client is self._client and self._attached:
            self._loop.add_reader(sock, self._readable, client)

    def _writable(self, client: mqtt.Client) -> None:
        client.loop_write()

    def _schedule_misc(self, client: mqtt.Client) -> None:
        # Keepalive needs loop_misc() well within `keepalive`; a quarter of it keeps the
        # idle daemon to one wake-up every 15 s with the default keepalive of 60 s.
        interval = max(0.25, min(self.settings.keepalive / 4, 15.0))

        def tick() -> None:
            if client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._misc_timer = self._loop.call_later(interval, tick)

        self._misc_timer = self._loop.call_later(interval, tick)

    # -- paho protocol callbacks (on the loop) ------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:
        if reason_code.is_failure:
            if self._v5 and refuses_protocol_version(reason_code):
                self._mqtt311.add(self.broker)
                self._reconnect_now = True
                log.warning("MQTT %s refuses MQTT 5 (%s): falling back to MQTT 3.1.1 for this endpoint, %s",
                            self.broker, reason_code, ACL_CAVEAT)
                self._end_session("broker refuses MQTT 5")
                return
            self._end_session(f"broker refused the connection: {reason_code}")
            return
        self.connected = True
        self._backoff.connected()
        self.last_error = None
        if self._mqtt311_this_session == self.broker:
            log.warning("MQTT %s accepts MQTT 3.1.1 and closed the MQTT 5 connection unanswered: 3.1.1 for this "
                        "session, %s", self.broker, ACL_CAVEAT)
        if self._logged_cause is not None:
            log.info("MQTT connected to %s again", self.broker)
        else:
            log.info("MQTT connected to %s (%s, MQTT %s)", self.broker, "TLS" if self._tls_context else "plaintext", self.protocol)
        self._logged_cause = None
        client.subscribe(self.topics.cmd, qos=1)
        self._publish(self.topics.status, self._status(True), qos=1, retain=True)
        self._publish_state()
        self._refused_until = None
        self._schedule_pump()

    def _on_disconnect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:
        detail = self._socket_error or str(reason_code)
        if self.connected:
            self._backoff.disconnected()
            self._end_session(f"connection lost ({detail})")
        elif self._v5 and self._session_end is not None and not self._session_end.done():
            # No CONNACK to an MQTT 5 CONNECT: RabbitMQ 3.x cannot parse one and closes. It may
            # also be a TLS alert after the handshake (a client certificate wanted) or a broker
            # going down: so 3.1.1 for the next attempt and that session only.
            self._mqtt311_this_session, self._reconnect_now = self.broker, True
            log.info("MQTT %s closed the MQTT 5 connection without a CONNACK (%s): trying MQTT 3.1.1 once", self.broker, detail)
            self._end_session(f"connection closed before the broker accepted it ({detail})")
        else:
            self._end_session(f"connection closed before the broker accepted it ({detail})")
        self.connected = False

    def _on_paho_log(self, client, userdata, level: int, message: str) -> None:
        # paho reports socket and TLS errors (the reason a connection died) only here.
        if level == mqtt.MQTT_LOG_ERR:
            self._socket_error = message

    def _end_session(self, cause: str) -> None:
        if self._session_end is not None and not self._session_end.done():
            self._session_end.set_result(cause)

    def _on_publish(self, client, userdata, mid: int, reason_code: ReasonCode, properties) -> None:
        waiter = self._control_pending.pop(mid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(not reason_code.is_failure)
        position = self._inflight.pop(mid, None)
        if position is None:
            return
        if reason_code.is_failure:
            # The row stays; it is sent again once this connection's window is empty.
            log.warning("MQTT broker refused outbox message %d: %s; retrying in %.0f s", position, reason_code, self._retry_refused_after)
            self.refused = f"outbox message {position} refused by the broker: {reason_code}"
            self._refused_until = self._loop.time() + self._retry_refused_after
            self._loop.call_later(self._retry_refused_after, self._schedule_pump)
        else:
            self.refused = None
            self._acked.append(position)
            if self._ack_flush is None:
                self._ack_flush = self._loop.call_later(ACK_FLUSH_DELAY_S, self._flush_acks)
        self._schedule_pump()

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        """Commands are acknowledged after they were handled (manual acks), and the
        socket is not read while COMMAND_QUEUE commands wait (`_readable`), so no command
        is lost after its PUBACK and the queue stays bounded; MQTT 5 also tells the broker
        our Receive Maximum."""
        if message.topic != self.topics.cmd or self._on_command is None:
            client.ack(message.mid, message.qos)
            return
        # One socket read may hold a few packets past the high-water mark: the queue
        # itself is unbounded, what bounds it is that reading stops at COMMAND_QUEUE.
        self._commands.put_nowait((message.payload, message.properties, message.retain, client, message.mid, message.qos))

    # -- outbox --------------------------------------------------------------------------
    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and self._loop is not None:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Fills the in-flight window from the outbox, in position order."""
        self._pump_scheduled = False
        client = self._client
        if not self.connected or client is None:
            return
        if self._refused_until is not None:
            if self._loop.time() < self._refused_until or self._inflight:
                return
            # A refused row was left behind: start again from the oldest row.
            self._refused_until = None
            self._flush_acks()
            self._cursor = 0
        free = self._window - len(self._inflight)
        if free <= 0:
            return
        rows = self.store.outbox_pending(free, after_position=self._cursor)  # the store lock is released here
        for row in rows:
            topic = self.topics.events if row.kind == "event" else self.topics.telemetry
            info = client.publish(topic, row.payload, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return  # connection gone; the session ends and the row is sent again
            self._inflight[info.mid] = row.position
            self._cursor = row.position

    def _flush_acks(self) -> None:
        if self._ack_flush is not None:
            self._ack_flush.cancel()
            self._ack_flush = None
        if self._acked:
            acked, self._acked = self._acked, []
            try:
                self.store.outbox_ack_many(acked)
            except sqlite3.Error as exc:  # disk full, I/O error: the rows stay and are tried again
                log.warning("outbox: %d delivered rows could not be removed (%s); trying again", len(acked), exc)
                self._acked = acked + self._acked
                self._ack_flush = self._loop.call_later(ACK_FLUSH_RETRY_S, self._flush_acks)

    async def _drain_until(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while self.connected and loop.time() < deadline:
            if not self._inflight and not self.store.outbox_pending(1, after_position=self._cursor):
                return
            self._schedule_pump()
            await asyncio.sleep(0.01)

    # -- commands ------------------------------------------------------------------------
    async def _serve_commands(self) -> None:
        while True:
            payload, properties, retained, client, mid, qos = await self._commands.get()
            if self._read_paused is not None and self._commands.qsize() < COMMAND_QUEUE // 2:
                self._resume_reading()
            try:
                reply = await self._on_command(payload, retained=retained)
                body = payload_json(reply)
                self._publish(self.topics.cmd_result, body, qos=1)
                self._reply_to_response_topic(properties, body)
            except Exception:  # the command layer replies to bad input itself; this is a bug
                log.exception("MQTT command handling failed")
            if client is self._client and self.connected:
                client.ack(mid, qos)

    def _reply_to_response_topic(self, properties: Any, body: str) -> None:
        """MQTT 5: the reply also goes to the request's response topic, when that is a
        topic this agent may publish to (SPEC §6: validated, never trusted)."""
        response_topic = getattr(properties, "ResponseTopic", None) if self._v5 else None
        if not response_topic:
            return
        problem = response_topic_problem(response_topic, self.topics)
        if problem is not None:
            log.warning("command response topic %r ignored: %s", str(response_topic)[:80], problem)
            return
        reply_properties = Properties(PacketTypes.PUBLISH)
        correlation = getattr(properties, "CorrelationData", None)
        if isinstance(correlation, (bytes, bytearray)) and len(correlation) <= MAX_CORRELATION_BYTES:
            reply_properties.CorrelationData = bytes(correlation)
        self._publish(response_topic, body, qos=1, properties=reply_properties)

    # -- helpers -------------------------------------------------------------------------
    def _status(self, online: bool) -> dict[str, Any]:
        return {"schema": STATUS_SCHEMA, "online": online, "ts": self.store.clock.now().iso(), "agent_version": self.agent_version}

    def _last_will(self) -> dict[str, Any]:
        """`online: false` for the broker to publish when the session dies, at a time the
        agent cannot know: no `ts`, but when the session it ends began."""
        return {"schema": STATUS_SCHEMA, "online": False, "session_started": self.store.clock.now().iso(),
                "agent_version": self.agent_version}

    def _publish(self, topic: str, message: dict[str, Any] | str, *, qos: int, retain: bool = False,
                 properties: Properties | None = None) -> mqtt.MQTTMessageInfo | None:
        client = self._client
        if client is None or not self.connected:
            log.debug("MQTT not connected: %s not published", topic)
            return None
        payload = message if isinstance(message, str) else payload_json(message)
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        return info if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS else None

    def _log_cause(self, failed: Endpoint, cause: str, delay: float) -> None:
        # One line per cause: the same failure repeating (on any endpoint) is logged at debug level only.
        self.last_error = f"{failed}: {cause}"
        level = logging.DEBUG if cause == self._logged_cause else logging.WARNING
        self._logged_cause = cause
        log.log(level, "MQTT %s: %s%s; retrying in %.1f s", failed, cause,
                f"; next endpoint {self.broker}" if self.broker != failed else "", delay)


COMMAND_QUEUE = 64  # commands received and not yet handled (and so not yet acknowledged)
MAX_RESPONSE_TOPIC_BYTES = 256
MAX_CORRELATION_BYTES = 256


def response_topic_problem(topic: Any, topics: Any) -> str | None:
    """Why a platform-chosen response topic must not be published to, or None."""
    if not isinstance(topic, str) or not topic:
        return "not a topic name"
    if len(topic.encode("utf-8", "replace")) > MAX_RESPONSE_TOPIC_BYTES:
        return f"longer than {MAX_RESPONSE_TOPIC_BYTES} bytes"
    if any(c in topic for c in "+#") or any(ord(c) < 32 or ord(c) == 127 for c in topic):
        return "wildcards or control characters"
    if topic.startswith("$"):
        return "a broker topic ($...)"
    if topics.is_an_agents(topic):
        # On its own P/cmd a reply would come back as a command; on P/events or another
        # device's P/cmd it would pass for that agent's message or that device's command.
        return "an agent's topic (this device's or another's)"
    return None


async def _wait(awaitable: Awaitable[Any], timeout: float) -> None:
    try:
        await asyncio.wait_for(awaitable, max(timeout, 0.0))
    except TimeoutError:
        pass
