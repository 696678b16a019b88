"""ATClient and Modem against the fake modem on a real pty, for every profile, and the
faults a field modem shows (issue 2 item 8), driven through the fake's control ops."""

from __future__ import annotations

import asyncio
import time

import pytest

from simagent_lab import fakemodem
from at_commands import profiles
from at_commands.client import ATClient, CommandError, CommandTimeout, PortLost
from at_commands.modem import Modem, ModemRebooted
from at_commands.profiles import CRSM_READ_ICCID

IMEI = "35209900176148" + fakemodem.luhn_check_digit("35209900176148")
ICCID = "89860000A1B2C3D4E5F6"
IMSI = "460031234567890"


async def settled(modem: Modem, timeout: float = 5.0):
    """The registration once the fake has finished searching."""
    deadline = time.monotonic() + timeout
    while True:
        registration = await modem.read_registration()
        if registration.state != "searching" or time.monotonic() > deadline:
            return registration
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_identity_sim_registration_and_signal_for_every_profile(name, fake_modem_factory):
    profile = profiles.get(name)
    fm = fake_modem_factory(profile=name, imei=IMEI, iccid=ICCID, imsi=IMSI, register_delay=0.05)
    fm.set(signal=-97)

    async def scenario():
        modem = await Modem.open(fm.port)
        try:
            assert (await modem.initialise()).name == name  # detected from +CGMI
            identity = await modem.read_identity()
            assert (identity.vendor, identity.model, identity.revision) == (
                profile.sample_manufacturer, profile.sample_model, profile.sample_revision)
            assert (identity.imei, identity.imei_luhn_ok) == (IMEI, True)
            assert await modem.read_sim_state() == "ready"
            assert await modem.read_iccid() == ICCID
            assert await modem.read_imsi() == IMSI
            registration = await settled(modem)
            assert (registration.state, registration.access_tech) == ("home", "lte")
            assert (await modem.read_signal()).dbm == -97
        finally:
            modem.close()

    asyncio.run(scenario())
    commands = fm.state()["commands"]
    first, _tag = profile.iccid_commands[0]  # the vendor's own command (generic: +CRSM) answered
    assert commands[first] == 1
    assert not any(commands.get(c) for c in EVERY_ICCID_COMMAND - {first})


EVERY_ICCID_COMMAND = {c for p in profiles.PROFILES.values() for c, _tag in p.iccid_commands}


@pytest.mark.parametrize("name", ["generic", "quectel"])
def test_iccid_falls_back_to_crsm_only_after_the_profiles_own_commands(fake_modem_factory, name):
    """A generic module is asked +CRSM and nothing else (it was sent every vendor's ICCID
    command first); a vendor's module whose own command fails is asked +CRSM next."""
    fm = fake_modem_factory(profile=name)

    async def scenario():
        modem = await Modem.open(fm.port, name)
        try:
            await modem.initialise()
            if len(modem.profile.iccid_commands) > 1:
                fm.fault("error")  # the vendor's own command fails
            return await modem.read_iccid()
        finally:
            modem.close()

    fm.sim_insert(ICCID)
    assert asyncio.run(scenario()) == ICCID  # the nibble-swapped EF_ICCID, hex digits kept
    commands = fm.state()["commands"]
    assert commands[CRSM_READ_ICCID] == 1
    assert not any(commands.get(c) for c in EVERY_ICCID_COMMAND - {c for c, _ in profiles.get(name).iccid_commands})


@pytest.mark.fake_modem(no_sim=True)
def test_cmee_modes_and_absent_sim(fake_modem):
    async def scenario():
        client = await ATClient.open(fake_modem.port)
        modem = Modem(client, "generic")
        seen = {}
        try:
            for mode in (0, 1, 2):
                await client.command(f"AT+CMEE={mode}")
                with pytest.raises(CommandError) as failed:
                    await client.command("AT+CIMI")
                seen[mode] = (failed.value.final.kind.value, failed.value.cme, await modem.read_sim_state(),
                              await modem.read_iccid())
        finally:
            client.close()
        return seen

    assert asyncio.run(scenario()) == {
        0: ("error", None, "unknown", None),  # plain ERROR cannot say why
        1: ("cme_error", (10, "10"), "absent", None),
        2: ("cme_error", (None, "SIM not inserted"), "absent", None),
    }


def test_echo_on_and_off(fake_modem):
    async def scenario():
        client = await ATClient.open(fake_modem.port)
        try:
            assert fake_modem.state()["echo"] is True
            assert (await client.command("AT+CGSN")).lines == [fake_modem.state()["imei"]]
            await client.command("ATE0")
            assert fake_modem.state()["echo"] is False
            assert (await client.command("AT+CIMI")).lines == [fake_modem.state()["imsi"]]
            await client.command("ATE1")
            assert (await client.command("AT+CSQ")).lines == ["+CSQ: 14,99"]
        finally:
            client.close()

    asyncio.run(scenario())
    assert any(e["dir"] == "out" and e["line"] == "AT+CGSN" for e in fake_modem.transcript)  # it did echo


