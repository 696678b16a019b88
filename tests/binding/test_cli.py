"""The bind/evidence commands as a technician runs them: a real process, a real state dir."""

import json
import os
import resource
import sqlite3
import subprocess
import sys

import pytest

from agent.core.binding import BindingPolicy, Observation, evaluate
from agent.core.evidence import device_public_key_b64, load_or_create_device_key
from agent.core.store import Store

IMEI = "490154203237518"
ICCID = "89860012345678901234"
OTHER_ICCID = "89860098765432109876"


def simagent(*args, stdin=None, bounded=False):
    """`bounded`: in 512 MiB of address space and 20 s, as a reader of hostile files must be."""
    env = {k: v for k, v in os.environ.items() if k != "SIMAGENT_CONFIG"}
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (2**29, 2**29))) if bounded else None
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, env=env, timeout=20 if bounded else 60,
        input=stdin, cwd="/", preexec_fn=limit,
    )


@pytest.fixture
def state(tmp_path, make_clock):
    """A state dir where the terminal was bound and then saw a foreign card."""
    directory = tmp_path / "state"
    store = Store.open(directory, clock=make_clock())
    evaluate(store, Observation(IMEI, "ready", ICCID), BindingPolicy())
    evaluate(store, Observation(IMEI, "ready", OTHER_ICCID), BindingPolicy())
    store.close()
    load_or_create_device_key(directory)  # as the daemon does on its first start
    return directory


def evidence(directory):
    store = Store.open(directory)
    try:
        return [e for e, _ in store.evidence_entries()]
    finally:
        store.close()


def test_bind_show_reports_bindings_and_exits_1_on_violation(state):
    result = simagent("bind", "show", "--json", "--state-dir", str(state))
    assert result.returncode == 1, result.stderr
    view = json.loads(result.stdout)
    assert view["bindings"][0]["iccid"] == ICCID and view["imei"] == IMEI
    assert view["last_decision"]["reason"] == "iccid_mismatch"
    text = simagent("bind", "show", "--state-dir", str(state))
    assert "iccid_mismatch" in text.stdout and ICCID in text.stdout


def test_bind_show_ok_exits_0(tmp_path):
    store = Store.open(tmp_path)
    evaluate(store, Observation(IMEI, "ready", ICCID), BindingPolicy())
    store.close()
    assert simagent("bind", "show", "--state-dir", str(tmp_path)).returncode == 0


def test_bind_accept_refusal_exits_1_and_is_recorded(state):
    before = evidence(state)
    result = simagent("bind", "accept", "-", "--state-dir", str(state), stdin="not-a-token\n")
    assert result.returncode == 1
    assert "refused (malformed)" in result.stderr
    after = evidence(state)
    assert after[:-1] == before and after[-1]["type"] == "token_refused"


