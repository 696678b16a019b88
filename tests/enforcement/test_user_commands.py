"""Callers' AT commands through the enforcer: while the gate holds the radio off, no
write that could bring the card onto the network goes out, whoever asks; every accepted
write is evidence, and the radio level is read again after it."""

import pytest

from at_commands.commands import is_harmless_write
from agent.service.enforcer import GateRefused

from .conftest import FOREIGN_ICCID, HOME_IMEI, run, sent

ATTACHING = ["AT+CFUN=1", "AT+CFUN=1,1", "AT+CGATT=1", "AT+COPS=0", "AT+COPS=1,2,\"46000\"", "AT+COPS=4,2,\"46000\"",
             "AT+QPOWD", "ATZ", "AT+CSQ;+CFUN=1", "AT+CFUN=4;+CFUN=1"]
HARMLESS = ["AT+CFUN=4", "AT+CFUN=0", "AT+CGATT=0", "AT+COPS=2", "AT+CREG=2", "AT+CEREG=0", "AT+CMEE=2", "ATE0",
            "AT+CPIN=1234", "AT+QSIMDET=1,0", "AT+CSQ;+CREG=2", "AT+COPS=?"]


@pytest.mark.parametrize("command", ATTACHING)
def test_writes_that_could_attach_are_not_harmless(command):
    assert not is_harmless_write(command)


@pytest.mark.parametrize("command", HARMLESS)
def test_harmless_writes(command):
    assert is_harmless_write(command)


def test_while_held_off_root_cannot_bring_the_card_online(open_terminal):
    async def scenario():
        async with open_terminal(bindings=((FOREIGN_ICCID, HOME_IMEI),), profile="quectel") as t:
            assert t.started.reason == "iccid_mismatch" and t.fake.state()["cfun"] == 4
            for command in ATTACHING:
                with pytest.raises(GateRefused) as refused:
                    await t.enforcer.user_command(command, write=True, who={"uid": 0})
                message = str(refused.value)
                assert "binding gate holds the radio off" in message and "iccid_mismatch" in message
                assert "bind accept" in message and "bind reset" in message
            assert sent(t.fake.transcript, "AT+CFUN=1") == [] and sent(t.fake.transcript, "AT+CGATT=1") == []
            assert "at_write" not in t.types()
            await t.settle()
            assert t.attached_iccids() == set() and t.fake.state()["cfun"] == 4

            response = await t.enforcer.user_command("AT+CREG=2", write=True, who={"uid": 0})
            assert response.final.ok
            written = [e["data"] for e in t.evidence() if e["type"] == "at_write"]
            assert written == [{"uid": 0, "command": "AT+CREG=2", "gate": "denied"}]

    run(scenario())


def test_an_accepted_write_is_evidence_and_the_radio_level_is_read_again(open_terminal):
    async def scenario():
        async with open_terminal(profile="quectel") as t:
            assert t.started.status == "bound" and t.enforcer.state()["radio"]["cfun"] == 1
            reads = len(sent(t.fake.transcript, "AT+CFUN?"))
            await t.enforcer.user_command("AT+CFUN=4", write=True, who={"command_id": "c-1"})
            await t.until(lambda: len(sent(t.fake.transcript, "AT+CFUN?")) > reads, "the radio level read again")
            await t.until(lambda: t.enforcer.state()["radio"]["cfun"] == 4, "the state shows the real level")
            written = [e["data"] for e in t.evidence() if e["type"] == "at_write"]
            assert written == [{"command_id": "c-1", "command": "AT+CFUN=4", "gate": "allowed"}]
            # a query is neither refused nor recorded
            response = await t.enforcer.user_command("AT+CSQ", write=False, who={"uid": 1000})
            assert response.final.ok and len([e for e in t.evidence() if e["type"] == "at_write"]) == 1

    run(scenario())
