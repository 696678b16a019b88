"""SIM removal -> `AT+CFUN=4` on the wire while evidence exports and status calls keep the
daemon busy (issue 9, item 4: nothing heavy on the loop; target p99 <= 50 ms).

`simagent run` with the real fake-modem process (Quectel, hot-swap URCs) and a local
mosquitto, on a 10,000-entry evidence log. Eight control connections ask for
`export_evidence` over and over and two ask for `status` over and over (each status reads
the modem, so the gate also meets a busy AT channel). Each round pulls the card; the
latency runs from the removal URC leaving the fake to `AT+CFUN=4` arriving at it, both
stamped by the fake's transcript (one clock); then the card goes back and the radio comes
back before the next round.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

from agent.core.clock import Clock
from agent.core.store import Store
from benchmarks._daemon_rig import HOME_ICCID, IMEI, Rig

SWAPS = 100
ENTRIES = 10_000
EXPORTERS = 8
STATUS_CALLERS = 2
SETTLE_S = 1.0
REMOVED_URC = "+QSIMSTAT: 1,0"


def fill_evidence(state_dir: Path, count: int) -> None:
    store = Store.open(state_dir, clock=Clock())
    try:
        with store.transaction() as tx:
            for i in range(count):
                tx.append_evidence("sim_inserted", {"iccid": f"8986{i:016d}", "imei": IMEI, "note": "filler " * 8}, tx.now())
    finally:
        store.close()


async def _load(socket_path: Path, stop: threading.Event, exports_done: list[int]) -> None:
    async def exporter() -> None:
        while not stop.is_set():
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
            writer.write(b'{"id": 1, "name": "export_evidence", "args": {}}\n')
            while chunk := await reader.read(1 << 20):  # read and dropped: this process stays light
                if chunk.endswith(b"\n"):
                    exports_done.append(1)
                    break
            writer.close()

    async def status_caller() -> None:
        reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=1 << 24)
        while not stop.is_set():
            writer.write(b'{"id": 1, "name": "status", "args": {}}\n')
            await reader.readline()
        writer.close()

    await asyncio.gather(*(exporter() for _ in range(EXPORTERS)), *(status_caller() for _ in range(STATUS_CALLERS)))


def _norm(line: str) -> str:
    return re.sub(r"\s+", "", line).upper()


def _swap_latency(modem) -> float:
    start = len(modem.transcript)
    modem.sim_remove()
    deadline = time.monotonic() + 10
    while modem.state()["cfun"] != 4:  # cheap; the transcript (a growing file) is read once
        if time.monotonic() > deadline:
            raise RuntimeError("no AT+CFUN=4 within 10 s of the removal")
        time.sleep(0.01)
    entries = modem.transcript[start:]
    removed = next(e["t"] for e in entries if e["dir"] == "out" and e["line"] == REMOVED_URC)
    return next(e["t"] for e in entries if e["dir"] == "in" and e["t"] >= removed and _norm(e["line"]) == "AT+CFUN=4") - removed


def _radio_back(modem) -> None:
    modem.sim_insert(HOME_ICCID)
    deadline = time.monotonic() + 10
    while modem.state()["cfun"] != 1:
        if time.monotonic() > deadline:
            raise RuntimeError("the radio did not come back within 10 s")
        time.sleep(0.02)


def run() -> dict:
    latencies: list[float] = []
    exports_done: list[int] = []
    with tempfile.TemporaryDirectory(prefix="sa-bx-", dir="/tmp") as name, Rig(Path(name)) as rig:
        fill_evidence(Path(name) / "state", ENTRIES)
        agent = rig.start_agent()
        stop = threading.Event()
        load = threading.Thread(target=asyncio.run, args=(_load(agent.control_socket, stop, exports_done),))
        try:
            time.sleep(SETTLE_S)
            load.start()
            time.sleep(0.5)
            started = time.monotonic()
            for _ in range(SWAPS):
                latencies.append(_swap_latency(rig.modem))
                _radio_back(rig.modem)
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            if load.is_alive():
                load.join(60)
            agent.stop()
            agent.close()
    return {
        "swap_to_radio_off_under_exports_p99_ms": round(statistics.quantiles(latencies, n=100, method="inclusive")[98] * 1000, 1),
        "swap_to_radio_off_under_exports_median_ms": round(statistics.median(latencies) * 1000, 1),
        "swap_to_radio_off_under_exports_max_ms": round(max(latencies) * 1000, 1),
        "exports_10k_per_s_during_swaps": round(len(exports_done) / elapsed, 2),
    }
