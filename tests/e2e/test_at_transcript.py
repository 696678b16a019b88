"""The daemon keeps its newest AT traffic, and `simagent diag --bundle` carries it as a
replayable transcript while the daemon holds the port (issue 14, item 4)."""

from __future__ import annotations

import json
import tarfile

from at_commands import transcript
from simagent_lab.pytest_plugin import wait_for
from simagent_lab.replay import ReplayState

from .conftest import HOME_ICCID, IMEI


def test_the_diag_bundle_carries_the_daemons_at_traffic(fake_modem_process, agent_process, tmp_path):
    modem = fake_modem_process(profile="quectel", imei=IMEI, iccid=HOME_ICCID, register_delay=0.0)
    agent = agent_process(modem, None)
    # Before READY=1 a `status` may find no control socket yet and read the port itself,
    # holding it while the daemon opens it: the daemon then waits for the modem.
    agent.wait_ready()

    def sim_read():
        done = agent.cli("status", "--json")
        return done.returncode == 0 and json.loads(done.stdout)["sim"]["iccid"] == HOME_ICCID

    assert wait_for(sim_read, timeout=20, interval=0.2), agent.log
    agent.cli("at", "AT+CNUM", check=True)
    bundle = tmp_path / "support.tar.gz"
    agent.cli("diag", "--bundle", str(bundle))
    with tarfile.open(bundle) as tar:
        member = tar.extractfile("simagent-support/at-transcript.jsonl")
        assert member is not None
        recorded = transcript.parse(member.read().decode())
    assert recorded.header["tool"] == "simagent run"
    commands = [e.command for e in recorded.exchanges]
    assert "AT+CNUM" in commands  # the technician's command went through the daemon's client
    replay = ReplayState(recorded)
    assert f"+QCCID: {HOME_ICCID}".encode() in b"".join(replay.handle_line("AT+QCCID"))
    assert IMEI.encode() in b"".join(replay.handle_line("AT+CGSN"))
