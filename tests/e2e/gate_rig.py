"""Helpers for the radio-gate reproductions (issue 9): reading the fake modem's
transcript for swap -> `AT+CFUN=4` on the wire, callers acting as a member of the
service group (uid/gid nobody) on the control socket, raw control calls from threads,
and the evidence log read beside the daemon.

    mark = len(transcript(modem))
    modem.sim_insert(FOREIGN_ICCID)
    t_urc, t_cfun4 = cfun4_after(transcript(modem), mark)    # t_cfun4 None until it came
    foreign_attaches(modem, FOREIGN_ICCID)                   # [] while the card never attached

    share_control_socket(agent)                              # the socket reachable by nobody
    scan = ForkedCall.as_nobody(agent.control_socket, "at", command="AT+COPS=?")
    scan.result(timeout=5)                                   # {"ok": ...} or None if still waiting
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from at_commands import profiles

NOBODY = 65534  # uid and gid of `nobody`/`nogroup`: a member of the service group stands in
QUECTEL_REMOVED = profiles.QUECTEL.sim_removed_sample  # "+QSIMSTAT: 1,0", written first by sim-insert


def norm(line: str) -> str:
    return re.sub(r"\s+", "", line).upper()


def transcript(modem) -> list[dict]:
    """The fake's transcript file as written so far; a line still being written (the fake
    appends while we read) is left for the next read."""
    with open(modem.transcript_path, encoding="utf-8") as f:
        data = f.read()
    return [json.loads(line) for line in data.split("\n")[:-1] if line.strip()]


def sent_lines(entries: list[dict], start: int = 0) -> list[dict]:
    """Non-empty command lines the fake received from index `start` on."""
    return [e for e in entries[start:] if e["dir"] == "in" and e["line"].strip()]


def cfun4_after(entries: list[dict], start: int) -> tuple[float, float | None]:
    """(t of the removal URC at or after `start`, t of the first `AT+CFUN=4` after it or None)."""
    entries = entries[start:]
    trigger = next((i for i, e in enumerate(entries) if e["dir"] == "out" and e["line"] == QUECTEL_REMOVED), None)
    if trigger is None:
        raise AssertionError(f"no {QUECTEL_REMOVED} URC in the transcript after index {start}")
    t0 = entries[trigger]["t"]
    off = next((e["t"] for e in entries[trigger:] if e["dir"] == "in" and norm(e["line"]) == "AT+CFUN=4"), None)
    return t0, off


def foreign_attaches(modem, iccid: str) -> list[dict]:
    return [a for a in modem.state()["attaches"] if a["iccid"] == iccid]


# -- the control socket, raw -------------------------------------------------------------------
def control_call(path: str | os.PathLike, op: str, timeout: float = 60.0, **args: Any) -> dict:
    """One request on a fresh connection; the raw reply {"ok", "result"|"error"}."""
    data = control_call_bytes(path, op, timeout, **args)
    if not data:
        raise ConnectionError(f"{op}: the daemon closed the connection without a reply")
    return json.loads(data)


def control_call_bytes(path: str | os.PathLike, op: str, timeout: float = 60.0, **args: Any) -> bytes:
    """The reply line unparsed (parsing megabytes of JSON would load the machine the
    latencies are measured on)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(json.dumps({"id": 1, "name": op, "args": args}).encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                break
    return b"".join(chunks)


def share_control_socket(agent) -> None:
    """What the service group gives in production: the directory traversable, the socket's
    group nogroup (its mode stays the daemon's 0660)."""
    os.chmod(agent.dir, 0o711)
    os.chown(agent.control_socket, -1, NOBODY)


class ForkedCall:
    """A control call made by a forked child with another uid/gid, running in the
    background; `result()` collects its reply."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid, self.fd = pid, fd
        self._chunks: list[bytes] = []
        self._value: dict | None = None

    @classmethod
    def as_user(cls, uid: int, gid: int, path: str | os.PathLike, op: str, timeout: float = 60.0, **args: Any) -> "ForkedCall":
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            status = 0
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                try:
                    outcome = control_call(path, op, timeout, **args)
                except Exception as exc:
                    outcome = {"raised": f"{type(exc).__name__}: {exc}"}
                os.write(write_end, json.dumps(outcome).encode())
            except BaseException:
                status = 1
            finally:
                os._exit(status)
        os.close(write_end)
        return cls(pid, read_end)

    @classmethod
    def as_nobody(cls, path: str | os.PathLike, op: str, timeout: float = 60.0, **args: Any) -> "ForkedCall":
        return cls.as_user(NOBODY, NOBODY, path, op, timeout, **args)

    def result(self, timeout: float = 0.0) -> dict | None:
        """The child's outcome once it finished, None while it still waits."""
        if self._value is not None:
            return self._value
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            self._chunks.append(chunk)
        os.close(self.fd)
        self.fd = -1
        os.waitpid(self.pid, 0)
        data = b"".join(self._chunks)
        self._value = json.loads(data) if data else {"raised": "the child died before reporting"}
        return self._value

    def kill(self) -> None:
        if self._value is None and self.fd != -1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            os.close(self.fd)
            self.fd = -1


# -- the evidence log, read-only beside the daemon --------------------------------------------------
def evidence_entries(state_dir: Path) -> list[dict]:
    db = Path(state_dir) / "state.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        return [json.loads(row[0]) for row in conn.execute("SELECT entry FROM evidence ORDER BY seq")]


def find_dicts(value: Any, predicate: Callable[[dict], bool]) -> list[dict]:
    """Every dict inside `value` (nested anywhere) for which `predicate` holds."""
    found = []
    if isinstance(value, dict):
        if predicate(value):
            found.append(value)
        for item in value.values():
            found += find_dicts(item, predicate)
    elif isinstance(value, list):
        for item in value:
            found += find_dicts(item, predicate)
    return found
