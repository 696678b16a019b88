"""AT round trips per second: ATClient vs raw loops against the same pty responder, in
the same run (SPEC §11: the client must reach >= 50 % of a raw chunked pyserial loop).

Two baselines, both synchronous and blocking:
- `pyserial`: the raw chunked pyserial loop SPEC §11 names - `ser.write()`, then
  `ser.read(max(1, ser.in_waiting))` chunks until the final result (pyserial's own idiom);
- `os_read`: stricter - `os.read()` straight on pyserial's fd, bypassing pyserial's read.
`at_roundtrip_ratio` is against the first; `at_roundtrip_ratio_vs_os_read` is reported
beside it."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import time
import tty

import serial

from at_commands.client import ATClient

COMMAND = "AT+CSQ"
REPLY = b"\r\n+CSQ: 20,99\r\n\r\nOK\r\n"
ROUND_TRIPS = 400
# The loops alternate; each ratio is the median over rounds of adjacent runs, so load from
# other processes on the box hits both sides alike.
ROUNDS = 25


def _respond(master: int) -> None:
    """Child process: answer every CR-terminated command (own process: no shared GIL)."""
    buf = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            return
        if not data:
            return
        buf += data
        while b"\r" in buf:
            _, buf = buf.split(b"\r", 1)
            os.write(master, REPLY)


def _raw_loop(path: str, n: int, read_chunk) -> float:
    ser = serial.Serial(path, 115200, timeout=1)
    try:
        command = COMMAND.encode() + b"\r"
        start = time.perf_counter()
        for _ in range(n):
            ser.write(command)
            got = b""
            while not got.endswith(b"OK\r\n"):
                got += read_chunk(ser)
        return n / (time.perf_counter() - start)
    finally:
        ser.close()


def _pyserial_chunk(ser: serial.Serial) -> bytes:
    return ser.read(max(1, ser.in_waiting))


def _os_read_chunk(ser: serial.Serial) -> bytes:
    return os.read(ser.fd, 4096)


async def _client_loop(path: str, n: int) -> float:
    client = await ATClient.open(path)
    try:
        start = time.perf_counter()
        for _ in range(n):
            await client.command(COMMAND, timeout=5)
        return n / (time.perf_counter() - start)
    finally:
        client.close()


def run() -> dict:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    child = multiprocessing.get_context("fork").Process(target=_respond, args=(master,), daemon=True)
    child.start()
    try:
        _raw_loop(path, 200, _os_read_chunk)  # warm-up
        rounds = []
        for _ in range(ROUNDS):
            rounds.append((
                _raw_loop(path, ROUND_TRIPS, _pyserial_chunk),
                _raw_loop(path, ROUND_TRIPS, _os_read_chunk),
                asyncio.run(_client_loop(path, ROUND_TRIPS)),
            ))
    finally:
        child.terminate()
        child.join()
        os.close(master)
        os.close(slave)
    pyserial, os_read, client = (statistics.median(side) for side in zip(*rounds))
    return {
        "at_roundtrip_raw_per_s": round(pyserial, 1),
        "at_roundtrip_raw_os_read_per_s": round(os_read, 1),
        "at_roundtrip_client_per_s": round(client, 1),
        "at_roundtrip_ratio": round(statistics.median(c / p for p, _, c in rounds), 3),
        "at_roundtrip_ratio_vs_os_read": round(statistics.median(c / o for _, o, c in rounds), 3),
    }
