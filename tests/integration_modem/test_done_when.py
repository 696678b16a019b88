"""Issue 2 "Done when": `simagent-fakemodem --link PATH --profile NAME` plus
`simagent status --port PATH --json` reports the fake's identity, SIM state,
registration and signal, for every profile (both real processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simagent_lab import fakemodem
from at_commands import profiles
from simagent_lab.pytest_plugin import wait_for

IMEI = "35209900176148" + fakemodem.luhn_check_digit("35209900176148")
ICCID = "89860000A1B2C3D4E5F6"  # hex digits, as Chinese issuers use
IMSI = "460031234567890"


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_status_reports_what_the_fake_modem_is(name, fake_modem_process, tmp_path):
    profile = profiles.get(name)
    fm = fake_modem_process(profile=name, imei=IMEI, iccid=ICCID, imsi=IMSI, register_delay=0.05)
    fm.set(signal=-91)
    assert wait_for(lambda: fm.state()["registration"] == "home")
    (tmp_path / "agent.toml").write_text(
        f'[device]\nstate_dir = "{tmp_path / "state"}"\n[control]\nsocket = "{tmp_path / "control.sock"}"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(tmp_path / "agent.toml"), "status", "--port", fm.port, "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    # Read for this answer: every section live from the modem (issue 13), the port named.
    fresh = {section: s["from"] for section, s in doc.pop("freshness").items()}
    assert fresh == {"modem": "modem", "sim": "modem", "network": "modem", "radio": "modem", "binding": "unknown"}
    assert doc.pop("modem_link") == {"state": "answering", "port": fm.port, "detail": None}
    assert doc == {
        "modem": {"vendor": profile.sample_manufacturer, "model": profile.sample_model, "port": fm.port,
                  "revision": profile.sample_revision, "imei": IMEI, "imei_luhn_ok": True, "profile": name},
        "sim": {"state": "ready", "iccid": ICCID, "imsi": IMSI},
        "network": {"registration": "home", "operator": "CHINA MOBILE", "access_tech": "lte", "signal_dbm": -91,
                    "signal_measure": "rsrp"},
        "radio": {"cfun": 1},
        "binding": None,
    }
