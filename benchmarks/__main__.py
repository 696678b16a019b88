"""Runs every benchmark group (each module here exposing `run() -> dict`), or `--only` one,
and prints one JSON object with all figures."""

import argparse
import importlib
import json
import pkgutil

import benchmarks


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object (the only output format)")
    parser.add_argument("--only", metavar="NAME", help="run one group")
    args = parser.parse_args()
    names = [m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_")]
    if args.only:
        if args.only not in names:
            parser.error(f"no benchmark group {args.only!r}; groups: {', '.join(names)}")
        names = [args.only]
    figures: dict = {}
    for name in names:
        figures.update(importlib.import_module(f"benchmarks.{name}").run())
    print(json.dumps(figures, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
