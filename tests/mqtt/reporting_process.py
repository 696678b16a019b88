"""A reporting process for the crash tests: a Store and a Reporter on one asyncio loop,
recording events in bursts and printing `id seq` of each event once its transaction
committed. Killed with SIGKILL by the tests at random moments.

    python reporting_process.py --state DIR --port N [--events N|-1] [--then stop|idle]
"""

import argparse
import asyncio
import sys

from agent.core.backoff import Backoff
from agent.service.reporter import Reporter
from agent.core.config import MqttConfig, TlsConfig
from agent.core.store import Store


async def main(args: argparse.Namespace) -> None:
    store = Store.open(args.state)
    settings = MqttConfig(host="127.0.0.1", port=args.port, keepalive=10, tls=TlsConfig(enabled=False))
    reporter = Reporter(settings, store, device_id=args.device, backoff=Backoff(0.05, 0.4))
    reporter.start()
    print("started", flush=True)
    recorded = 0
    while args.events < 0 or recorded < args.events:
        with store.transaction() as tx:
            messages = [tx.enqueue_event("config_reloaded", {"n": recorded + i}, store.clock.now()) for i in range(args.burst)]
        recorded += len(messages)
        sys.stdout.write("".join(f"{m['id']} {m['seq']}\n" for m in messages))
        sys.stdout.flush()
        await asyncio.sleep(args.pause)
    if args.then == "idle":
        print("idle", flush=True)
        await asyncio.Event().wait()
    while reporter.store.outbox_depth()["event"] and not reporter.connected:
        await asyncio.sleep(0.01)
    await reporter.stop(timeout=10)
    print("stopped", store.outbox_depth()["event"], flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="490154203237518")
    parser.add_argument("--events", type=int, default=-1)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.002)
    parser.add_argument("--then", choices=("stop", "idle"), default="stop")
    asyncio.run(main(parser.parse_args()))
