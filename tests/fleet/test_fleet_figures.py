"""The fleet simulation's arithmetic on its own: the loss count, the agents' log lines and
the backoff model's figures the README derives by hand."""

from __future__ import annotations

import random

from benchmarks.fleet import measure, model


def test_an_event_neither_received_nor_in_the_outbox_is_lost_and_a_second_receipt_is_a_duplicate():
    committed = {"A": (4, {4}), "B": (2, set())}  # A: seq 4 still queued
    received = {"A": {1: ["a1"], 3: ["a3", "a3"]}, "B": {1: ["b1"], 2: ["b2"]}}
    figures = measure.delivery(committed, received)
    assert figures["committed"] == 6 and figures["received_unique"] == 4
    assert figures["lost"] == 1 and figures["lost_examples"] == ["A#2"]
    assert figures["pending_in_outbox"] == 1 and figures["duplicates"] == 1


def test_agent_log_lines_become_losses_attempts_connects_and_lateness():
    log = "\n".join([
        "2026-11-29 19:42:25,766 INFO agent.service.reporter: MQTT connected to 127.0.0.1:1883 (plaintext, MQTT 5)",
        "2026-11-29 19:42:30,000 WARNING agent.service.reporter: MQTT 127.0.0.1:1883: connection lost (x); retrying in 0.8 s",
        "2026-11-29 19:42:30,900 WARNING agent.service.reporter: MQTT 127.0.0.1:1883: connection refused (broker down?); retrying in 1.4 s",
        "2026-11-29 19:42:32,300 INFO agent.service.reporter: MQTT connected to 127.0.0.1:1883 again",
        "2026-11-29 19:42:33,000 INFO simagent.events: radio_blocked: reason=start",
    ])
    parsed = measure.parse_agent_log(log)
    assert len(parsed.losses) == 1 and len(parsed.attempts) == 3 and len(parsed.connects) == 2
    assert [round(late, 3) for _, late in parsed.lateness] == [0.1, 0.0]


def test_the_first_second_after_a_loss_holds_1_27_attempts_per_terminal():
    # README: every first attempt, a quarter of the second ones (P(U0 + 2 U1 < 1) = 1/4)
    # and 1/48 of the third ones: 1 + 1/4 + 1/48 + ... = 1.27
    run = model.fleet(20_000, 10.0, random.Random(7))
    assert 1.25 < run.attempts_per_s[0] / 20_000 < 1.29
    # after a 10 s outage the returns are spread over the 8 s and 16 s windows: no second
    # sees more than a fifth of the fleet, and no one waits more than one capped delay after it
    assert max(run.connects_per_s) < 0.2 * 20_000
    assert run.back_after_s < 120
