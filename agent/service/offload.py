"""Heavy work the daemon does for a caller, kept off its event loop, one job at a time.

The loop carries the radio gate (SIM swap -> `AT+CFUN=4` within 50 ms, SPEC §11), so a
request whose cost grows with the state (an evidence export reads the whole log; diag's
fact gathering counts the outbox and probes the broker) never runs on it.

Where the work runs. An evidence export runs in a child process
(`python -m agent.service.offload export JOB`), not in a thread:
- the GIL: building and signing a bundle is CPU work inside C calls (json, SHA-256,
  Ed25519 over the whole message) that hold the GIL for milliseconds up to tens of
  milliseconds each; run from a thread they would still stall the loop. A child shares
  no lock with it.
- cancellation: a caller that gives up (timeout, closed connection, shutdown) gets its
  child killed and the slot is free at once. A thread cannot be stopped: it would keep the
  slot, or, released early, break "one at a time".
- memory: what the child needs (cryptography's 9 MB native module, page buffers, the
  spool) goes back to the system when it exits; in a thread the daemon would keep its peak
  in pymalloc arenas (README: idle RSS <= 40 MB).
Its cost, an interpreter start (about 0.1 s; a 10,000-entry export takes 0.25 s in all)
per export, is small for a rare request.
A token's signature is checked in a child too (`python -m agent.service.offload
open-tokens`, `open_tokens`), for memory alone: PyJWT and cryptography, which only that
check and the export's signature need, would add about 9 MB to a daemon of 30 (issue 12),
for a request a terminal sees a few times in its life. The daemon refuses what the header
already tells (malformed, wrong algorithm, untrusted key: agent.core.tokens) without one.
For the same reason the device key is created by a child on first start
(`device_public_key`); later starts read the published public key from its file.
Diag's fact gathering is I/O on objects of the daemon (configuration, broker target): it
runs in one dedicated worker thread, through the same slot.

One at a time, a short queue. One job runs; up to MAX_WAITING requests wait their turn
(in arrival order) and any request beyond that is refused at once with `busy`. A waiting
request costs one coroutine, no thread and no buffer, so a flood (16 control connections,
MQTT commands) cannot pile up threads or memory. Waiting counts against the caller's own
timeout. Token checks take turns of their own by the same rule, never behind an export
(which holds its slot while its client reads). Why wait rather than refuse: a
technician's export that meets the platform's (or a diag) should simply come a moment
later, not fail; refusing is kept for a real flood.

The export child. The job is its one argument (JSON). On stdout it writes one header line,
`{"ok": true}` followed by the bundle (one line of canonical JSON, see
`evidence.write_bundle`, written only once it is built and signed) or
`{"ok": false, "error": {"code", "message"}}`. Its stderr is the daemon's (journald). It
opens the state database read-only and the device key as it is: an export creates,
moves and records nothing. The daemon relays the bundle in CHUNK pieces; the pipe's and
the socket's flow control bound what is buffered on the way.

The token child reads its job from stdin, never from its command line (a token is a
credential, and every user can read a process's arguments): `{"tokens": [...], "keys":
[base64 raw public keys]}`. It writes one JSON line, a list with for each token
`{"payload": ...}` (the signed payload) or `{"refusal": {"code", "message"}}`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from agent.core.evidence import EvidenceError, published_public_key
from agent.core.store import DEVICE_KEY_NAME
from agent.core.tokens import Opened, TokenError, TrustedKey, load_trusted_keys, open_token

log = logging.getLogger(__name__)

MAX_WAITING = 8  # requests that may wait while one runs; more are refused with `busy`
CHUNK = 256 * 1024  # bytes relayed from the child at a time
HEADER_LIMIT = 64 * 1024  # the child's header line
TOKEN_CHECK_TIMEOUT_S = 60.0  # a child that starts in 0.2 s natively, 2-3 s under qemu
# Variables meant for the daemon alone: a child must not talk to systemd in its name.
_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")

T = TypeVar("T")


class OffloadError(Exception):
    """A refusal or failure of offloaded work: `code` for machines (busy, too_large,
    bad_request, unavailable, internal), the message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _Turns:
    """One at a time, up to `max_waiting` waiting in arrival order, `busy` beyond that."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._slot = asyncio.Lock()  # FIFO: the longest waiter goes next
        self._waiting = 0

    async def take(self, what: str) -> None:
        if self._slot.locked() and self._waiting >= self.max_waiting:
            raise OffloadError("busy", f"the daemon is busy with another heavy request and {self._waiting} more "
                                       f"wait their turn: try the {what} again in a moment")
        self._waiting += 1
        try:
            await self._slot.acquire()
        finally:
            self._waiting -= 1

    def release(self) -> None:
        self._slot.release()


class Offloader:
    """The daemon's one slot for heavy work, and one for token checks. Use from the event
    loop. A token check (a fraction of a second) never waits behind an export: a group
    member's export to a client that does not read holds its slot for the stream's timeout,
    and a platform's rebind must not wait for it (nor be refused as busy)."""

    def __init__(self, max_waiting: int = MAX_WAITING) -> None:
        self.max_waiting = max_waiting
        self._heavy = _Turns(max_waiting)
        self._token_turns = _Turns(max_waiting)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simagent-offload")

    async def _take_turn(self, what: str) -> None:
        await self._heavy.take(what)

    def _release(self) -> None:
        self._heavy.release()

    async def run_thread(self, what: str, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`function(*args, **kwargs)` in the worker thread, in its turn. A caller that is
        cancelled stops waiting, but the slot stays taken until the function returns."""
        await self._take_turn(what)
        future = asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(function, *args, **kwargs))
        future.add_done_callback(self._thread_done)
        return await asyncio.shield(future)

    def _thread_done(self, future: asyncio.Future) -> None:
        self._release()
        if not future.cancelled():
            future.exception()  # retrieved: a caller that gave up must not leave a "never retrieved" warning

    async def export_evidence(self, state_dir: str | os.PathLike, *, since: str | None, device_id: str | None,
                              exported_at: str, exported_at_trusted: bool, max_bytes: int) -> "ChildOutput":
        """Starts an export in its turn and returns its output once the bundle is built
        and signed; refusals and failures up to that point raise OffloadError. The caller
        must `close()` what it gets (that ends the child and frees the slot)."""
        job = {"state_dir": os.fspath(state_dir), "since": since, "device_id": device_id, "exported_at": exported_at,
               "exported_at_trusted": exported_at_trusted, "max_bytes": max_bytes}
        await self._take_turn("evidence export")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", "agent.service.offload", "export", json.dumps(job),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, limit=HEADER_LIMIT,
                env=_child_environment(),
            )
        except BaseException:
            self._release()
            raise
        output = ChildOutput(proc, self._release)
        try:
            await output.read_header()
        except BaseException:
            await output.close()
            raise
        return output

    async def open_tokens(self, tokens: list[str], keys: list[TrustedKey]) -> list[Opened]:
        """`open_tokens` in its turn among token checks."""
        await self._token_turns.take("token check")
        try:
            return await open_tokens(tokens, keys)
        finally:
            self._token_turns.release()

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


async def open_tokens(tokens: list[str], keys: list[TrustedKey]) -> list[Opened]:
    """`agent.core.tokens.open_token` of each token, in a child process. Raises
    OffloadError when the child fails or takes longer than TOKEN_CHECK_TIMEOUT_S (it is
    killed then, and when the caller is cancelled)."""
    job = json.dumps({"tokens": tokens, "keys": [base64.b64encode(key.raw).decode() for key in keys]}).encode()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-m", "agent.service.offload", "open-tokens",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=_child_environment(),
    )
    try:
        async with asyncio.timeout(TOKEN_CHECK_TIMEOUT_S):
            output, _ = await proc.communicate(job)
    except TimeoutError:
        raise OffloadError("internal", f"the token check took longer than {TOKEN_CHECK_TIMEOUT_S:g} s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    try:
        results = json.loads(output)
        opened = [Opened(refusal=TokenError(**r["refusal"])) if "refusal" in r else Opened(payload=r["payload"])
                  for r in results]
    except (ValueError, TypeError, KeyError):
        opened = None
    if proc.returncode != 0 or opened is None or len(opened) != len(tokens):
        log.error("token check worker failed (exit status %s)", proc.returncode)
        raise OffloadError("internal", f"the token check failed (exit status {proc.returncode}); see the daemon's log")
    return opened


async def device_public_key(state_dir: str | os.PathLike) -> str:
    """The device public key (base64) as published beside the private key, or, when the
    private key is not there (first start, or lost: the caller says which), made by a
    child that creates it and publishes its public half (a published key without its
    private half signs nothing). Raises EvidenceError when the key cannot be created or
    read (an unusable key is never replaced)."""
    if (Path(state_dir) / DEVICE_KEY_NAME).exists():
        with contextlib.suppress(OSError):  # unreadable: the child publishes it again
            return published_public_key(state_dir)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-m", "agent.service.offload", "device-key", os.fspath(state_dir),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, env=_child_environment(),
    )
    output, _ = await proc.communicate()
    text = output.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise EvidenceError(text or f"the device key worker failed (exit status {proc.returncode})")
    return text


def _child_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}


class ChildOutput:
    """What an export child writes after its header, as an async iterator of byte chunks.
    Holds the slot until `close()`, which also kills the child if it still runs."""

    def __init__(self, proc: asyncio.subprocess.Process, release: Callable[[], None]) -> None:
        self._proc = proc
        self._release = release
        self._closed = False

    async def read_header(self) -> None:
        try:
            line = await self._proc.stdout.readline()
        except ValueError:  # longer than HEADER_LIMIT
            line = b""
        try:
            header = json.loads(line) if line else None
        except ValueError:
            header = None
        if not isinstance(header, dict):
            code = await self._proc.wait()
            log.error("evidence export worker failed (exit status %s)", code)
            raise OffloadError("internal", f"the export worker failed (exit status {code}); see the daemon's log")
        if not header.get("ok"):
            error = header.get("error") or {}
            raise OffloadError(str(error.get("code", "internal")), str(error.get("message", "export failed")))

    def __aiter__(self) -> "ChildOutput":
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._proc.stdout.read(CHUNK)
        if chunk:
            return chunk
        code = await self._proc.wait()
        if code != 0:
            raise OffloadError("internal", f"the export worker stopped half-way (exit status {code})")
        raise StopAsyncIteration

    async def read_all(self) -> bytes:
        """Everything (for a channel that needs the whole reply; bound it with max_bytes)."""
        try:
            return b"".join([chunk async for chunk in self])
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
            await self._proc.wait()
        finally:
            self._release()


# -- the child ---------------------------------------------------------------------------


class _HeaderFirst:
    """`out` for write_bundle: the success header goes out just before the first byte."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.started = False

    def write(self, data: bytes) -> None:
        if not self.started:
            self.raw.write(b'{"ok": true}\n')
            self.started = True
        self.raw.write(data)


def export_child(job: dict[str, Any], raw) -> int:
    from agent.core.evidence import BundleTooLarge, EvidenceError, load_device_key, parse_since, write_bundle
    from agent.core.store import DB_NAME, connect_read_only

    out = _HeaderFirst(raw)
    try:
        since = parse_since(job["since"]) if job.get("since") else None
        key = load_device_key(job["state_dir"])
        with contextlib.closing(connect_read_only(Path(job["state_dir"]) / DB_NAME)) as conn:
            write_bundle(conn, key, out, since=since, device_id=job.get("device_id"), exported_at=job["exported_at"],
                         exported_at_trusted=bool(job["exported_at_trusted"]), max_bytes=job.get("max_bytes"))
    except BundleTooLarge as exc:
        error = ("too_large", str(exc))
    except ValueError as exc:  # a bad `since`
        error = ("bad_request", str(exc))
    except (EvidenceError, OSError, sqlite3.Error) as exc:
        if out.started:
            raise
        error = ("unavailable", f"evidence export failed: {exc}")
    else:
        raw.flush()
        return 0
    raw.write(json.dumps({"ok": False, "error": {"code": error[0], "message": error[1]}}).encode() + b"\n")
    raw.flush()
    return 1


def open_tokens_child(job: dict[str, Any], raw) -> int:
    keys = load_trusted_keys(job["keys"])
    results = []
    for token in job["tokens"]:
        opened = open_token(token, keys)
        if opened.refusal is not None:
            results.append({"refusal": {"code": opened.refusal.code, "message": opened.refusal.message}})
        else:
            results.append({"payload": opened.payload})
    raw.write(json.dumps(results).encode() + b"\n")
    raw.flush()
    return 0


def device_key_child(state_dir: str) -> int:
    from agent.core.evidence import device_public_key_b64, load_or_create_device_key

    try:
        print(device_public_key_b64(load_or_create_device_key(state_dir)))
    except EvidenceError as exc:
        print(exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _child(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # The daemon that asked is gone (killed, or the caller gave up): nobody to tell, and
        # no traceback for its log. os._exit: a flush of stdout at exit would raise again.
        os._exit(1)


def _child(argv: list[str]) -> int:
    if argv == ["open-tokens"]:
        return open_tokens_child(json.load(sys.stdin), sys.stdout.buffer)
    if len(argv) == 2 and argv[0] == "device-key":
        return device_key_child(argv[1])
    if len(argv) != 2 or argv[0] != "export":
        print("usage: python -m agent.service.offload export JOB | open-tokens | device-key STATE_DIR "
              "(the daemon runs this)", file=sys.stderr)
        return 2
    return export_child(json.loads(argv[1]), sys.stdout.buffer)


if __name__ == "__main__":
    sys.exit(main())