def test_bind_reset_as_root_is_audited(state):
    result = simagent("bind", "reset", "--reason", "RMA 42: modem replaced", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    last = evidence(state)[-1]
    assert last["type"] == "unbound" and last["data"]["reason"] == "RMA 42: modem replaced" and last["data"]["uid"] == 0
    assert json.loads(simagent("bind", "show", "--json", "--state-dir", str(state)).stdout)["bindings"] == []


# The interpreter lives where an unprivileged user may not read it, so the child imports
# everything as root and then drops its effective uid before the command runs.
AS_NOBODY = """
import os, sys
from agent.cli import main
from agent.cli.parsing import build_parser
build_parser()
os.seteuid(65534)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_bind_reset_refused_for_non_root(state):
    before = evidence(state)
    result = subprocess.run([sys.executable, "-c", AS_NOBODY, "bind", "reset", "--reason", "x", "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "needs root" in result.stderr
    assert evidence(state) == before


def test_bind_reset_needs_a_reason(state):
    assert simagent("bind", "reset", "--state-dir", str(state)).returncode == 2
    assert simagent("bind", "reset", "--reason", " ", "--state-dir", str(state)).returncode == 2


def test_evidence_export_then_verify(state, tmp_path):
    out = tmp_path / "bundle.json"
    assert simagent("evidence", "export", "--out", str(out), "--state-dir", str(state)).returncode == 0
    pub = device_public_key_b64(load_or_create_device_key(state))
    ok = simagent("evidence", "verify", str(out), "--pubkey", pub)
    assert ok.returncode == 0 and ok.stdout.startswith("OK: 2 entries")
    key_file = tmp_path / "device.pub"
    key_file.write_text(pub)
    assert simagent("evidence", "verify", str(out), "--pubkey", str(key_file)).returncode == 0

    bundle = json.loads(out.read_text())
    bundle["entries"][0]["data"]["iccid"] = OTHER_ICCID
    out.write_text(json.dumps(bundle))
    broken = simagent("evidence", "verify", str(out), "--pubkey", pub)
    assert broken.returncode == 1 and "BROKEN at entry 1" in broken.stdout


def test_evidence_export_to_stdout_with_since(state):
    result = simagent("evidence", "export", "--since", "2", "--state-dir", str(state))
    assert result.returncode == 0
    bundle = json.loads(result.stdout)
    assert [e["seq"] for e in bundle["entries"]] == [2] and bundle["device_id"] == IMEI


def test_evidence_export_is_a_read(state, tmp_path):
    """Without a daemon the export reads the store read-only: a state directory without a
    device key gets an error, not a new key; a missing database is not created."""
    (state / "device_key.pem").unlink()
    before = sorted(p.name for p in state.iterdir())
    result = simagent("evidence", "export", "--state-dir", str(state))
    assert result.returncode == 1 and "no device key" in result.stderr and not result.stdout
    assert sorted(p.name for p in state.iterdir()) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    load_or_create_device_key(empty)
    result = simagent("evidence", "export", "--state-dir", str(empty))
    assert result.returncode == 1 and "no state database" in result.stderr
    assert not (empty / "state.db").exists()


def test_evidence_usage_errors(state, tmp_path):
    assert simagent("evidence", "export", "--since", "last tuesday", "--state-dir", str(state)).returncode == 2
    assert simagent("evidence", "verify", str(tmp_path / "missing.json")).returncode == 2
    (tmp_path / "junk.json").write_text("{not json")
    assert simagent("evidence", "verify", str(tmp_path / "junk.json")).returncode == 1
    (tmp_path / "b.json").write_text("{}")
    assert simagent("evidence", "verify", str(tmp_path / "b.json"), "--pubkey", "AAAA").returncode == 2


@pytest.mark.parametrize("damage", ["garbage", "emptied", "deleted", "rolled back"])
def test_bind_show_on_damaged_state_says_so_and_changes_nothing(state, tmp_path, damage):
    db = state / "state.db"
    if damage == "garbage":
        db.write_bytes(b"not a database" * 500)
    elif damage == "emptied":
        db.write_bytes(b"")
    elif damage == "deleted":
        db.unlink()
    else:
        import shutil

        shutil.copy(db, tmp_path / "old.db")
        store = Store.open(state)
        store.record("sim_removed", {})
        store.close()
        shutil.copy(tmp_path / "old.db", db)
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in state.iterdir())
    result = simagent("bind", "show", "--state-dir", str(state))
    assert result.returncode != 0 and "bindings" not in result.stdout
    assert result.stderr.startswith("simagent bind show: ") and "Traceback" not in result.stderr
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in state.iterdir()) == before


def test_verify_of_absurdly_nested_json_is_broken_not_a_traceback(tmp_path):
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    result = simagent("evidence", "verify", str(nested))
    assert result.returncode == 1 and result.stdout.startswith("BROKEN: ") and "Traceback" not in result.stderr


def make_special(path, kind):
    """`path` replaced by a FIFO (a reader waits for a writer) or /dev/zero (endless)."""
    path.unlink(missing_ok=True)
    os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")


@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_bind_show_with_a_special_anchor_says_so(state, kind):
    make_special(state / "evidence.anchor", kind)
    result = simagent("bind", "show", "--state-dir", str(state), bounded=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-300:]
    assert "not a regular file" in result.stderr


@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_evidence_verify_of_a_special_file_is_refused_unread(tmp_path, kind):
    make_special(tmp_path / "bundle.json", kind)
    result = simagent("evidence", "verify", str(tmp_path / "bundle.json"), bounded=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-300:]
    assert result.stderr.strip() == f"simagent: cannot read {tmp_path / 'bundle.json'}: not a regular file"


@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_evidence_export_with_a_special_device_key_says_so(state, kind):
    make_special(state / "device_key.pem", kind)
    result = simagent("evidence", "export", "--state-dir", str(state), bounded=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-300:]
    assert "not a regular file" in result.stderr and result.stderr.count("\n") == 1


def test_evidence_export_of_an_edited_entry_names_it(state):
    with sqlite3.connect(state / "state.db") as db:
        seq = db.execute("SELECT max(seq) FROM evidence").fetchone()[0]
        db.execute("UPDATE evidence SET entry = '{edited' WHERE seq = ?", (seq,))
    db.close()
    result = simagent("evidence", "export", "--state-dir", str(state))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-300:]
    assert f"evidence entry {seq} " in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("since", ["-1", "/etc/passwd", "1" * 60])
def test_export_since_that_is_no_entry_or_time_is_a_usage_error(state, since):
    result = simagent("evidence", "export", "--state-dir", str(state), "--since", since)
    assert result.returncode != 0 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "--since" in result.stderr


def test_evidence_export_to_a_device_or_pipe_writes_to_it_and_never_replaces_it(state, tmp_path):
    """`--out /dev/null` as root renamed a regular file over /dev/null (the invariant test
    does exactly that, and the machine's /dev/null kept turning into a file). A pipe stands
    in for the device here: it is written to and stays a pipe."""
    import stat
    import threading

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
    reader.start()
    done = simagent("evidence", "export", "--out", str(pipe), "--state-dir", str(state))
    if reader.is_alive():  # the export never opened the pipe: unblock the reader
        with open(pipe, "wb"):
            pass
    reader.join(5)
    assert done.returncode == 0, done.stderr
    assert stat.S_ISFIFO(os.stat(pipe).st_mode), "the pipe was replaced by a file"
    assert json.loads(received[0])["entries"]
