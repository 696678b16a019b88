"""`simagent run`: the daemon. One asyncio loop carries everything (SPEC §10, issue 5):

- the modem session: find the AT port (explicit path/URL, or udev discovery and its
  monitor), open it and hand it to the `Enforcer` (radio gate first, then initialisation, binding
  decision, SIM hot-swap / polling); a lost modem is recorded (`modem_lost`) and
  looked for again, a found one (`modem_found`) gets a fresh binding check;
- the MQTT `Reporter` (paho driven by this loop) with the platform command processor;
- the control socket for the CLI;
- telemetry sampling, sd_notify (READY, STATUS, WATCHDOG while the loop is healthy) and
  signals: SIGTERM flushes and publishes the offline status, SIGHUP reloads the config.

The daemon gathers facts and carries out actions; decisions live in `agent.core.binding`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__, exitcodes
from agent.core import config as config_module
from agent.core.binding import BindingPolicy
from agent.core.clock import Clock
from agent.core.config import Config, ConfigError, OutboxConfig
from agent.service.control import MAX_REPLY, ControlError, ControlServer, Peer, StreamedResult, socket_op
from agent.service.enforcer import Enforcer, GateRefused
from agent.service.journal import JournalHandler, journal_socket, log_event
from agent.core.evidence import EvidenceError, parse_since, published_public_key
from agent.service.offload import ChildOutput, OffloadError, Offloader, device_public_key, open_tokens
from agent.service.platform_commands import MAX_EXPORT_REPLY_BYTES, Command, CommandError, CommandProcessor
from agent.service.reporter import Reporter, SettingsError, connection_credentials
from agent.service.sdnotify import LoopHealth, Notifier, Watchdog
from agent.core.redact import redact_text
from agent.core.store import DEVICE_KEY_NAME, Caps, Store, StoreUnavailable
from agent.service.supervise import Supervisor
from agent.core import at_rules, facts, tokens
from at_commands import commands as at_vocabulary, discovery
from at_commands.client import CommandError as ATCommandError
from at_commands.client import CommandTimeout, PortBusy, PortLost, PortNotFound, Transcript
from at_commands.modem import Modem
from at_commands.parsers import ParseError
from at_commands.transcript import Recorder

if TYPE_CHECKING:  # the CLI's types; `simagent run` itself reads its command line without argparse
    import argparse

log = logging.getLogger("simagent")

MODEM_RETRY_S = (1.0, 30.0)  # first and longest wait before looking for the modem again
# The newest AT traffic the daemon keeps for `at_transcript` (diag --bundle): bytes of records.
AT_TRANSCRIPT_KEEP = 128 * 1024
PORT_WATCH_S = 0.02  # how often a configured device path that is missing is looked for
DISCOVERY_POLL_S = 5.0  # udev events wake us sooner; this covers a missed event
PORT_SETTLE_S = 2.0  # how long a found modem may take to create the AT port of the wanted role
# A modem still enumerating when the agent starts is not "lost": it is reported missing
# only once this long has passed since start.
MODEM_BOOT_GRACE_S = 5.0
# A file [mqtt] names that cannot be used at start (a password or certificate put in place
# later, a mount not there yet): MQTT waits for it, tried this often; the gate does not.
MQTT_FILES_RETRY_S = 5.0
# Settings the daemon takes once, at start: the store it opened in state_dir, the topics
# and tokens of the device id, the control socket it bound. A reload keeps their running
# value and says they need a restart (applying them half would point status at an empty
# store, or leave topics and tokens on the old id).
NEEDS_RESTART = (("device", "id"), ("device", "state_dir"), ("control", "socket"))


class Daemon:
    def __init__(self, config: Config, *, config_path: str | None = None, notifier: Notifier | None = None,
                 clock: Clock | None = None) -> None:
        self.config = config
        self.config_path = config_path  # as given on the command line, for SIGHUP
        self.notifier = notifier or Notifier.from_env()
        self.clock = clock or Clock()
        self.store: Store | None = None
        self.device_pubkey: str | None = None
        self.enforcer: Enforcer | None = None
        self.reporter: Reporter | None = None
        self._mqtt_files_problem: str | None = None  # why the reporter cannot be made now
        self.control: ControlServer | None = None
        self.telemetry_interval = config.telemetry.interval
        self._stopping = asyncio.Event()
        self._identity_known = asyncio.Event()
        self._telemetry_changed = asyncio.Event()
        self._ready_sent = False
        self._modem_port: str | None = None
        self._modem_lost_recorded = False  # since the modem was last found (or since start)
        self._last_modem_state: dict[str, Any] = {}
        # The newest facts the modem answered and when (a pair, None: never read); a new
        # session that has not read yet (a hung module) leaves the last session's in place.
        self._last_read_at: float | None = None
        self._view_from: Enforcer | None = None  # the session the pair comes from
        self._modem_problem: str | None = None  # why the daemon is waiting for the modem
        # The last network facts read (by telemetry or a live `status`) and when: the state
        # document carries them, so it has the shape `status --json` has.
        self._last_network: dict[str, Any] | None = None
        self._network_read_at: float | None = None
        self._tasks: list[asyncio.Task] = []
        self.supervisor: Supervisor | None = None
        self.offload = Offloader()  # exports and diag's facts: off the loop, one at a time
        self.transcript = Transcript()  # the recent AT traffic across modem sessions (support bundles)
        # The same, replayable (simagent-fakemodem --replay): newest AT_TRANSCRIPT_KEEP bytes of records.
        self.at_recorder = Recorder(keep=AT_TRANSCRIPT_KEEP, port=config.modem.port, tool="simagent run")

    # -- life cycle -------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        self._started_at = loop.time()
        cfg = self.config
        try:
            self.store = Store.open(
                cfg.device.state_dir, clock=self.clock,
                caps=outbox_caps(cfg.outbox),
            )
        except StoreUnavailable as exc:  # not damage: left alone; systemd starts us again
            log.error("state store unavailable, not touched: %s", exc)
            return exitcodes.TEMPFAIL
        self.store.record_listener = log_event  # one log line (journald: with fields) per event
        self.device_pubkey = await self._device_key(cfg.device.state_dir)
        self._record("agent_started", {"version": __version__, "pid": os.getpid(), "config": cfg.source})
        if self._device_id() is not None:
            self._identity_known.set()

        self.control = ControlServer(cfg.control.socket, self._control_ops())
        await self.control.start()

        health = LoopHealth()
        health.start()
        # Every long-lived task is supervised: a failure is logged and the task started
        # again; one that keeps failing stops the watchdog pings (agent.service.supervise).
        self.supervisor = Supervisor(watch=health.watch)
        self.supervisor.start("modem", self._modem_supervisor)
        self.supervisor.start("control", self.control.serve)
        self.supervisor.start("reporting", self._reporting)
        self.supervisor.start("telemetry", self._telemetry)
        if watchdog := Watchdog.from_env(self.notifier, health):
            self._tasks.append(watchdog.start())

        await self._stopping.wait()
        await self._shutdown()
        return exitcodes.OK

    async def _shutdown(self) -> None:
        log.info("stopping")
        self.notifier.stopping()
        self._record("agent_stopping", {"pid": os.getpid()})
        if self.reporter is not None:
            self.reporter.notify_outbox()
            await self.reporter.stop()
        if self.supervisor is not None:
            await self.supervisor.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.control is not None:
            await self.control.close()
        self.offload.close()
        self.store.close()

    async def _device_key(self, state_dir: str) -> str | None:
        """The device public key; a child creates the key on first start. An unusable key
        file is left as it is (it may be recoverable) and gives None: exports fail and say
        why, the binding gate goes on (the daemon dying here left the radio ungated). A key missing
        beside an evidence log that has entries was lost (issue 10: never silently): the
        new one is recorded as `state_reset` with the public key published before, when
        still known, so the platform learns why exports now verify only with the new key.
        The bindings are intact, so nothing fails closed."""
        lost = not (Path(state_dir) / DEVICE_KEY_NAME).exists() and bool(self.store.evidence_tail(1))
        previous = None
        if lost:
            with contextlib.suppress(OSError):
                previous = published_public_key(state_dir) or None
        try:
            pubkey = await device_public_key(state_dir)
        except EvidenceError as exc:
            log.error("device key unusable, evidence exports fail until it is repaired: %s", exc)
            return None
        if lost:
            log.error("the device key was missing beside the evidence log: a new one was made (exports are signed "
                      "with it from now on, and no longer verify with the key published before)")
            self._record("state_reset", {"reason": "device_key_missing", "device_pubkey": pubkey,
                                         "previous_pubkey": previous})
        return pubkey

    def _record(self, type_: str, data: dict) -> None:
        """The daemon's own records. A store that cannot be written (disk full) must not
        stop the agent: enforcement holds the radio off and records the gap later."""
        try:
            self.store.record(type_, data)
        except sqlite3.Error as exc:
            log.error("%s could not be recorded: %s", type_, exc)

    def _spawn(self, coroutine, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.append(task)
        return task

    # -- modem --------------------------------------------------------------------------
    async def _modem_supervisor(self) -> None:
        wait = MODEM_RETRY_S[0]
        # A port reopened after a session ended without the device going away (the
        # module stopped answering, a soft reset) may still carry the old session's late
        # answers: the first command then resynchronises first, so a stale OK is never
        # taken for the gate's +CFUN=4. A module that was just plugged in has none.
        stale_answers = True  # at start or after a restart: a previous session's answers may still come
        while True:
            port = await self._find_port()
            try:
                modem = await Modem.open(
                    port, self.config.modem.profile, baudrate=self.config.modem.baudrate,
                    command_timeout=self.config.modem.command_timeout, resync_first=stale_answers,
                )
            except (PortNotFound, PortBusy, OSError) as exc:
                self._waiting_for_modem(f"cannot open {port}: {exc}")
                # A missing port is opened the moment it appears: a module that comes back
                # boots with RF on, so the radio gate must not be a backoff away. A port that
                # is there but cannot be opened (busy) backs off.
                if isinstance(exc, PortNotFound):
                    await self._port_appears(port, wait)
                else:
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, MODEM_RETRY_S[1])
                continue
            modem.client.transcript = self.transcript
            modem.client.record(self.at_recorder)
            opened_at = asyncio.get_running_loop().time()
            try:
                await self._modem_session(modem, port)
                wait = MODEM_RETRY_S[0]
            except (PortLost, CommandTimeout, ATCommandError, ParseError, OSError) as exc:
                log.warning("modem on %s lost: %s", port, exc)
                self._record("modem_lost", {"port": port, "reason": str(exc) or type(exc).__name__})
                self._modem_lost_recorded = True
            finally:
                modem.close()
                self._take_view()
                self._modem_problem = f"{port} went away"
                self.enforcer = None
                self._modem_port = None
                self._state_changed()
            # A replugged module is gated the moment it is back: after a session that ran a
            # while, at once even when the port is there already (unplugged and plugged
            # back within milliseconds: it booted with RF on). A session that ended at
            # once is retried after `wait` (no busy loop on a port that fails).
            lasted = asyncio.get_running_loop().time() - opened_at
            stale_answers = not await self._port_appears(port, 0.0 if lasted >= MODEM_RETRY_S[0] else wait)

    async def _modem_session(self, modem: Modem, port: str) -> None:
        """The enforcer gates the radio before anything else is sent, then initialises
        the module; `modem_found` is recorded once the module has told who it is."""
        self._modem_port = port
        found = False

        async def on_identity(imei: str | None) -> None:
            nonlocal found
            if not found:
                found = True
                log.info("modem found on %s (profile %s)", port, modem.profile.name)
                self._record("modem_found", {"port": port, "profile": modem.profile.name})
                self._modem_lost_recorded = False
            await self._provision(imei)

        enforcer = Enforcer(
            modem, self.store, self._policy(), sim_poll_interval=self.config.modem.sim_poll_interval,
            on_change=self._state_changed, on_identity=on_identity,
        )
        self.enforcer = enforcer
        decision = await enforcer.start()
        self._announce(f"binding {decision.status}" + (f" ({decision.reason})" if decision.reason else ""))
        await enforcer.run()

    @staticmethod
    async def _port_appears(port: str, timeout: float) -> bool:
        """Returns when the device path `port` exists (or after `timeout`); True when it
        was missing (the device went away). A stat every PORT_WATCH_S costs nothing while
        the modem is away; udev discovery ("auto") is woken by the udev monitor instead,
        and a URL is simply retried."""
        if "://" in port or os.path.exists(port):  # not a missing path: waiting is all we can do
            await asyncio.sleep(timeout)
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not os.path.exists(port) and loop.time() < deadline:
            await asyncio.sleep(PORT_WATCH_S)
        return True

    async def _find_port(self) -> str:
        """The configured port, or (port = "auto") the AT port udev knows, waiting for
        the modem to appear when it is not there."""
        port = self.config.modem.port
        if port != "auto":
            return port
        role = self.config.modem.port_role
        settle_until: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            events = discovery.watch()  # subscribed before looking: no add slips in between
            try:
                found = discovery.find_at_port(role=role)
                if found is None:
                    self._waiting_for_modem("no modem found by udev discovery")
                    timeout = DISCOVERY_POLL_S
                elif not discovery.wanted_port_expected(found, role):
                    return found.devnode
                else:  # the modem is still creating its ports: give the wanted one a moment
                    settle_until = settle_until or loop.time() + PORT_SETTLE_S
                    timeout = settle_until - loop.time()
                    if timeout <= 0:
                        log.warning("no %s AT port appeared next to %s; using it", role, found.devnode)
                        return found.devnode
                await self._next_udev_add(events, timeout)
            finally:
                await events.aclose()

    @staticmethod
    async def _next_udev_add(events, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                async for event in events:
                    if event.action == "add":
                        return

    def _waiting_for_modem(self, why: str) -> None:
        log.warning("waiting for the modem: %s", why)
        self._modem_problem = why
        since_start = asyncio.get_running_loop().time() - self._started_at
        if not self._modem_lost_recorded and since_start >= MODEM_BOOT_GRACE_S:  # missing at boot
            self._record("modem_lost", {"port": self.config.modem.port, "reason": why})
            self._modem_lost_recorded = True
        self._announce(f"waiting for modem: {why}")

    def _announce(self, status: str) -> None:
        """READY=1 comes with the first binding decision, or as soon as the agent knows
        it has to wait for a modem; later changes only update STATUS."""
        if self._ready_sent:
            self.notifier.status(status)
        else:
            self._ready_sent = True
            self.notifier.ready(status)

    async def _provision(self, imei: str | None) -> None:
        """Tokens written at manufacturing (`[binding] provision_file`): judged once the
        terminal knows its IMEI, before its first binding decision; a file already read
        (same content) is not read again. Their signatures are checked in one helper
        process, outside the offload queue (nothing is refused as busy here)."""
        path = self.config.binding.provision_file
        if not path or imei is None:
            return
        try:
            content = await asyncio.to_thread(tokens.read_provision_file, path)  # a slow file must not stall the loop
            provision = tokens.pending_provision(self.store, content, imei)
            if provision is None:
                return
            keys = self._trusted_keys()
            opened = await open_tokens(provision.tokens, keys) if provision.tokens else []
            results = tokens.apply_provision(self.store, provision, keys, imei, opened)
        except (OSError, sqlite3.Error, OffloadError) as exc:
            log.error("provision file %s not read: %s", path, exc)
            return
        for result in results:
            if result.accepted:
                log.info("provision file: %s for ICCID %s accepted", result.claims.act, result.claims.iccid)
            else:
                log.warning("provision file: token refused (%s): %s", result.code, result.message)

    def _policy(self) -> BindingPolicy:
        return self.config.binding.policy()

    # -- state and reporting -------------------------------------------------------------
    def _device_id(self) -> str | None:
        if self.config.device.id != "imei":
            return self.config.device.id
        return self.store.read().get_meta("last_imei")

    def _take_view(self) -> None:
        """The session's view becomes the last facts once the modem has answered it."""
        enforcer = self.enforcer
        if enforcer is not None and enforcer.read_at is not None:
            self._last_modem_state, self._last_read_at, self._view_from = enforcer.state(), enforcer.read_at, enforcer

    def _state_changed(self) -> None:
        self._take_view()
        if not self._identity_known.is_set() and self._device_id() is not None:
            self._identity_known.set()
        if self.reporter is not None:
            self.reporter.publish_state(self.state_document())
            self.reporter.notify_outbox()

    def state_document(self) -> dict[str, Any]:
        """The retained `P/state` document (SPEC §6)."""
        enforcer = self.enforcer
        # A read that changed nothing does not call _state_changed: the session's newest read time.
        read_at = enforcer.read_at if enforcer is not None and enforcer is self._view_from else self._last_read_at
        return facts.state_document(self._last_modem_state, mode=self.config.binding.mode, device_id=self._device_id(),
                                    agent_version=__version__, device_pubkey=self.device_pubkey,
                                    modem_present=enforcer is not None, port=self._modem_port or self.config.modem.port,
                                    network=self._last_network, network_read_at=self._network_read_at,
                                    read_at=read_at, now=time.time())

    def _network_read(self, network: dict[str, Any], read_at: float) -> None:
        """Network facts just read; a change is published with the state document."""
        changed = network != self._last_network
        self._last_network, self._network_read_at = network, read_at
        if changed:
            self._state_changed()

    def _live_read_budget(self) -> float:
        """How long `status` waits for the modem's live answer before it says the modem
        does not answer (the gate's reads may be queued ahead: one command's time, and a bit)."""
        return self.config.modem.command_timeout + 1.0

    async def status_document(self) -> dict[str, Any]:
        """What `simagent status` shows: the state document, live network facts, the
        MQTT link and the outbox depth; where the modem is missing or does not answer
        within a bounded time, ``modem_link`` says so and the facts are the last read."""
        doc = self.state_document()
        enforcer = self.enforcer
        if enforcer is None:
            doc["modem_link"] = facts.modem_link(facts.MISSING, self.config.modem.port, self._modem_problem)
        else:
            budget = self._live_read_budget()
            try:
                # The network live; the modem and the card as the gate knows them: a SIM read
                # here would answer with lines shaped like SIM-change reports, which make the
                # gate check (and record) again, and `status` records nothing.
                async with asyncio.timeout(budget):
                    network = await enforcer.modem.network_snapshot()
            except (TimeoutError, PortLost, CommandTimeout, ATCommandError) as exc:
                detail = f"no answer within {budget:g} s" if isinstance(exc, (TimeoutError, CommandTimeout)) else str(exc)
                doc["modem_link"] = facts.modem_link(facts.NOT_ANSWERING, self._modem_port, detail)
            else:
                now = time.time()
                self._network_read(network, now)
                doc["modem_link"] = facts.modem_link(facts.ANSWERING, self._modem_port)
                doc["network"] = network
                doc["freshness"]["network"] = facts.source(facts.LIVE, now, now)
        doc["mqtt"] = self.reporter.link_status() if self.reporter else {"connected": False, "last_error": self._no_reporter_why()}
        # Counting a full outbox (110k rows) takes milliseconds: in a thread, on a read-only connection.
        doc["outbox"] = await asyncio.to_thread(facts.outbox_depth, self.config.device.state_dir)
        return doc

    def _no_reporter_why(self) -> str:
        if self._mqtt_files_problem is not None:
            return f"MQTT not started: {self._mqtt_files_problem}"
        gave_up = self.supervisor.gave_up("reporting") if self.supervisor is not None else None
        if gave_up is not None:
            return f"reporting stopped after repeated failures ({gave_up}); SIGHUP starts it again"
        return "starting" if self._identity_known.is_set() else "waiting for the device id"

    async def _reporting(self) -> None:
        await self._identity_known.wait()
        device_id = self._device_id()
        processor = CommandProcessor(
            store=self.store, handlers=self._platform_handlers(), verify_token=self._verify_command_token,
        )
        while True:
            try:
                reporter = Reporter(self.config.mqtt, self.store, device_id=device_id, on_command=processor.handle)
                break
            except SettingsError as exc:  # not a crash to restart the daemon over: it would not help
                if self._mqtt_files_problem != str(exc):
                    log.error("MQTT not started: %s (tried again every %g s)", exc, MQTT_FILES_RETRY_S)
                self._mqtt_files_problem = str(exc)
                await asyncio.sleep(MQTT_FILES_RETRY_S)
        self._mqtt_files_problem = None
        self.reporter = reporter
        try:
            reporter.publish_state(self.state_document())
            await reporter.run()
        finally:
            if self.reporter is reporter:
                self.reporter = None
            await reporter.stop()

    async def _telemetry(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.telemetry_interval):
                    await self._telemetry_changed.wait()
                    self._telemetry_changed.clear()
                    continue
            enforcer, reporter = self.enforcer, self.reporter
            if enforcer is None or reporter is None:
                continue
            try:
                sample = await self._telemetry_sample(enforcer.modem)
            except (PortLost, CommandTimeout, ATCommandError) as exc:
                log.info("telemetry sample skipped: %s", exc)
                continue
            reporter.publish_telemetry(sample)
            self._network_read({key: sample[key] for key in facts.UNKNOWN_NETWORK}, time.time())

    async def _telemetry_sample(self, modem: Modem) -> dict[str, Any]:
        registration = await modem.read_registration()
        signal_ = await modem.read_signal()
        port = self._modem_port
        return {
            "registration": registration.state,
            "access_tech": registration.access_tech,
            "operator": await modem.read_operator(),
            "cell": {"lac": registration.lac, "cell_id": registration.cell_id},
            "signal_dbm": signal_.dbm,
            "signal_measure": signal_.measure,
            "data": await asyncio.to_thread(discovery.data_counters, port) if port and "://" not in port else None,
        }

    # -- binding operations shared by the CLI and the platform ----------------------------
    def _trusted_keys(self) -> list:
        return tokens.load_trusted_keys(self.config.binding.trusted_keys)

    async def _open_token(self, token: str, keys: list[tokens.TrustedKey]) -> tokens.Opened:
        """What the header tells is refused here; the signature is checked in a helper
        process (agent.service.offload), so PyJWT and cryptography never load in the
        daemon. Raises OffloadError (busy, or the helper failed)."""
        try:
            tokens.signing_candidates(token, keys)
        except tokens.TokenError as refusal:
            return tokens.Opened(refusal=refusal)
        (opened,) = await self.offload.open_tokens([token], keys)
        return opened

    async def accept_token(self, token: str, source: str, actions=tokens.BINDING_ACTIONS,
                           opened: tokens.Opened | None = None) -> dict[str, Any]:
        """`opened`: the token's signed payload when a platform command's check opened it."""
        keys = self._trusted_keys()
        if opened is None:
            opened = await self._open_token(token, keys)
        if self.enforcer is not None:
            result = await self.enforcer.accept_token(token, keys, source=source, actions=actions, opened=opened)
        else:  # no modem: the binding still changes; the next modem session checks it
            result = tokens.accept_token(self.store, token, keys, self._device_id(),
                                         source=source, actions=actions, opened=opened)
            self._state_changed()
        return {"accepted": result.accepted, "code": result.code, "message": result.message,
                "act": result.claims.act if result.claims else None}

    async def reset_binding(self, reason: str, uid: int) -> dict[str, Any]:
        if self.enforcer is not None:
            removed = await self.enforcer.reset(reason, uid)
        else:
            from agent.core.binding import reset_bindings

            removed = reset_bindings(self.store, reason, uid)
            self._state_changed()
        return {"removed": [b.iccid for b in removed]}

    async def export_evidence(self, since: str | None, *, max_bytes: int) -> ChildOutput:
        """The signed bundle from `since` on, built off the loop (agent.service.offload); the caller
        closes what it gets. Raises ValueError for a bad `since`, OffloadError (busy,
        too_large past `max_bytes`, ...) when refused."""
        if since is not None:
            parse_since(str(since))
        stamp = self.clock.now()  # the daemon's clock: it may hold network time
        return await self.offload.export_evidence(
            self.config.device.state_dir, since=None if since is None else str(since), device_id=self._device_id(),
            exported_at=stamp.iso(), exported_at_trusted=stamp.trusted, max_bytes=max_bytes,
        )

    async def run_at(self, command: str, *, unsafe: bool, who: dict[str, Any]) -> dict[str, Any]:
        """One AT command line for a technician or the platform. The caller has checked
        who may write (`unsafe`: root with --unsafe, or a verified token); `at_rules`
        checks what may be sent and the enforcer's gate when."""
        enforcer = self.enforcer
        if enforcer is None:
            raise ControlError("unavailable", "no modem is connected")
        try:
            at_rules.check_command(command, unsafe)
            response = await enforcer.user_command(command, write=not at_vocabulary.is_query(command), who=who)
        except at_rules.Refused as exc:
            raise ControlError(exc.code, str(exc)) from exc
        except GateRefused as exc:
            raise ControlError(exc.code, str(exc)) from exc
        except sqlite3.Error as exc:  # an unsafe write that cannot be recorded is not sent
            raise ControlError("store_unwritable", f"refused: the write could not be recorded as evidence ({exc})") from exc
        except (PortLost, CommandTimeout) as exc:
            raise ControlError("modem_error", str(exc) or type(exc).__name__) from exc
        return at_rules.at_result(response)

    async def diagnose(self) -> dict[str, Any]:
        doc = await self.status_document()
        found = await self.offload.run_thread("diag", _gather_diag_facts, self.config)
        from agent.core import checks  # imported by the worker above

        found.update(facts.diag_facts(doc))
        return checks.report_json(checks.run_checks(found))

    # -- control socket ---------------------------------------------------------------------
    def _control_ops(self) -> list:
        async def status(args: dict, peer: Peer) -> Any:
            return await self.status_document()

        async def run_diag(args: dict, peer: Peer) -> Any:
            return await self.diagnose()

        async def at(args: dict, peer: Peer) -> Any:
            return await self.run_at(str(args["command"]), unsafe=bool(args.get("unsafe")), who={"uid": peer.uid})

        async def at_transcript(args: dict, peer: Peer) -> Any:
            # "transcript": the same traffic, replayable (simagent/at-transcript/1, redacted as recorded)
            return {"lines": [redact_text(line) for line in self.transcript.lines()], "transcript": self.at_recorder.text()}

        async def bind_show(args: dict, peer: Peer) -> Any:
            return facts.binding_view(self.store, self.config.binding)

        async def bind_accept(args: dict, peer: Peer) -> Any:
            try:
                return await self.accept_token(str(args["token"]), source=f"cli uid {peer.uid}")
            except OffloadError as exc:
                raise ControlError(exc.code, exc.message) from exc

        async def bind_reset(args: dict, peer: Peer) -> Any:
            return await self.reset_binding(str(args["reason"]), peer.uid)

        async def export_evidence(args: dict, peer: Peer) -> Any:
            try:  # the reply line carries the bundle; the client reads up to MAX_REPLY
                output = await self.export_evidence(args.get("since"), max_bytes=MAX_REPLY - 4096)
            except ValueError as exc:
                raise ControlError("bad_request", str(exc)) from exc
            except OffloadError as exc:
                raise ControlError(exc.code, exc.message) from exc
            return StreamedResult(output, output.close)

        return [
            socket_op("status", status),
            socket_op("diag", run_diag),
            socket_op("at", at),
            socket_op("bind_show", bind_show),
            socket_op("at_transcript", at_transcript),
            socket_op("bind_accept", bind_accept),
            socket_op("bind_reset", bind_reset),
            socket_op("export_evidence", export_evidence),
        ]

    # -- platform commands (P/cmd) -------------------------------------------------------------
    async def _verify_command_token(self, token: str, action: str) -> dict[str, Any]:
        """Checks a command's token before the command runs and returns its signed
        claims; the handler then consumes it with them (rebind/unbind apply it in one
        transaction with its `jti`), so the signature is checked once."""
        keys = self._trusted_keys()
        opened = await self._open_token(token, keys)
        tokens.verify_token(token, keys, self._device_id(), self.clock.now(), self.store.read().time_floor(),
                            actions=(action,), opened=opened)
        return opened.payload

    def _consume_command_token(self, command: Command) -> None:
        result = tokens.accept_token(self.store, command.token, self._trusted_keys(), self._device_id(),
                                     source="mqtt", actions=(command.name,), opened=tokens.Opened(payload=command.claims))
        if not result.accepted:
            raise CommandError(result.code or "token_refused", result.message)

    def _platform_handlers(self) -> dict:
        async def ping(command: Command) -> dict:
            return {"pong": True, "ts": self.clock.now().iso()}

        async def status(command: Command) -> dict:
            return await self.status_document()

        async def run_diag(command: Command) -> dict:
            return await self.diagnose()

        async def set_telemetry_interval(command: Command) -> dict:
            self.telemetry_interval = float(command.args["interval"])
            self._telemetry_changed.set()
            return {"interval": self.telemetry_interval}

        async def token_command(command: Command) -> dict:
            result = await self.accept_token(command.token, source="mqtt", actions=(command.name,),
                                             opened=tokens.Opened(payload=command.claims))
            if not result.get("accepted"):
                raise CommandError(result.get("code") or "token_refused", result.get("message") or "token refused")
            return result

        async def export_evidence(command: Command) -> dict:
            try:  # one MQTT reply carries it: bounded (ask with a later `since` past the bound)
                output = await self.export_evidence(command.args.get("since"), max_bytes=MAX_EXPORT_REPLY_BYTES)
                bundle = await output.read_all()
            except ValueError as exc:
                raise CommandError("bad_args", f"export_evidence: {exc}") from exc
            except OffloadError as exc:
                raise CommandError(exc.code, exc.message) from exc
            return json.loads(bundle)

        async def modem_reset(command: Command) -> dict:
            self._consume_command_token(command)
            self._restart_modem_session()
            return {"restarting": True}

        async def at(command: Command) -> dict:
            if command.token:  # a write: the processor verified the token, now it is used up
                self._consume_command_token(command)
            try:
                return await self.run_at(command.args["command"], unsafe=command.token is not None,
                                         who={"command_id": command.id})
            except ControlError as exc:
                raise CommandError(exc.code, exc.message) from exc

        return {
            "ping": ping, "status": status, "diag": run_diag, "set_telemetry_interval": set_telemetry_interval,
            "rebind": token_command, "unbind": token_command, "export_evidence": export_evidence,
            "modem_reset": modem_reset, "at": at,
        }

    def _restart_modem_session(self) -> None:
        """A soft modem reset: the session is closed and opened again, which re-gates the
        radio and re-checks the binding (a hardware reset via +CFUN=1,1 would let the
        module boot with RF on before the agent could gate it)."""
        if self.supervisor is not None:
            self.supervisor.restart("modem")

    # -- SIGHUP ------------------------------------------------------------------------------
    async def reload(self) -> None:
        self.notifier.reloading()
        try:
            new, restart_required = keep_running_values(self.config, config_module.load(self.config_path))
            # A reporting job given up (a file it reads went away) is started again by any reload.
            gave_up = self.supervisor is not None and self.supervisor.gave_up("reporting") is not None
            new_reporter = new.mqtt != self.config.mqtt or gave_up
            if new_reporter:  # checked before the working session is torn down
                check_mqtt_files(new)
        except ConfigError as exc:
            log.error("configuration reload refused, keeping the running one: %s", exc)
            self._record("config_reloaded", {"ok": False, "error": str(exc)})
            self._announce("reload refused: configuration error")
            self.notifier.ready()
            return
        old, self.config = self.config, new
        changed = sorted(s for s in ("device", "modem", "binding", "mqtt", "telemetry", "outbox", "control", "log")
                         if getattr(old, s) != getattr(new, s))
        self._record("config_reloaded", {"ok": True, "changed": changed, "restart_required": restart_required})
        for setting in restart_required:
            log.warning("configuration reload: %s needs a restart; the running value is kept until then", setting)
        logging.getLogger().setLevel(new.log.level.upper())
        if "binding" in changed and self.enforcer is not None:
            self.enforcer.update_policy(self._policy())
        if "telemetry" in changed:
            self.telemetry_interval = new.telemetry.interval
            self._telemetry_changed.set()
        if "modem" in changed:
            self._restart_modem_session()
        if "outbox" in changed:
            self.store.caps = outbox_caps(new.outbox)  # read at each enqueue
        if new_reporter and self.supervisor is not None:
            self.supervisor.restart("reporting")  # the running reporter stops, a new one connects
        log.info("configuration reloaded (%s)", ", ".join(changed) or "no change")
        self.notifier.ready()


