"""`simagent` command line (SPEC §8). The parser is `agent.cli.parsing`.

No traceback reaches the user: Ctrl-C, a closed pipe (``| head``) and an operating-system
refusal end with one line (or, for the pipe, quietly) and an exit code.

The daemon's own command line, ``simagent run`` with at most a ``--config FILE``, is read
here without argparse: whatever `simagent run` imports it keeps for as long as it runs, and
argparse with gettext is about 0.4 MB of a daemon that should stay under 30 MB on a small
board (issue 12). Anything else, ``run --help`` or a misspelt option included, goes to the
full parser, which alone says what is wrong; a test holds the two readings equal.
"""

from __future__ import annotations

import os
import sys

from agent import exitcodes

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader went away (`| head`)


class _Unplain(Exception):
    """The command line is not a plain daemon start."""


def daemon_config(argv: list[str]) -> str | None:
    """The ``--config`` value of a plain daemon start: ``run``, with one ``--config FILE``
    (or ``--config=FILE``) before or after it; None for no ``--config``. Raises _Unplain
    for anything else."""
    words = list(argv)
    if words == ["run"]:
        return None
    if len(words) == 3 and words[0] == "run" and words[1] == "--config":
        value = words[2]
    elif len(words) == 3 and words[0] == "--config" and words[2] == "run":
        value = words[1]
    elif len(words) == 2 and "run" in words and (option := words[1 - words.index("run")]).startswith("--config="):
        value = option.removeprefix("--config=")
    else:
        raise _Unplain
    if not value or value.startswith("-") or value == "run":
        raise _Unplain  # argparse's reading differs (an error, or `run` taken as the file)
    return value


def _run(argv: list[str]) -> int:
    try:
        config_path = daemon_config(argv)
    except _Unplain:
        from agent.cli.parsing import build_parser, command_word, dispatch
        return dispatch(build_parser(command_word(argv)), argv)
    from agent.service.daemon import run_daemon
    return run_daemon(config_path)


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print("\nsimagent: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # Nothing more can be written; stdout is pointed at /dev/null so the interpreter's
        # last flush does not complain either.
        with _suppressed_oserror():
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except OSError as exc:  # a permission, a device that is no terminal...: one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"simagent: {where}{exc.strerror or exc}", file=sys.stderr)
        return exitcodes.TEMPFAIL


class _suppressed_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, traceback) -> bool:
        return kind is not None and issubclass(kind, OSError)


if __name__ == "__main__":
    sys.exit(main())
