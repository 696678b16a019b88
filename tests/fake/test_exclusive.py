"""The fake's pty behaves like a USB tty for TIOCEXCL: the flag stays while its owner
has the port open and is gone once the owner died, so a restarted agent is not locked out."""

import fcntl
import os
import struct
import subprocess
import sys
import time

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


def test_exclusive_flag_outlives_probes_but_not_its_owner(fake_modem_process):
    modem = fake_modem_process(profile="quectel")
    owner = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, termios, time\n"
        f"fd = os.open({modem.port!r}, os.O_RDWR | os.O_NOCTTY)\n"
        "fcntl.ioctl(fd, termios.TIOCEXCL)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
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