def keep_running_values(running: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with each NEEDS_RESTART setting it changes set back to the running value, and
    the names of those settings ("device.state_dir")."""
    kept = []
    for section, key in NEEDS_RESTART:
        value = getattr(running.section(section), key)
        if getattr(new.section(section), key) != value:
            new = dataclasses.replace(new, **{section: dataclasses.replace(new.section(section), **{key: value})})
            kept.append(f"{section}.{key}")
    return new, kept


def outbox_caps(outbox: OutboxConfig) -> Caps:
    return Caps(max_events=outbox.max_events, max_telemetry=outbox.max_telemetry)


def check_mqtt_files(config: Config) -> None:
    """Raises ConfigError when a file `[mqtt]` names (password, CA, client certificate and
    key) cannot be used now: a reporter built on it would fail at each start, and the
    daemon would run without MQTT."""
    for problem in config_module.check_files(config):
        if problem.key.startswith("[mqtt"):
            raise problem
    try:
        connection_credentials(config.mqtt)
    except SettingsError as exc:
        raise ConfigError(config.source, None, str(exc)) from None


def _gather_diag_facts(config: Config) -> dict[str, Any]:
    # diag's checks are imported on the first diag, here in the worker thread: they are not
    # needed to reach READY, and a first import is no work for the event loop.
    from agent.core import checks

    return checks.gather_facts(state_dir=config.device.state_dir, broker=checks.broker_target(config.mqtt))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the daemon (foreground; logs to stderr/journald)")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    return run_daemon(args.config)


def run_daemon(config_path: str | None) -> int:
    """`simagent run`: the daemon on the configuration at `config_path` (None: the
    default), until SIGTERM; the exit code."""
    try:
        cfg = config_module.load(config_path)
    except ConfigError as exc:
        print(f"simagent: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    journal = journal_socket()
    if journal is not None:  # structured fields (`journalctl -o verbose`); journald stamps and ranks each line
        handler = JournalHandler(journal)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.basicConfig(level=cfg.log.level.upper(), handlers=[handler])
    else:
        logging.basicConfig(
            level=cfg.log.level.upper(), stream=sys.stderr,
            # journald adds its own time stamps; a terminal run still wants to see them.
            format="%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    return asyncio.run(Daemon(cfg, config_path=config_path).run())
