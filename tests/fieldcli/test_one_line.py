"""Issue 13 item 2: one parser convention and one line per mistake. Every sub-command
takes the global options before or after it; each wrong input, signal (Ctrl-C, SIGPIPE)
or permission problem ends with one line on stderr, no traceback, and the exit code of
SPEC §8 (130 for Ctrl-C, 141 silently for a reader that went away)."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

MISSING = "/nonexistent/agent.toml"


def simagent(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=30, **kwargs)


def assert_one_line(done: subprocess.CompletedProcess, code: int) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == code and len(lines) == 1 and "Traceback" not in done.stderr, (done.returncode, done.stderr)
    return lines[0]


WRONG = [
    # (argv after `--config GOOD`, exit code, a word of the one line)
    (["nosuch"], 2, "invalid choice"),
    (["status", "--jsno"], 2, "simagent status: error: unrecognized arguments: --jsno"),
    (["status", "--profile", "nokia"], 2, "simagent status"),
    (["status", "--port", "/etc/passwd"], 69, "not a serial port"),
    (["status", "--port", "/nonexistent/ttyUSB9"], 69, "no such device"),
    (["at", "--port"], 2, "simagent at"),
    (["at", "--port", "/etc/passwd", "ATI"], 69, "not a serial port"),
    (["at", "AT+CSQ", "AT+CFUN=4", "ATI"], 1, "AT+CFUN=4: refused"),
    (["at", "--unsafe", 'AT+EGMR=1,7,"864505040000021"'], 1, "refused"),
    (["diag", "--bundel", "x"], 2, "simagent diag"),
    (["bind"], 2, "simagent bind"),
    (["bind", "frobnicate"], 2, "invalid choice"),
    (["bind", "accept"], 2, "simagent bind accept"),
    (["bind", "reset"], 2, "--reason"),
    (["bind", "show", "--bogus"], 2, "simagent bind show: error: unrecognized arguments: --bogus"),
    (["evidence"], 2, "simagent evidence"),
    (["evidence", "export", "--since", "yesterday-ish"], 2, "since"),
    (["evidence", "verify"], 2, "simagent evidence verify"),
    (["check-config", "--bogus"], 2, "simagent check-config"),
    (["run", "--bogus"], 2, "simagent run"),
    # --config after the sub-command (and deeper) is the one used
    (["status", "--config", MISSING], 78, MISSING),
    (["at", "ATI", "--config", MISSING], 78, MISSING),
    (["bind", "--config", MISSING, "show"], 78, MISSING),
    (["bind", "show", "--config", MISSING], 78, MISSING),
    (["evidence", "export", "--config", MISSING], 78, MISSING),
    (["check-config", "--config", MISSING], 78, MISSING),
    (["run", "--config", MISSING], 78, MISSING),
]


@pytest.mark.parametrize(("argv", "code", "word"), WRONG, ids=[" ".join(a) for a, _c, _w in WRONG])
def test_every_wrong_input_is_one_line_and_its_exit_code(cli, argv, code, word):
    line = assert_one_line(simagent("--config", str(cli.config), *argv), code)
    assert word in line, line


def test_global_options_before_or_after_the_sub_command(cli, registered_modem):
    fm = registered_modem(profile="quectel")
    for argv in (["--json", "--config", str(cli.config), "status", "--port", fm.port],
                 ["status", "--port", fm.port, "--json", "--config", str(cli.config)],
                 ["status", "--config", str(cli.config), "--state-dir", str(cli.state_dir), "--port", fm.port, "--json"]):
        done = simagent(*argv)
        assert done.returncode == 0, (argv, done.stderr)
        assert json.loads(done.stdout)["modem"]["imei"] == fm.state()["imei"]
    shown = simagent("bind", "show", "--json", "--state-dir", str(cli.state_dir), "--config", str(cli.config))
    assert shown.returncode in (0, 1) and "Traceback" not in shown.stderr
    help_ = simagent("bind", "accept", "-h")
    assert help_.stdout.startswith("usage: simagent bind accept") and "--config" in help_.stdout


def test_a_reader_that_goes_away_gets_no_traceback(cli, registered_modem):
    fm = registered_modem(profile="quectel")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cli.config), "status", "--port", fm.port],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # `| head -c0`: gone before the first byte is written
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 141 and err == "", err


def interruptible() -> None:
    """Ctrl-C as at a terminal: a suite started in the background (`cmd &` from a script)
    hands its children SIGINT ignored, and a program keeps an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_a_hung_modem_is_opened_is_one_line(cli, registered_modem):
    fm = registered_modem(profile="quectel")
    fm.fault("hang")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cli.config), "status", "--port", fm.port],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    time.sleep(1.0)  # importing and opening: the AT probe waits for the hung module
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.strip() == "simagent: interrupted" and out == "", err


