"""The fake's pty behaves like a USB tty for TIOCEXCL: the flag stays while its owner
has the port open and is gone once the owner died, so a restarted agent is not locked out."""

import fcntl
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest

TIOCGEXCL = 0x80045440


def exclusive(port: str) -> bool:
    fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)  # as root: TIOCEXCL does not stop us
    try:
        return bool(struct.unpack("i", fcntl.ioctl(fd, TIOCGEXCL, struct.pack("i", 0)))[0])
    finally:
        os.close(fd)


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def hold_exclusively(port: str) -> subprocess.Popen:
    """A process that opens `port`, sets TIOCEXCL, prints "held" and keeps it a minute."""
    return subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, termios, time\n"
        f"fd = os.open({port!r}, os.O_RDWR | os.O_NOCTTY)\n"
        "fcntl.ioctl(fd, termios.TIOCEXCL)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)


def test_exclusive_flag_outlives_probes_but_not_its_owner(fake_modem_process):
    modem = fake_modem_process(profile="quectel")
    owner = hold_exclusively(modem.port)
    try:
        assert owner.stdout.readline().strip() == "held"
        assert exclusive(modem.port)
        time.sleep(0.3)  # the probe's own close has been seen by the fake
        assert exclusive(modem.port), "a probe's close must not take the owner's exclusivity"
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()
    wait_until(lambda: not exclusive(modem.port))


CONTAINER_TERMINAL = r"""
import os, sys
target = sys.argv[1]
held = []
while True:  # ptys in this private devpts until one has the fake's name
    master, slave = os.openpty()
    held.append((master, slave))
    if os.ttyname(slave) == target:
        break
    if len(held) > 64:
        sys.exit("no such pty number")
print("held", flush=True)
sys.stdin.read()
"""


def test_a_containers_terminal_of_the_same_name_is_not_the_port(fake_modem_process):
    """A container (its own devpts) has /dev/pts/N names of its own: a process there holding
    its /dev/pts/N is no user of the fake's /dev/pts/N, so it must not keep a dead owner's
    flag (it did while a packaging test's container ran beside the suite)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a private devpts")
    modem = fake_modem_process(profile="quectel")
    pty = modem.state()["pty"]
    other = subprocess.Popen(
        ["unshare", "--mount", "--fork", "sh", "-c",
         f'mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts && mount --bind /dev/pts/ptmx /dev/ptmx '
         f'&& exec {sys.executable} -c "$0" {pty}', CONTAINER_TERMINAL],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = other.stdout.readline().strip()
        if line != "held":
            pytest.skip(f"no private devpts here: {other.stderr.read().strip()[-200:]}")
        owner = hold_exclusively(modem.port)
        assert owner.stdout.readline().strip() == "held"
        owner.kill()
        owner.wait()
        owner.stdout.close()
        wait_until(lambda: not exclusive(modem.port))
    finally:
        other.kill()
        other.wait()
