"""`simagent` command line: one sub-command per field-technician task (SPEC §8).

Each sub-command lives in the module that owns its subject; that module exposes
``add_parser(subparsers)`` which registers the sub-command(s) with
``set_defaults(func=...)``. ``func(args) -> int`` returns the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from agent import __version__, exitcodes

# Modules that register sub-commands, in the order `--help` lists them.
COMMAND_MODULES = (
    "agent.service.daemon",  # run
    "agent.cli.fieldcli",  # status, at
    "agent.cli.diag",  # diag
    "agent.cli.bind_cli",  # bind show|accept|reset
    "agent.cli.evidence_cli",  # evidence export|verify
    "agent.core.config",  # check-config
)
# The lab's sub-commands: in the pip package, not in the Debian one (no lab on terminals).
LAB_COMMAND_MODULES = (
    "simagent_lab.demo",  # demo
)


class UsageParser(argparse.ArgumentParser):
    """Usage errors exit 2 with one line (the `simagent` and `simagent-platform` parsers)."""

    def error(self, message: str) -> None:
        self.print_usage(sys.stderr)
        self.exit(exitcodes.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="simagent", description="Machine-card binding agent for IoT terminals: daemon and field-technician CLI.")
    parser.add_argument("--version", action="version", version=f"simagent {__version__}")
    parser.add_argument("--config", help="configuration file (default: $SIMAGENT_CONFIG or /etc/simagent/agent.toml)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=UsageParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    for name in LAB_COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != "simagent_lab":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parses and runs the chosen sub-command's `func(args) -> exit code` (also for
    `simagent-platform`); no sub-command prints the help and is a usage error."""
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return exitcodes.USAGE
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
