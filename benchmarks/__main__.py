"""Run every benchmark group (a module in this package exposing ``run() -> dict``; not the
standalone commands)."""

import argparse
import importlib
import json
import pkgutil

import benchmarks

# Commands of their own, not groups: the fleet simulation runs minutes and 200 processes.
STANDALONE = {"fleet"}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", metavar="NAME", help="run one group")
    args = parser.parse_args()
    names = [m.name for m in pkgutil.iter_modules(benchmarks.__path__)
             if not m.name.startswith("_") and m.name not in STANDALONE]
    if args.only:
        if args.only not in names:
            parser.error(f"unknown group {args.only!r}; known: {', '.join(sorted(names))}")
        names = [args.only]
    figures: dict = {}
    for name in sorted(names):
        figures.update(importlib.import_module(f"benchmarks.{name}").run())
    print(json.dumps(figures, indent=None if args.json else 2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
