"""The typed modem API the rest of simagent uses.

``Modem`` combines the AT client, the parsers and a vendor ``Profile``. Vendor knowledge
comes from the profile data (its ICCID commands, its URC table, its hot-swap enable
commands); this module does not branch on vendor names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Union

from . import parsers, profiles
from .client import ATClient, CommandError, CommandTimeout, Response
from .commands import is_abortable
from .parsers import Cesq, Csq, ParseError, RegistrationInfo
from .profiles import Profile
from .protocol import FinalResult

log = logging.getLogger(__name__)

# 27.007 SIM states that end the ICCID search at once (no card, card failure).
_NO_CARD_CME = (10, 13)
# Waits between retries of a SIM read answered "SIM busy" (+CME ERROR: 14 or its text),
# as ModemManager retries SIM reads while the card initialises: 5.5 s in all (a card
# can take seconds after +CPIN: READY), then the value is reported unreadable.
SIM_BUSY_BACKOFF: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0)


class SimBusy(CommandError):
    """A SIM read still answered "SIM busy" after every retry: the value is unreadable
    now (not "unsupported": no other command is tried in its place)."""


def is_sim_busy(final: FinalResult) -> bool:
    return final.kind.value == "cme_error" and parsers.sim_state_from_cme(final.code, final.text) == "busy"


NETWORK_TIME_TAGS = ("+CTZEU", "+CTZE", "+CTZV", "+CCLK")


@dataclass(frozen=True)
class Identity:
    vendor: str | None
    model: str | None
    revision: str | None
    imei: str | None
    imei_luhn_ok: bool | None


@dataclass(frozen=True)
class Registration:
    state: str  # ModemManager word (parsers.REGISTRATION_STATES) or "unknown"
    access_tech: str  # gsm, umts, lte, nr5g, unknown
    lac: int | None
    cell_id: int | None


@dataclass(frozen=True)
class Signal:
    dbm: int | None
    measure: str | None  # parsers.SIGNAL_MEASURES: what dbm is
    csq: Csq | None
    cesq: Cesq | None


# -- events delivered to subscribers ------------------------------------------------------

@dataclass(frozen=True)
class SimInserted:
    line: str
    follows_radio: bool = False  # a report the module also prints after its own radio change


@dataclass(frozen=True)
class SimRemoved:
    line: str
    follows_radio: bool = False


@dataclass(frozen=True)
class ModemRebooted:
    line: str


@dataclass(frozen=True)
class RegistrationChanged:
    line: str
    registration: RegistrationInfo


@dataclass(frozen=True)
class NetworkTime:
    line: str
    time: parsers.NetworkTime


ModemEvent = Union[SimInserted, SimRemoved, ModemRebooted, RegistrationChanged, NetworkTime]


_SIM_EVENTS: dict[str, type[SimInserted] | type[SimRemoved]] = {"sim_inserted": SimInserted, "sim_removed": SimRemoved}


class Modem:
    def __init__(self, client: ATClient, profile: Profile | str = "auto", *, command_timeout: float = 5.0,
                 sim_busy_backoff: tuple[float, ...] = SIM_BUSY_BACKOFF):
        self.client = client
        self.sim_busy_backoff = sim_busy_backoff
        self._auto = profile == "auto"
        self.profile: Profile = profiles.GENERIC if self._auto else (
            profile if isinstance(profile, Profile) else profiles.get(profile))
        self.command_timeout = command_timeout
        self._set_urc_rules()

    @classmethod
    async def open(cls, port: str, profile: Profile | str = "auto", *, baudrate: int = 115200,
                   command_timeout: float = 5.0, resync_first: bool = False) -> "Modem":
        """``resync_first``: the port is reopened after a failure; probe before the first
        command (the old session's answers may still arrive)."""
        if isinstance(profile, str) and profile != "auto":
            profiles.get(profile)  # unknown names fail before the port is taken
        client = await ATClient.open(port, baudrate=baudrate, resync_first=resync_first)
        return cls(client, profile, command_timeout=command_timeout)

    def close(self) -> None:
        self.client.close()

    # -- commands -----------------------------------------------------------------------

    async def _cmd(self, command: str, timeout: float | None = None, *, priority: bool = False) -> Response:
        return await self.client.command(command, timeout or self.command_timeout, priority=priority)

    async def send_line(self, line: str, timeout: float, *, priority: bool = False) -> Response:
        """One raw command line (the console, ``simagent at``): any final result is
        returned, not raised; a line V.250 lets the DTE abort is sent abortable."""
        return await self.client.command(line, timeout, check=False, priority=priority,
                                         abortable=is_abortable(line))

    async def _sim_read(self, command: str) -> Response:
        """A SIM read: its response whatever the final result, with "SIM busy" retried
        after each wait of ``sim_busy_backoff``. Raises ``CommandTimeout``, or ``SimBusy``
        when the card stayed busy. The one place SIM reads retry."""
        for wait in (*self.sim_busy_backoff, None):
            response = await self.client.command(command, self.command_timeout, check=False)
            if not is_sim_busy(response.final):
                return response
            if wait is None:
                raise SimBusy(command, response)
            log.debug("%s: SIM busy, retrying in %gs", command, wait)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _try(self, command: str, timeout: float | None = None) -> Response | None:
        """A command whose failure (error or timeout) is an answer, not an exception."""
        try:
            return await self._cmd(command, timeout)
        except (CommandError, CommandTimeout) as exc:
            log.debug("%s failed: %s", command, exc)
            return None

    async def initialise(self) -> Profile:
        """Sets the module up for the agent's session: echo off, numeric errors, the
        profile (`identify`), registration and time-zone URCs, the profile's hot-swap
        reports. These are writes, some kept in the module's NV (Quectel ``AT+QSIMDET``):
        only the daemon initialises; a read-only caller calls `identify`."""
        await self._try("ATE0")
        await self._try("AT+CMEE=1")
        await self.identify()
        for command in ("AT+CREG=2", "AT+CGREG=2", "AT+CEREG=2", "AT+CTZR=2"):
            await self._try(command)
        for command in self.profile.hotswap_enable:
            await self._try(command if command.upper().startswith("AT") else "AT" + command)
        return self.profile

    async def identify(self) -> Profile:
        """The profile, detected from ``AT+CGMI`` / ``ATI`` when it was "auto": queries
        only, so every read (`snapshot`) works without changing a setting."""
        if self._auto:
            self.profile = await self._detect_profile()
            self._set_urc_rules()
        return self.profile

    @contextlib.asynccontextmanager
    async def numeric_errors(self) -> AsyncIterator[None]:
        """Numeric errors (``+CME ERROR: 14``, SIM busy; ``10``, no SIM) for a read-only
        caller's reads, the module left as found: ``AT+CMEE`` is a per-port session
        setting that is not saved (27.007 §9.1; V.250 stores only with ``&W``), so
        turning it on and back is not a change of the module's settings, where without it
        a busy or missing card is a bare ``ERROR`` that no retry rule can tell apart."""
        response = await self._try("AT+CMEE?")
        found = None
        if response is not None:
            match = re.search(r"\+CMEE:\s*([0-9])", "\n".join(response.lines))
            found = match and match.group(1)
        switched = found == "0" and await self._try("AT+CMEE=1") is not None
        try:
            yield
        finally:
            if switched:
                await self._try("AT+CMEE=0")

    async def _detect_profile(self) -> Profile:
        for command in ("AT+CGMI", "ATI"):
            response = await self._try(command)
            if response is None:
                continue
            text = "\n".join(response.lines)
            profile = profiles.detect(text)
            if profile is not profiles.GENERIC:
                log.info("modem profile %s (from %s: %r)", profile.name, command, text)
                return profile
        return profiles.GENERIC

    async def read_identity(self) -> Identity:
        ati: parsers.AtiInfo | None = None

        async def info(command: str, tag: str, field: str) -> str | None:
            nonlocal ati
            response = await self._try(command)
            if response is not None:
                try:
                    return parsers.parse_info_value(response.lines, tag)
                except ParseError:
                    pass
            if ati is None:
                ati_response = await self._try("ATI")
                ati = parsers.parse_ati(ati_response.lines if ati_response else [])
            return getattr(ati, field)

        vendor = await info("AT+CGMI", "+CGMI", "manufacturer")
        model = await info("AT+CGMM", "+CGMM", "model")
        revision = await info("AT+CGMR", "+CGMR", "revision")
        imei = None
        for command in ("AT+CGSN", "AT+GSN"):
            response = await self._try(command)
            if response is None:
                continue
            try:
                imei = parsers.parse_imei(response.lines)
                break
            except ParseError as exc:
                log.warning("%s: %s", command, exc)
        if imei is not None and not imei.luhn_ok:
            log.warning("IMEI %s fails the Luhn check", imei.imei)
        return Identity(vendor, model, revision, imei.imei if imei else None, imei.luhn_ok if imei else None)

    async def read_sim_state(self) -> str:
        try:
            response = await self._sim_read("AT+CPIN?")
        except (CommandTimeout, SimBusy):
            return "unknown"
        final = response.final
        if final.ok:
            try:
                return parsers.parse_cpin(response.lines).state
            except ParseError:
                return "unknown"
        if final.kind.value == "cme_error":
            state = parsers.sim_state_from_cme(final.code, final.text)
            return "unknown" if state == "busy" else state
        return "unknown"

    async def read_iccid(self) -> str | None:
        """The profile's ICCID commands in order (the vendor's, then +CRSM). A command
        that fails or times out is taken as unsupported (the next one is tried); "SIM
        busy" is retried and, if it persists, the ICCID is unreadable (None) without
        trying other commands; no card (CME 10/13) ends the search."""
        for command, tag in self.profile.iccid_commands:
            try:
                response = await self._sim_read(command)
            except SimBusy:
                return None
            except CommandTimeout:
                continue
            final = response.final
            if not final.ok:
                if final.kind.value == "cme_error" and final.code in _NO_CARD_CME:
                    return None
                continue
            try:
                if tag == profiles.CRSM_TAG:
                    return parsers.parse_crsm_iccid(response.lines)
                return parsers.parse_iccid(response.lines, tag)
            except ParseError as exc:
                log.warning("%s: %s", command, exc)
        return None

    async def read_imsi(self) -> str | None:
        try:
            response = await self._sim_read("AT+CIMI")
        except (SimBusy, CommandTimeout):
            return None
        if not response.final.ok:
            return None
        try:
            return parsers.parse_imsi(response.lines)
        except ParseError as exc:
            log.warning("AT+CIMI: %s", exc)
            return None

    async def read_registration(self) -> Registration:
        """The best of +C5GREG/+CEREG/+CGREG/+CREG: a registered domain wins, newer
        radio technologies first."""
        best: RegistrationInfo | None = None
        for tag in ("+C5GREG", "+CEREG", "+CGREG", "+CREG"):
            response = await self._try(f"AT{tag}?")
            if response is None:
                continue
            try:
                info = parsers.parse_registration_response(response.lines, tag)
            except ParseError:
                continue
            if best is None or (info.registered and not best.registered):
                best = info
        if best is None:
            return Registration("unknown", "unknown", None, None)
        tech = best.access_tech
        if tech == "unknown" and best.registered:
            # A registered EPS/5GS domain says the technology even without <AcT>.
            tech = {"+CEREG": "lte", "+C5GREG": "nr5g"}.get(best.tag, "unknown")
        return Registration(best.state, tech, best.lac, best.cell_id)

    async def read_operator(self) -> str | None:
        response = await self._try("AT+COPS?")
        if response is None:
            return None
        try:
            return parsers.parse_cops(response.lines).name
        except ParseError:
            return None

    async def read_signal(self) -> Signal:
        csq = cesq = None
        response = await self._try("AT+CSQ")
        if response is not None:
            try:
                csq = parsers.parse_csq(response.lines)
            except ParseError:
                pass
        response = await self._try("AT+CESQ")
        if response is not None:
            try:
                cesq = parsers.parse_cesq(response.lines)
            except ParseError:
                pass
        dbm, measure = parsers.signal_reading(csq, cesq)
        return Signal(dbm, measure, csq, cesq)

    async def get_cfun(self, *, priority: bool = False, timeout: float | None = None) -> int:
        return parsers.parse_cfun((await self._cmd("AT+CFUN?", timeout, priority=priority)).lines)

    async def set_cfun(self, fun: int, *, priority: bool = False, timeout: float | None = None) -> None:
        """``priority``: the radio gate's command (goes first, aborts an abortable scan)."""
        if fun == 0:
            # CFUN=0 powers the SIM down on many modules and fakes a removal; gating
            # uses 4 (RF off, SIM readable).
            raise ValueError("CFUN=0 is never used: use 4 to switch the radio off")
        if fun not in (1, 4):
            raise ValueError(f"unsupported CFUN level {fun} (1 = on, 4 = radio off)")
        await self._cmd(f"AT+CFUN={fun}", timeout or max(self.command_timeout, 15.0), priority=priority)

    async def detach(self, *, priority: bool = False, timeout: float | None = None) -> None:
        await self._cmd("AT+CGATT=0", timeout or max(self.command_timeout, 15.0), priority=priority)

    # -- URCs -> events -------------------------------------------------------------------

    def _set_urc_rules(self) -> None:
        self._urc_table = tuple((re.compile(rule.pattern, re.IGNORECASE), rule)
                                for rule in profiles.urc_rules_for(self.profile))

    def event_for(self, line: str) -> ModemEvent | None:
        """The typed event a URC line means (the profile's URC table first), or None."""
        text = line.strip()
        for pattern, rule in self._urc_table:
            if pattern.search(text):
                if rule.kind == "boot":
                    return ModemRebooted(text)
                return _SIM_EVENTS[rule.kind](text, rule.follows_radio)
        upper = text.upper()
        try:
            if upper.startswith(parsers.REGISTRATION_TAGS):
                return RegistrationChanged(text, parsers.parse_registration(text))
            if upper.startswith(NETWORK_TIME_TAGS):
                return NetworkTime(text, parsers.parse_network_time(text))
        except ParseError as exc:
            log.debug("unparsable URC %r: %s", text, exc)
        return None

    def subscribe(self, callback: Callable[[ModemEvent], None]) -> Callable[[], None]:
        def on_urc(line: str) -> None:
            event = self.event_for(line)
            if event is not None:
                callback(event)

        return self.client.subscribe_urcs(on_urc)

    # -- status -----------------------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """What ``simagent status --json`` shows for the modem (SPEC §8 keys)."""
        identity = await self.read_identity()
        sim_state = await self.read_sim_state()
        iccid = await self.read_iccid() if sim_state in ("ready", "locked") else None
        imsi = await self.read_imsi() if sim_state == "ready" else None
        network = await self.network_snapshot()
        try:
            cfun: int | None = await self.get_cfun()
        except (CommandError, CommandTimeout, ParseError):
            cfun = None
        return {
            "modem": {"vendor": identity.vendor, "model": identity.model, "revision": identity.revision,
                      "imei": identity.imei, "imei_luhn_ok": identity.imei_luhn_ok},
            "sim": {"state": sim_state, "iccid": iccid, "imsi": imsi},
            "network": network,
            "radio": {"cfun": cfun},
        }

    async def network_snapshot(self) -> dict[str, Any]:
        """The network part of ``snapshot`` alone: registration, operator, signal. No SIM
        command, so no answer that looks like a SIM-change report (the daemon, whose
        gate knows the card, reads only this live)."""
        registration = await self.read_registration()
        operator = await self.read_operator()
        signal = await self.read_signal()
        return {"registration": registration.state, "operator": operator, "access_tech": registration.access_tech,
                "signal_dbm": signal.dbm, "signal_measure": signal.measure}