def _console(cli, fm, key: bytes) -> tuple[int, str, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cli.config), "at", "--port", fm.port],
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 20
    while b"AT> " not in seen and time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            seen += os.read(master, 4096)
    assert b"AT> " in seen, seen
    time.sleep(0.3)  # readline has written the prompt; let it wait for a key, as a person's Ctrl-C finds it
    if key == b"SIGINT":
        proc.send_signal(signal.SIGINT)
    else:
        os.write(master, key)
    _out, err = proc.communicate(timeout=20)
    with __import__("contextlib").suppress(OSError):
        while select.select([master], [], [], 0.2)[0]:
            chunk = os.read(master, 4096)
            if not chunk:
                break
            seen += chunk
    os.close(master)
    return proc.returncode, seen.decode(errors="replace"), err


@pytest.mark.parametrize("key", [b"\x04", b"SIGINT"], ids=["ctrl-d", "ctrl-c"])
def test_the_at_console_ends_cleanly_on_its_own_line(cli, registered_modem, key):
    fm = registered_modem(profile="quectel")
    code, screen, err = _console(cli, fm, key)
    assert code == 0 and "Traceback" not in err and err == "", err
    assert screen.endswith("AT> \r\n"), repr(screen[-40:])  # the shell's prompt starts on a line of its own


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the daemon as an unprivileged user")
def test_run_with_an_unreadable_state_dir_is_one_line():
    tmp_path = Path(tempfile.mkdtemp(prefix="sa-perm-", dir="/tmp"))  # pytest's tmp_path is root's alone
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    config = tmp_path / "agent.toml"
    config.write_text(f'[device]\nstate_dir = "{locked}/state"\n[control]\nsocket = "{tmp_path}/c.sock"\n'
                      '[modem]\nport = "/nonexistent/ttyUSB0"\n')
    os.chmod(tmp_path, 0o755)
    os.chmod(config, 0o644)

    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed")
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "agent",
                           "run", "--config", str(config)], capture_output=True, text=True, timeout=30,
                          cwd="/", env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    shutil.rmtree(tmp_path, ignore_errors=True)
    line = assert_one_line(done, 75)
    assert str(locked) in line and "Permission denied" in line


def test_a_port_another_program_locked_with_flock_is_busy(cli, registered_modem):
    """pyserial's exclusive=True takes a flock, not TIOCEXCL: still another program's port."""
    import fcntl

    fm = registered_modem(profile="quectel")
    fd = os.open(fm.port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = assert_one_line(simagent("--config", str(cli.config), "status", "--port", fm.port), 69)
        assert "held by another program" in line, line
    finally:
        os.close(fd)


def test_bind_help_and_reset_say_what_they_do(cli):
    assert "- to read it from stdin" in simagent("bind", "accept", "-h").stdout
    if os.geteuid() != 0:
        pytest.skip("bind reset needs root")
    cli.config.write_text(cli.config.read_text() + '[binding]\nmode = "first-use"\n')
    done = simagent("bind", "reset", "--reason", "RMA 7", "--config", str(cli.config), "--state-dir", str(cli.state_dir))
    assert done.returncode == 0, done.stderr
    assert "bound to this terminal again at the next check" in done.stdout
