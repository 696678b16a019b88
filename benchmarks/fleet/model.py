"""What the agent's reconnect backoff predicts when a whole fleet loses its broker at once.

Each terminal runs the agent's own `agent.core.backoff.Backoff` with its defaults (base 1 s,
cap 120 s, full jitter: every delay uniform in [0, ceiling), the ceiling doubling per
attempt). At t = 0 every connection drops at once; a terminal waits a delay, attempts, and
while the broker is down (t < outage) the attempt is refused at once and it waits the next,
longer delay. Its first attempt at t >= outage succeeds.

Assumed, and checked by the measurement for the fleet size run on this machine: an attempt
takes no time (refused or accepted within milliseconds), the broker accepts every attempt
as fast as they come, and every terminal starts from the lowest ceiling (its last
connection was up for `stable_after`, 30 s, or it never failed: see backoff.py). Scaling
to k broker nodes assumes the terminals are spread evenly over the nodes (DNS or a load
balancer: the agent itself connects to one host).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from dataclasses import dataclass

from agent.core.backoff import Backoff
from benchmarks.fleet import measure


@dataclass(frozen=True)
class Terminal:
    attempts: list[float]  # seconds after the loss; the last one succeeded
    online_at: float


def terminal(outage_s: float, rng: random.Random) -> Terminal:
    backoff = Backoff(random=rng.random)
    t = 0.0
    attempts = []
    while True:
        t += backoff.next_delay()
        attempts.append(t)
        if t >= outage_s:
            return Terminal(attempts, t)


def per_second(times: list[float]) -> list[int]:
    """Counts in 1-second bins from t = 0 to the last time."""
    return measure.per_second(times, 0.0, max(times, default=0.0) + 1)


@dataclass(frozen=True)
class FleetRun:
    attempts_per_s: list[int]  # bin i: attempts in [i, i + 1) s after the loss
    connects_per_s: list[int]  # the successful ones
    back_after_s: float  # the last terminal's success, seconds after the broker came back
    half_back_after_s: float  # the median terminal's
    p99_back_after_s: float


def fleet(n: int, outage_s: float, rng: random.Random) -> FleetRun:
    terminals = [terminal(outage_s, rng) for _ in range(n)]
    back = sorted(term.online_at - outage_s for term in terminals)
    return FleetRun(
        attempts_per_s=per_second([t for term in terminals for t in term.attempts]),
        connects_per_s=per_second([term.online_at for term in terminals]),
        back_after_s=back[-1],
        half_back_after_s=back[len(back) // 2],
        p99_back_after_s=back[min(len(back) - 1, int(0.99 * len(back)))],
    )


def simulate(n: int, outage_s: float, runs: int, seed: int = 1) -> list[FleetRun]:
    rng = random.Random(seed)
    return [fleet(n, outage_s, rng) for _ in range(runs)]


def summary(n: int, outage_s: float, simulated: list[FleetRun]) -> dict:
    """Figures of simulated fleets: medians over the runs, and the range of the time until
    all are back (the slowest of n terminals varies most); the mean attempt curve."""
    back = sorted(run.back_after_s for run in simulated)
    length = max(len(run.attempts_per_s) for run in simulated)
    mean_attempts = [statistics.fmean(run.attempts_per_s[i] if i < len(run.attempts_per_s) else 0 for run in simulated)
                     for i in range(length)]
    return {
        "n": n,
        "outage_s": outage_s,
        "runs": len(simulated),
        "peak_attempts_per_s": statistics.median(max(run.attempts_per_s) for run in simulated),
        "peak_connects_per_s": statistics.median(max(run.connects_per_s) for run in simulated),
        "all_back_after_s": {"median": round(statistics.median(back), 1), "min": round(back[0], 1),
                             "max": round(back[-1], 1)},
        "half_back_after_s": round(statistics.median(run.half_back_after_s for run in simulated), 1),
        "p99_back_after_s": round(statistics.median(run.p99_back_after_s for run in simulated), 1),
        "mean_attempts_per_s": [round(x, 2) for x in mean_attempts],
    }


def per_node(prediction: dict, nodes: list[int]) -> dict:
    """The peak rates one broker node sees when k nodes share the fleet evenly."""
    return {str(k): {"peak_attempts_per_s": round(prediction["peak_attempts_per_s"] / k),
                     "peak_connects_per_s": round(prediction["peak_connects_per_s"] / k)} for k in nodes}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet.model",
                                     description="The backoff model for a fleet that loses its broker at once (JSON).")
    parser.add_argument("--n", type=int, default=100_000, help="terminals (default 100000)")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds the broker is down (default 10)")
    parser.add_argument("--nodes", default="1,2,4,8", help="broker node counts to share the peak over")
    parser.add_argument("--runs", type=int, default=5, help="simulated fleets (default 5)")
    args = parser.parse_args()
    prediction = summary(args.n, args.outage, simulate(args.n, args.outage, args.runs))
    curve = prediction.pop("mean_attempts_per_s")
    prediction["attempts_per_s_first_20_s"] = [round(x) for x in curve[:20]]
    prediction["per_node"] = per_node(prediction, [int(k) for k in args.nodes.split(",")])
    print(json.dumps(prediction, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
