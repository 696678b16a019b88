"""The typed Modem API over a real pty with a scripted responder and a test profile."""

from __future__ import annotations

import asyncio

import pytest

from at_commands import profiles
from at_commands.commands import is_imei_rewrite
from at_commands.modem import (Modem, ModemRebooted, RegistrationChanged, SimInserted, SimRemoved,
                               NetworkTime)
from at_commands.profiles import Profile

ACME = Profile(
    name="acme",
    vendor_patterns=(r"ACME",),
    iccid_command="AT+ACCID",
    iccid_tag="+ACCID:",
    hotswap_enable=("AT+ASIMDET=1",),
    sim_inserted_urcs=(r"^\+ASIM: 1$",),
    sim_removed_urcs=(r"^\+ASIM: 0$",),
    boot_urcs=(r"^RDY$",),
    imei_rewrite_commands=(r"^AT\+EGMR\s*=\s*1\s*,\s*7",),
)


@pytest.fixture
def acme(monkeypatch):
    monkeypatch.setitem(profiles.PROFILES, "acme", ACME)
    return ACME


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def modem_handler(replies, overrides=None):
    ok = replies.ok
    table = {
        "AT+CGMI": ok("ACME Wireless"), "AT+CGMM": ok("AX100"), "AT+CGMR": ok("AX100R01"),
        "AT+CGSN": ok("490154203237518"), "AT+CPIN?": ok("+CPIN: READY"),
        "AT+ACCID": ok("+ACCID: 89860318640220133897"), "AT+CIMI": ok("460001234567890"),
        "AT+CEREG?": ok('+CEREG: 2,1,"1A2B","01A2D001",7'), "AT+CREG?": ok("+CREG: 2,0"),
        "AT+CGREG?": ok("+CGREG: 2,0"), "AT+COPS?": ok('+COPS: 0,0,"CHINA MOBILE",7'),
        "AT+CSQ": ok("+CSQ: 20,99"), "AT+CESQ": ok("+CESQ: 99,99,255,255,26,50"),
        "AT+CFUN?": ok("+CFUN: 1"), "AT+CFUN=4": ok(), "AT+CGATT=0": ok(),
        "AT+CRSM=176,12258,0,0,10": ok('+CRSM: 144,0,"98683081462002313398"'),
    }
    table.update(overrides or {})

    def handler(command):
        return table.get(command.upper(), replies.canned(command))

    return handler


def test_initialise_detects_profile_and_snapshot(pty_responder, replies, acme):
    responder = pty_responder(modem_handler(replies), echo=True)

    async def main():
        modem = await Modem.open(responder.path)
        try:
            assert (await modem.initialise()).name == "acme"
            assert modem.profile is acme
            return await modem.snapshot()
        finally:
            modem.close()

    snap = run(main())
    assert snap == {
        "modem": {"vendor": "ACME Wireless", "model": "AX100", "revision": "AX100R01",
                  "imei": "490154203237518", "imei_luhn_ok": True},
        "sim": {"state": "ready", "iccid": "89860318640220133897", "imsi": "460001234567890"},
        "network": {"registration": "home", "operator": "CHINA MOBILE", "access_tech": "lte",
                    "signal_dbm": -91, "signal_measure": "rsrp"},  # +CESQ's RSRP, not +CSQ's -73 dBm RSSI
        "radio": {"cfun": 1},
    }
    assert responder.received[:2] == ["ATE0", "AT+CMEE=1"]
    assert "AT+ASIMDET=1" in responder.received and "AT+CEREG=2" in responder.received


def test_generic_profile_falls_back_to_crsm_for_iccid(pty_responder, replies):
    responder = pty_responder(modem_handler(replies, {"AT+CGMI": replies.ok("Nobody Inc")}))

    async def main():
        modem = await Modem.open(responder.path)
        try:
            await modem.initialise()
            assert modem.profile.name == "generic"
            return await modem.read_iccid()
        finally:
            modem.close()

    assert run(main()) == "89860318640220133389"
    assert responder.received[-1] == "AT+CRSM=176,12258,0,0,10"


def test_sim_busy_is_retried_and_absent_is_reported(pty_responder, replies):
    answers = iter([b"\r\n+CME ERROR: 14\r\n", b"\r\n+CME ERROR: 14\r\n", replies.ok("+CPIN: READY"),
                    b"\r\n+CME ERROR: 10\r\n", b"\r\n+CME ERROR: SIM failure\r\n"])
    responder = pty_responder(lambda c: next(answers) if c == "AT+CPIN?" else replies.canned(c))

    async def main():
        modem = await Modem.open(responder.path)
        modem.sim_busy_backoff = (0.01,) * 5
        try:
            assert await modem.read_sim_state() == "ready"
            assert await modem.read_sim_state() == "absent"
            assert await modem.read_sim_state() == "error"
            # No SIM: the ICCID search stops at the first CME 10.
            assert await modem.read_iccid() is None
        finally:
            modem.close()

    run(main())
    assert responder.received.count("AT+CPIN?") == 5


def test_urcs_become_typed_events(pty_responder, replies, acme):
    responder = pty_responder(modem_handler(replies))

    async def main():
        modem = await Modem.open(responder.path, "acme")
        events = []
        modem.subscribe(events.append)
        try:
            responder.write(b"\r\n+ASIM: 0\r\n\r\n+CPIN: NOT READY\r\n\r\n+ASIM: 1\r\n\r\nRDY\r\n"
                            b'\r\n+CEREG: 5,"1A2B","01A2D001",7\r\n\r\n+CTZE: "+32",0,"2024/01/02,03:04:05"\r\n'
                            b"\r\n+QWHATEVER: 1\r\n")
            for _ in range(200):
                if len(events) >= 6:
                    break
                await asyncio.sleep(0.01)
            return events
        finally:
            modem.close()

    events = run(main())
    assert [type(e) for e in events] == [SimRemoved, SimRemoved, SimInserted, ModemRebooted,
                                         RegistrationChanged, NetworkTime]
    assert events[4].registration.state == "roaming"
    assert events[5].time.utc_offset_minutes == 480


def test_radio_control_and_imei_guard(pty_responder, replies, acme):
    responder = pty_responder(modem_handler(replies))

    async def main():
        modem = await Modem.open(responder.path, "acme")
        try:
            with pytest.raises(ValueError):
                await modem.set_cfun(0)
            await modem.set_cfun(4)
            await modem.detach()
            assert await modem.get_cfun() == 1
            assert is_imei_rewrite("AT+EGMR=1,7,\"490154203237518\"")
            assert not is_imei_rewrite("AT+EGMR=0,7")
        finally:
            modem.close()

    run(main())
    assert "AT+CFUN=0" not in responder.received
    assert responder.received[-3:] == ["AT+CFUN=4", "AT+CGATT=0", "AT+CFUN?"]


def test_unknown_profile_name_fails_before_opening(tmp_path):
    with pytest.raises(KeyError):
        run(Modem.open(str(tmp_path / "nope"), "no-such-vendor"))


@pytest.mark.fake_modem(profile="quectel", register_delay=0.0)
def test_a_signal_below_the_csq_floor_is_read_from_cesq(fake_modem):
    fake_modem.set(signal=-120)

    async def main():
        modem = await Modem.open(fake_modem.port)
        try:
            await modem.identify()
            return await modem.read_signal()
        finally:
            modem.close()

    signal = run(main())
    assert signal.csq.dbm == -113  # +CSQ's floor
    assert (signal.dbm, signal.measure) == (-120, "rsrp")
