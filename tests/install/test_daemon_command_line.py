"""`simagent run` reads its command line without argparse (agent.cli.daemon_config): the
daemon keeps whatever it imports for as long as it runs (issue 12, idle RSS). These tests
hold the short reading equal to the full parser's, and check the daemon's process really
starts without argparse."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.cli import _Unplain, daemon_config
from agent.cli.parsing import build_parser
from agent.service.daemon import run_command

PLAIN = [
    ["run"],
    ["run", "--config", "/etc/simagent/agent.toml"],
    ["--config", "/etc/simagent/agent.toml", "run"],
    ["run", "--config=/etc/simagent/agent.toml"],
    ["--config=/etc/simagent/agent.toml", "run"],
    ["run", "--config", "relative.toml"],
]
# Everything else goes to the full parser: it alone says what is wrong, or reads it.
NOT_PLAIN = [
    [],
    ["status"],
    ["run", "-h"],
    ["run", "--help"],
    ["run", "--conf", "x.toml"],  # argparse takes the abbreviation
    ["run", "--config"],  # argparse: expected one argument
    ["run", "--config", "-x"],
    ["run", "--config="],
    ["run", "--config", "run"],
    ["run", "run"],
    ["run", "--config", "a.toml", "--config", "b.toml"],
    ["run", "--state-dir", "/tmp/x"],
    ["run", "--json"],
    ["run", "extra"],
    ["run", "--", "x"],
    ["--config", "run", "x"],  # argparse: the file is "run", and "x" no command
    ["--config", "a.toml", "run", "run"],
]


@pytest.mark.parametrize("argv", PLAIN, ids=" ".join)
def test_a_plain_daemon_start_reads_as_the_full_parser_reads_it(argv):
    args = build_parser("run").parse_args(argv)
    assert args.func is run_command
    assert daemon_config(argv) == args.config


@pytest.mark.parametrize("argv", NOT_PLAIN, ids=lambda argv: " ".join(argv) or "(none)")
def test_anything_else_goes_to_the_full_parser(argv):
    with pytest.raises(_Unplain):
        daemon_config(argv)


def test_the_daemon_starts_without_argparse(tmp_path):
    """A real `simagent run` up to the point where the configuration is refused (exit 78):
    by then everything the daemon imports is imported."""
    config = tmp_path / "agent.toml"
    config.write_text("[mqtt]\nport = 'not a port'\n")
    probe = ("import sys; from agent.cli import main; code = main(['run', '--config', sys.argv[1]]); "
             "print(code, sorted(m for m in ('argparse', 'gettext', 'agent.core.checks') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, str(config)], capture_output=True, text=True, timeout=60)
    assert done.stdout.split(None, 1) == ["78", "[]\n"], done.stdout + done.stderr
    assert "mqtt" in done.stderr and "port" in done.stderr