@pytest.mark.parametrize("kind", ["late-reply", "delay"])
def test_timeout_then_late_reply_never_reaches_the_next_command(fake_modem, kind):
    async def scenario():
        client = await ATClient.open(fake_modem.port)
        try:
            await client.command("ATE0")
            fake_modem.fault(kind, seconds=0.6)
            with pytest.raises(CommandTimeout):
                await client.command("AT+CIMI", timeout=0.2)
            if kind == "delay":
                await asyncio.sleep(0.6)  # the stale answer arrives between commands
            assert (await client.command("AT+CGSN")).lines == [fake_modem.state()["imei"]]
            assert (await client.command("AT+CIMI")).lines == [fake_modem.state()["imsi"]]
        finally:
            client.close()

    asyncio.run(scenario())


def test_unplug_mid_command_then_replug(fake_modem):
    async def scenario():
        client = await ATClient.open(fake_modem.port)
        try:
            fake_modem.fault("delay", seconds=10)
            pending = asyncio.ensure_future(client.command("AT+CGSN", timeout=20))
            await asyncio.sleep(0.2)
            await asyncio.to_thread(fake_modem.unplug)
            started = time.monotonic()
            with pytest.raises(PortLost):
                await asyncio.wait_for(pending, 5)
            assert time.monotonic() - started < 5
            with pytest.raises(PortLost):
                await client.command("AT")
        finally:
            client.close()
        await asyncio.to_thread(fake_modem.replug)
        again = await Modem.open(fake_modem.port)
        try:
            await again.initialise()
            return (await again.read_identity()).imei
        finally:
            again.close()

    assert asyncio.run(scenario()) == fake_modem.state()["imei"]


def test_garbage_on_the_line(fake_modem):
    async def scenario():
        modem = await Modem.open(fake_modem.port)
        try:
            await modem.initialise()
            fake_modem.fault("garbage", count=2)
            imsi = await modem.read_imsi()
            imei = (await modem.read_identity()).imei
            return imsi, imei, await modem.read_sim_state()
        finally:
            modem.close()

    state = fake_modem.state()
    assert asyncio.run(scenario()) == (state["imsi"], state["imei"], "ready")


@pytest.mark.parametrize("name", sorted(n for n, p in profiles.PROFILES.items() if p.boot_lines))
def test_reboot_urc_becomes_modem_rebooted(name, fake_modem_factory):
    fm = fake_modem_factory(profile=name)

    async def scenario():
        modem = await Modem.open(fm.port)
        events = []
        try:
            await modem.initialise()
            modem.subscribe(events.append)
            await asyncio.to_thread(fm.reboot)
            deadline = time.monotonic() + 5
            while not any(isinstance(e, ModemRebooted) for e in events) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await modem.initialise()  # what the daemon does next: echo is back on after boot
            return events, (await modem.read_identity()).imei
        finally:
            modem.close()

    events, imei = asyncio.run(scenario())
    assert [e.line for e in events if isinstance(e, ModemRebooted)][:1] == [profiles.get(name).boot_lines[0]]
    assert imei == fm.state()["imei"] and fm.state()["counters"]["reboots"] == 1


class SimInitialising(fakemodem.FakeModemState):
    """A card still initialising: +CPIN? answers CME 14 (SIM busy) `busy_answers` times.
    (The fake has no control op for this yet.)"""

    busy_answers = 0

    def _one(self, command: str) -> list[str]:
        if command.strip().upper() == "+CPIN?" and self.busy_answers:
            self.busy_answers -= 1
            raise fakemodem.CommandError(14)
        return super()._one(command)


@pytest.mark.parametrize("busy, expected", [(2, "ready"), (9, "unknown")])
def test_sim_busy_is_retried(tmp_path, busy, expected):
    state = SimInitialising()
    state.busy_answers = busy
    fm = fakemodem.FakeModem(tmp_path / "busy", state).start()

    async def scenario():
        modem = await Modem.open(str(fm.link))
        modem.sim_busy_backoff = (0.02, 0.02, 0.02)
        try:
            await modem.initialise()
            return await modem.read_sim_state()
        finally:
            modem.close()

    try:
        assert asyncio.run(scenario()) == expected
        assert state.commands["AT+CPIN?"] == min(busy + 1, 4)
        assert any(e["line"] == "+CME ERROR: 14" for e in fm.transcript.entries)
    finally:
        fm.stop()
