"""`python -m benchmarks.fleet`: N agents and N fake modems against one mosquitto, a broker
restart, and the figures (JSON on stdout; `--json FILE` adds the per-second series,
`--plot FILE` draws them). See the README, "Fleet simulation"."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from benchmarks.fleet.scenario import Scenario, run


def end_on_signals() -> None:
    """SIGTERM and SIGHUP unwind through the fleet's clean-up as Ctrl-C does; SIGINT too when
    started in the background (a shell starts background jobs with SIGINT ignored)."""
    def exit_on_signal(signum, frame) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, exit_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    defaults = Scenario()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__)
    parser.add_argument("--n", type=int, default=defaults.n, help=f"agents and fake modems (default {defaults.n})")
    parser.add_argument("--outage", type=float, default=defaults.outage_s,
                        help=f"seconds the broker stays down (default {defaults.outage_s:.0f})")
    parser.add_argument("--settle", type=float, default=defaults.settle_s,
                        help=f"seconds all online before the swaps (default {defaults.settle_s:.0f})")
    parser.add_argument("--swap-share", type=float, default=defaults.swap_share,
                        help=f"share of the fleet swapped before the outage, and again during it (default {defaults.swap_share})")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write everything, series included")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="draw the run (needs the [fleet] extra: matplotlib)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (logs, stores, broker)")
    parser.add_argument("--replot", type=Path, metavar="FILE",
                        help="no run: draw --plot from a --json FILE of an earlier run")
    args = parser.parse_args(argv)
    if args.plot is not None:
        try:
            from benchmarks.fleet import plot  # before the run: a missing matplotlib fails at once
        except ImportError as exc:
            parser.error(f"--plot needs matplotlib ({exc}): pip install -e '.[fleet]' (./dev.sh fleet does)")
    if args.replot is not None:
        if args.plot is None:
            parser.error("--replot needs --plot")
        plot.render(json.loads(args.replot.read_text()), args.plot)
        return 0
    scenario = Scenario(n=args.n, outage_s=args.outage, settle_s=args.settle, swap_share=args.swap_share)

    directory = Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp"))  # short: AF_UNIX paths inside
    try:
        result = run(scenario, directory, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except KeyboardInterrupt:  # the fleet is already ended (run's clean-up)
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"run directory kept: {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot is not None:
        plot.render(result, args.plot)
    summary = {k: v for k, v in result.items() if k != "series"}
    summary["model"] = {k: v for k, v in result["model"].items() if k != "mean_attempts_per_s_from_loss"}
    print(json.dumps(summary, indent=2))
    return 0 if result["events"]["lost"] == 0 else 1


if __name__ == "__main__":
    end_on_signals()  # here, not in main(): a test that calls main() keeps pytest's handlers
    raise SystemExit(main())
