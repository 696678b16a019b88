"""AT round trips per second: ATClient vs a raw chunked pyserial loop, same pty responder,
same run (SPEC §11: the client must reach >= 50 % of the raw loop)."""

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
# The two loops alternate; the ratio is the median of each adjacent pair, so load from
# other processes on the box hits both sides of a pair alike.
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


def _raw_loop(path: str, n: int) -> float:
    ser = serial.Serial(path, 115200, timeout=1)
    try:
        command = COMMAND.encode() + b"\r"
        start = time.perf_counter()
        for _ in range(n):
            ser.write(command)
            got = b""
            while not got.endswith(b"OK\r\n"):
                got += os.read(ser.fd, 4096)
        return n / (time.perf_counter() - start)
    finally:
        ser.close()


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
        _raw_loop(path, 200)  # warm-up
        pairs = []
        for _ in range(ROUNDS):
            pairs.append((_raw_loop(path, ROUND_TRIPS), asyncio.run(_client_loop(path, ROUND_TRIPS))))
    finally:
        child.terminate()
        child.join()
        os.close(master)
        os.close(slave)
    raw, client = (statistics.median(side) for side in zip(*pairs))
    return {
        "at_roundtrip_raw_per_s": round(raw, 1),
        "at_roundtrip_client_per_s": round(client, 1),
        "at_roundtrip_ratio": round(statistics.median(c / r for r, c in pairs), 3),
    }
