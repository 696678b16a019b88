"""The `simagent` parser (argparse): one sub-command per field-technician task (SPEC §8).

Each sub-command lives in the module that owns its subject; that module exposes
``add_parser(subparsers)`` which registers the sub-command(s) with
``set_defaults(func=...)``. ``func(args) -> int`` returns the exit code.

One parser convention (SPEC §8): the global options (``--config``, ``--state-dir``,
``--json``) are added here to the top parser and to every sub-command's, so they are
accepted before or after the sub-command (a sub-parser's copy has no default of its own,
so it never overwrites a value given before); a usage error is one line with the usage
of the sub-command it concerns, exit 2. No traceback reaches the user: Ctrl-C, a closed
pipe (``| head``) and an operating-system refusal end with one line (or, for the pipe,
quietly) and an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from agent import __version__, exitcodes

# Sub-command -> the module that registers it, in the order `--help` lists them.
COMMAND_MODULES = {
    "run": "agent.service.daemon",
    "status": "agent.cli.fieldcli",
    "at": "agent.cli.fieldcli",
    "diag": "agent.cli.diag",
    "bind": "agent.cli.bind_cli",  # bind show|accept|reset
    "evidence": "agent.cli.evidence_cli",  # evidence export|verify
    "check-config": "agent.core.config",
}
# The lab's sub-commands: in the pip package, not in the Debian one (no lab on terminals).
LAB_COMMAND_MODULES = {
    "demo": "simagent_lab.demo",
}


class UsageParser(argparse.ArgumentParser):
    """Usage errors exit 2 with one line naming the command whose ``-h`` helps (the
    `simagent` and `simagent-platform` parsers)."""

    def error(self, message: str) -> None:
        self.exit(exitcodes.USAGE, f"{self.prog}: error: {message} (see: {self.prog} -h)\n")


def add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--config``, ``--state-dir`` and ``--json``; on a sub-parser without defaults
    (argparse.SUPPRESS), so a value given before the sub-command stands."""
    if "--config" in parser._option_string_actions:
        return
    unset = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--config", metavar="FILE", **unset,
                        help="configuration file (default: $SIMAGENT_CONFIG or /etc/simagent/agent.toml)")
    parser.add_argument("--state-dir", metavar="DIR", **unset,
                        help="state directory (default: the configuration's [device] state_dir)")
    parser.add_argument("--json", action="store_true", **({} if top else {"default": argparse.SUPPRESS}),
                        help="machine-readable output, where the command prints data")


def _sub_parsers(parser: argparse.ArgumentParser):
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield sub


def _give_every_command_the_global_options(parser: argparse.ArgumentParser) -> None:
    for sub in _sub_parsers(parser):
        add_global_options(sub, top=False)
        sub.set_defaults(usage_parser=sub)  # a later usage error names this sub-command's usage
        _give_every_command_the_global_options(sub)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `simagent` parser; with a known `command`, only the module that owns it is
    imported and registered: a module's imports are the process's memory, and for
    `simagent run` that is the daemon's, for as long as it runs (about 1.2 MB for the
    other commands' modules)."""
    parser = UsageParser(prog="simagent", description="Machine-card binding agent for IoT terminals: daemon and field-technician CLI.")
    parser.add_argument("--version", action="version", version=f"simagent {__version__}")
    add_global_options(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=UsageParser)
    owners = {**COMMAND_MODULES, **LAB_COMMAND_MODULES}
    for name in dict.fromkeys([owners[command]] if command in owners else owners.values()):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if name not in LAB_COMMAND_MODULES.values() or exc.name != "simagent_lab":
                raise
            continue
        module.add_parser(subparsers)
    _give_every_command_the_global_options(parser)
    return parser


def command_word(argv: list[str] | None) -> str | None:
    """The sub-command `argv` names, read past the global options (and their values) the
    way the full parser reads them; None when there is none."""
    finder = _CommandFinder(add_help=False)
    add_global_options(finder, top=True)
    finder.add_argument("command", nargs="?")
    try:
        known, _ = finder.parse_known_args(argv)
    except _NoCommand:  # a usage error: the full parser says it
        return None
    return known.command


class _NoCommand(Exception):
    pass


class _CommandFinder(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise _NoCommand(message)


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parses and runs the chosen sub-command's `func(args) -> exit code` (also for
    `simagent-platform`); no sub-command prints the help and is a usage error."""
    args, extras = parser.parse_known_args(argv)
    if extras:  # with the usage of the sub-command the words were given to
        getattr(args, "usage_parser", parser).error(f"unrecognized arguments: {' '.join(extras)}")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return exitcodes.USAGE
    return args.func(args)
