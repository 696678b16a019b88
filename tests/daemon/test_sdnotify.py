"""sd_notify and the health-gated watchdog, against a real AF_UNIX datagram socket."""

from __future__ import annotations

import asyncio
import os
import time

from agent.service.sdnotify import LoopHealth, Notifier, Watchdog, watchdog_interval


def test_without_notify_socket_everything_is_a_no_op():
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False


def test_ready_status_stopping_watchdog_reach_the_socket(notify_listener):
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_listener.address})
    assert notifier.ready("modem ok, broker connected")
    assert notify_listener.receive() == {"READY": "1", "STATUS": "modem ok, broker connected"}
    assert notifier.ready()
    assert notify_listener.receive() == {"READY": "1"}
    assert notifier.status("waiting for modem")
    assert notify_listener.receive() == {"STATUS": "waiting for modem"}
    assert notifier.stopping()
    assert notify_listener.receive() == {"STOPPING": "1"}
    assert notifier.watchdog()
    assert notify_listener.receive() == {"WATCHDOG": "1"}
    notifier.close()


def test_status_text_cannot_forge_fields(notify_listener):
    notifier = Notifier(notify_listener.address)
    notifier.status("bad\nREADY=1\rX")
    assert notify_listener.receive() == {"STATUS": "bad READY=1 X"}


def test_reloading_carries_monotonic_usec(notify_listener):
    notifier = Notifier(notify_listener.address)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = notify_listener.receive()
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after


def test_a_vanished_manager_socket_is_reported_not_raised(short_dir):
    notifier = Notifier(str(short_dir / "gone"))
    assert notifier.enabled
    assert notifier.ready() is False


def test_watchdog_interval_from_environment():
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": me}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


def test_watchdog_from_env_needs_socket_and_timeout(notify_listener):
    healthy = lambda: True  # noqa: E731
    with_socket = Notifier(notify_listener.address)
    assert Watchdog.from_env(with_socket, healthy, {"WATCHDOG_USEC": "4000000"}).interval == 2.0
    assert Watchdog.from_env(with_socket, healthy, {}) is None
    assert Watchdog.from_env(Notifier(None), healthy, {"WATCHDOG_USEC": "4000000"}) is None


def test_watchdog_pings_only_while_healthy(notify_listener):
    state = {"healthy": True}

    async def scenario():
        notifier = Notifier(notify_listener.address)
        dog = Watchdog.from_env(notifier, lambda: state["healthy"], {"WATCHDOG_USEC": "100000"})
        assert dog.interval == 0.05
        task = dog.start()
        await asyncio.sleep(0.4)
        healthy_pings = notify_listener.drain()
        state["healthy"] = False
        await asyncio.sleep(0.1)  # a ping already decided on may still land
        notify_listener.drain()
        await asyncio.sleep(0.4)
        withheld = notify_listener.drain()
        state["healthy"] = True
        await asyncio.sleep(0.4)
        resumed = notify_listener.drain()
        task.cancel()
        return healthy_pings, withheld, resumed

    healthy_pings, withheld, resumed = asyncio.run(scenario())
    assert len(healthy_pings) >= 2 and all(m == {"WATCHDOG": "1"} for m in healthy_pings)
    assert withheld == []
    assert len(resumed) >= 2


def test_loop_health_sees_a_dead_critical_task():
    async def scenario():
        health = LoopHealth(max_lag=5.0, probe_interval=0.05)
        health.start()

        async def crashes():
            await asyncio.sleep(0.05)
            raise RuntimeError("modem loop died")

        crashing = asyncio.get_running_loop().create_task(crashes())
        health.watch("modem", crashing)
        await asyncio.sleep(0.01)
        before = health()
        await asyncio.sleep(0.2)
        return before, health.problems(), crashing

    before, problems, crashing = asyncio.run(scenario())
    assert before is True
    assert problems == ["task modem ended"]
    assert isinstance(crashing.exception(), RuntimeError)


def test_loop_health_sees_a_blocked_loop():
    async def scenario():
        health = LoopHealth(max_lag=0.2, probe_interval=0.05)
        health.start()
        await asyncio.sleep(0.15)
        before = health()
        time.sleep(0.5)  # a blocking call stalls the loop
        during = health.problems()
        await asyncio.sleep(0.3)  # the probe catches up and measures normal lag again
        return before, during, health()

    before, during, after = asyncio.run(scenario())
    assert before is True
    assert len(during) == 1 and during[0].startswith("event loop lag")
    assert after is True


def test_watchdog_with_loop_health_stops_when_a_critical_task_dies(notify_listener):
    async def scenario():
        health = LoopHealth(max_lag=5.0, probe_interval=0.05)
        health.start()
        stop = asyncio.Event()
        worker = asyncio.get_running_loop().create_task(stop.wait())
        health.watch("reporter", worker)
        dog = Watchdog(Notifier(notify_listener.address), 0.05, health)
        task = dog.start()
        await asyncio.sleep(0.3)
        alive_pings = notify_listener.drain()
        stop.set()
        await asyncio.sleep(0.1)
        notify_listener.drain()
        await asyncio.sleep(0.3)
        task.cancel()
        return alive_pings, notify_listener.drain()

    alive_pings, after_death = asyncio.run(scenario())
    assert len(alive_pings) >= 2
    assert after_death == []
