"""agent.service.offload: one heavy job at a time, a short queue, then `busy`; the export child
against a real state directory (SQLite file, device key), read-only."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from agent.core.evidence import load_or_create_device_key, verify_bundle
from agent.service.offload import OffloadError, Offloader
from agent.core.store import Store

STAMP = {"exported_at": "2026-01-01T00:00:00.000Z", "exported_at_trusted": True}


def test_one_job_at_a_time_a_bounded_queue_then_busy():
    async def scenario():
        offloader = Offloader(max_waiting=2)
        release = threading.Event()
        running, peak = [], []

        def job(n):
            running.append(n)
            peak.append(len(running))
            release.wait(5)
            running.remove(n)
            return n

        jobs = [asyncio.create_task(offloader.run_thread("job", job, n)) for n in range(3)]  # one runs, two wait
        await asyncio.sleep(0.05)
        with pytest.raises(OffloadError) as refused:
            await offloader.run_thread("job", job, 99)
        release.set()
        done = await asyncio.gather(*jobs)
        offloader.close()
        return refused.value, done, peak

    refused, done, peak = asyncio.run(scenario())
    assert refused.code == "busy" and "try the job again in a moment" in refused.message
    assert done == [0, 1, 2] and max(peak) == 1


def test_a_caller_that_gives_up_does_not_free_the_slot_before_its_thread_ends():
    async def scenario():
        offloader = Offloader()
        release = threading.Event()
        started = {}

        def job(name):
            started[name] = time.monotonic()
            if name == "first":
                release.wait(5)
            return name

        first = asyncio.create_task(offloader.run_thread("job", job, "first"))
        await asyncio.sleep(0.05)
        first.cancel()
        second = asyncio.create_task(offloader.run_thread("job", job, "second"))
        await asyncio.sleep(0.1)
        assert "second" not in started  # the first still runs in its thread
        released_at = time.monotonic()
        release.set()
        assert await second == "second"
        offloader.close()
        return started["second"] - released_at

    assert asyncio.run(scenario()) >= 0


@pytest.fixture
def state(tmp_path):
    directory = tmp_path / "state"
    store = Store.open(directory)
    for n in range(300):
        store.record("sim_inserted", {"iccid": f"8986{n:016d}"}, event=False)
    store.close()
    load_or_create_device_key(directory)
    return directory


def snapshot(directory):
    """Every file but SQLite's WAL index sidecars, which a read-only reader may create
    empty when no writer has the database open (the daemon, when it runs, always has)."""
    files = {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode, p.read_bytes())
             for p in sorted(directory.iterdir()) if not p.name.endswith(("-wal", "-shm"))}
    assert not (directory / "state.db-wal").exists() or (directory / "state.db-wal").stat().st_size == 0
    return files


def test_export_child_streams_a_bundle_that_verifies_and_touches_nothing(state):
    before = snapshot(state)

    async def scenario():
        offloader = Offloader()
        output = await offloader.export_evidence(state, since="280", device_id="490154203237518",
                                                 max_bytes=1 << 20, **STAMP)
        tail = json.loads(await output.read_all())
        output = await offloader.export_evidence(state, since=None, device_id=None, max_bytes=1 << 20, **STAMP)
        whole = json.loads(await output.read_all())
        return tail, whole

    tail, whole = asyncio.run(scenario())
    assert verify_bundle(tail).ok and tail["first_seq"] == 280 and len(tail["entries"]) == 21
    assert tail["device_id"] == "490154203237518" and tail["exported_at"] == STAMP["exported_at"]
    assert verify_bundle(whole).ok and len(whole["entries"]) == 300
    assert snapshot(state) == before  # an export is a read: nothing created, moved, rewritten or recorded


def test_export_child_refusals_are_error_replies(state, tmp_path):
    async def refused(directory, **job):
        offloader = Offloader()
        with pytest.raises(OffloadError) as error:
            await offloader.export_evidence(directory, device_id=None, **{"since": None, "max_bytes": 1 << 20, **STAMP, **job})
        # The slot is free again: another export runs.
        output = await offloader.export_evidence(state, since="300", device_id=None, max_bytes=1 << 20, **STAMP)
        await output.read_all()
        return error.value

    too_large = asyncio.run(refused(state, max_bytes=4096))
    assert too_large.code == "too_large" and "4096" in too_large.message and "since" in too_large.message
    assert asyncio.run(refused(state, since="last tuesday")).code == "bad_request"
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = asyncio.run(refused(empty))
    assert missing.code == "unavailable" and "no device key" in missing.message
    assert os.listdir(empty) == []  # no key, no database created


def test_closing_an_export_half_way_kills_its_child_and_frees_the_slot(state):
    async def scenario():
        offloader = Offloader(max_waiting=0)
        output = await offloader.export_evidence(state, since=None, device_id=None, max_bytes=1 << 20, **STAMP)
        pid = output._proc.pid
        with pytest.raises(OffloadError) as busy:
            await offloader.export_evidence(state, since=None, device_id=None, max_bytes=1 << 20, **STAMP)
        await output.close()  # the caller went away before reading
        gone = not os.path.exists(f"/proc/{pid}")
        again = await offloader.export_evidence(state, since="300", device_id=None, max_bytes=1 << 20, **STAMP)
        await again.read_all()
        return busy.value.code, gone

    assert asyncio.run(scenario()) == ("busy", True)


def test_a_token_check_never_waits_behind_heavy_work():
    """An export holds the heavy slot for as long as its client reads (a group member's
    client that does not read: the stream's whole timeout). The platform's token checks
    have their own turn: a real helper process opens a signed and a forged token at once."""
    import base64

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.core.tokens import load_trusted_keys

    signer = Ed25519PrivateKey.generate()
    keys = load_trusted_keys([base64.b64encode(signer.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()])
    claims = {"sub": "490154203237518", "iccid": "89860012345678901234", "act": "rebind", "exp": 4102444800, "jti": "t1"}
    token = jwt.encode(claims, signer, algorithm="EdDSA")
    forged = jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA")

    async def scenario():
        offloader = Offloader(max_waiting=0)
        release = threading.Event()
        heavy = asyncio.create_task(offloader.run_thread("evidence export", release.wait, 30))
        await asyncio.sleep(0.05)
        try:
            return await asyncio.wait_for(offloader.open_tokens([token, forged], keys), 20)
        finally:
            release.set()
            await heavy
            offloader.close()

    opened = asyncio.run(scenario())
    assert opened[0].payload == claims and opened[0].refusal is None
    assert opened[1].refusal is not None and opened[1].refusal.code == "bad_signature"


@pytest.mark.parametrize("job", ["open-tokens", "device-key"])
def test_a_helper_whose_daemon_is_gone_ends_without_a_traceback(tmp_path, job):
    """kill -9 of the daemon while a helper works: the helper's answer meets a closed pipe,
    and its traceback landed in the daemon's log (the invariant run's teardown check)."""
    read, write = os.pipe()
    os.close(read)  # the daemon that would read the answer is gone
    argv = ["open-tokens"] if job == "open-tokens" else ["device-key", str(tmp_path)]
    done = subprocess.run([sys.executable, "-P", "-m", "agent.service.offload", *argv],
                          input=b'{"keys": [], "tokens": ["x"]}' if job == "open-tokens" else b"", stdout=write,
                          stderr=subprocess.PIPE, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    os.close(write)
    assert done.returncode == 1 and b"Traceback" not in done.stderr, done.stderr.decode()[-500:]
