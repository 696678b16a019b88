"""The one exception family of the platform side; `cli.main` turns it into one line on
stderr and the exit code it carries (SPEC §8)."""

from __future__ import annotations

from agent import exitcodes


class PlatformError(Exception):
    """A failure the user reads as one line; `exit_code` is what the command returns."""

    exit_code = exitcodes.CHECK_FAILED


class UsageError(PlatformError):
    """An argument, or a file an argument names, cannot be used."""

    exit_code = exitcodes.USAGE


class BrokerUnavailable(PlatformError):
    """The broker cannot be reached, refuses us, or the link broke."""

    exit_code = exitcodes.UNAVAILABLE
