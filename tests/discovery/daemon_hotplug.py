"""Child process for the daemon hot-plug test: udev add/remove drive `simagent run`.

Run as ``umockdev-wrapper /usr/bin/python3 daemon_hotplug.py REPO DATA_DIR``. The system
interpreter (python3-gi) drives umockdev's Testbed; the daemon under test runs as a
subprocess with the venv's python and inherits LD_PRELOAD and $UMOCKDEV_DIR, so its
libudev, /sys and /dev are the testbed's. Steps:

1. no modem: READY=1 with STATUS "waiting for modem";
2. a Quectel EC25 is plugged in, its secondary AT port (/dev/ttyUSB3) a moment after
   the others: the daemon opens that port, which umockdev backs with a pty whose master
   is bridged here to a fake modem, and decides the binding (`bound`);
3. the modem is unplugged (ptys hung up, remove uevents, sysfs gone): `modem_lost`;
4. it is plugged in again (as /dev/ttyUSB4-7): the binding check says `ok`.

Prints one JSON object: per step the daemon's STATUS and which ttys it opened how long
after the plug began, its evidence log, its exit code and the tail of its log; on a
failure also "error", the notify messages and the ttys opened so far.
"""

import asyncio
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tty
from pathlib import Path

REPO, DATA = sys.argv[1], sys.argv[2]
sys.path[:0] = [REPO, *glob.glob(f"{REPO}/.venv/lib/python3*/site-packages")]

import gi  # noqa: E402

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402

from simagent_lab.fakemodem_handles import start_in_process  # noqa: E402

VENV_PYTHON = f"{REPO}/.venv/bin/python"
STEP_TIMEOUT = 8.0  # generous: other test runs share the machine
ENUMERATION_GAP = 0.3  # between the modem's primary and secondary AT ports appearing


class TtyIoctls(UMockdev.IoctlBase):
    """umockdev forwards ioctls on its device nodes to the testbed and answers the ones it
    does not emulate with ENOTTY, so the daemon's TIOCEXCL (and pyserial's TIOCMBIS) would
    fail on a node that is a real pty. This runs each ioctl on the pty itself, as a real
    tty would, and notes when a device was first touched (= opened by the daemon)."""

    def __init__(self) -> None:
        super().__init__()
        self.first_use: dict[str, float] = {}

    def do_handle_ioctl(self, client) -> bool:  # runs in umockdev's worker thread
        self.first_use.setdefault(client.get_devnode(), time.monotonic())
        result, error = client.execute()
        client.complete(result, error)
        return True


class PtyBridge:
    """Copies bytes between the master of the testbed's tty node and a fake modem's pty:
    the daemon's /dev/ttyUSB3 then talks to a real `FakeModem`."""

    def __init__(self, master: int, modem_port: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.master = master
        self.modem = os.open(modem_port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.modem)
        os.set_blocking(master, False)
        self.retry: asyncio.TimerHandle | None = None
        self.loop.add_reader(self.modem, self._copy, self.modem, self.master)
        self.loop.add_reader(self.master, self._copy, self.master, self.modem)

    def _copy(self, source: int, target: int) -> None:
        try:
            data = os.read(source, 4096)
        except BlockingIOError:
            return
        except OSError:
            # EIO on the master while nobody has the tty open (before the daemon opens
            # it): look again a little later instead of spinning on a readable fd.
            self.loop.remove_reader(source)
            self.retry = self.loop.call_later(0.02, self.loop.add_reader, source, self._copy, source, target)
            return
        try:
            os.write(target, data)
        except OSError:
            pass  # the other end is gone; the modem is being unplugged

    def close(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
        self.loop.remove_reader(self.modem)
        self.loop.remove_reader(self.master)
        os.close(self.modem)


class NotifyListener:
    """$NOTIFY_SOCKET as systemd provides it, read on the loop."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.messages: list[dict] = []

    async def wait_for(self, predicate, timeout: float = STEP_TIMEOUT) -> dict:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                data = await loop.sock_recv(self.sock, 4096)
                message = dict(line.split("=", 1) for line in data.decode().split("\n"))
                self.messages.append(message)
                if predicate(message):
                    return message


def status_starts(prefix: str):
    return lambda message: message.get("STATUS", "").startswith(prefix)


class Modem:
    """One plugged-in Quectel EC25 on USB port `busport`, its ttys numbered from `first_tty`:
    testbed devices, the fake modem behind the secondary AT port, and the bridge."""

    def __init__(self, testbed, ioctls: TtyIoctls, workdir: Path, busport: str, first_tty: int) -> None:
        self.testbed = testbed
        self.ioctls = ioctls
        self.usb_device = f"/sys/devices/pci0000:00/0000:00:14.0/usb1/{busport}"
        self.ttys = {f"/dev/ttyUSB{first_tty + n}": f"{self.usb_device}/{busport}:1.{n}/ttyUSB{first_tty + n}/tty/ttyUSB{first_tty + n}"
                     for n in range(4)}
        self.at_port = f"/dev/ttyUSB{first_tty + 3}"  # interface 3: the secondary AT port
        self.description = quectel_description(busport, first_tty)
        self.secondary_interface = f"/{busport}:1.3"
        self.fake = start_in_process(workdir, busport, profile="quectel")
        for devnode in self.ttys:  # before the nodes exist: the daemon may open one at once
            testbed.attach_ioctl(devnode, ioctls)
        self.bridge: PtyBridge | None = None
        self.held: list[int] = []

    async def plug(self) -> None:
        """The add uevents go out as the devices are created. The kernel creates the
        ttys one interface after another, so the secondary AT port comes a moment after
        the primary one: a daemon that took the first AT port it saw would open the
        primary port here."""
        self.plugged_at = time.monotonic()
        devices = self.description.split("\n\n")
        self.testbed.add_from_string("\n\n".join(d for d in devices if self.secondary_interface not in d))
        await asyncio.sleep(ENUMERATION_GAP)
        self.testbed.add_from_string("\n\n".join(d for d in devices if self.secondary_interface in d))
        self.bridge = PtyBridge(self.testbed.get_dev_fd(self.at_port), self.fake.port)

    def unplug(self) -> None:
        self.bridge.close()
        # The kernel hangs the ttys up, then sends the remove uevents. The testbed keeps
        # (and closes at the end) the pty masters it made; pointing those fds at
        # /dev/null releases the masters, so the daemon's read sees the hang-up, without
        # a double close later. The slaves are held open here so that the next plug gets
        # new pty numbers: umockdev keeps a map entry per pty name and aborts on a reused
        # one.
        null = os.open(os.devnull, os.O_RDWR)
        for devnode in self.ttys:
            self.held.append(os.open(os.readlink(self.testbed.get_root_dir() + devnode), os.O_RDWR | os.O_NOCTTY))
            os.dup2(null, self.testbed.get_dev_fd(devnode))
        os.close(null)
        for syspath in self.ttys.values():
            self.testbed.uevent(syspath, "remove")
            self.testbed.remove_device(syspath)  # node, class link, sysfs
        self.testbed.remove_device(self.usb_device)
        self.fake.modem.stop()

    def opened(self) -> dict[str, float]:
        """Device node -> seconds from the plug until the daemon first used it."""
        return {dev: round(t - self.plugged_at, 3) for dev, t in sorted(self.ioctls.first_use.items()) if dev in self.ttys}

    def close(self) -> None:
        for fd in self.held:
            os.close(fd)


def quectel_description(busport: str, first_tty: int) -> str:
    """data/quectel-ec25.umockdev on another USB port and tty numbers, parents first.

    umockdev sends each device's add uevent as it creates it; the kernel creates the USB
    device and its interfaces before their ttys, so a listener in another process must
    not get a tty's add before its ancestors' attributes exist (the recorded file lists
    children first). And umockdev cannot create a pty-backed node again under a name it
    has removed (its table of pty masters keeps the name), so a re-plugged modem gets
    new ttys - as the kernel does when the old nodes are still held open."""
    text = Path(f"{DATA}/quectel-ec25.umockdev").read_text()
    text = re.sub(r"ttyUSB(\d)", lambda m: f"ttyUSB{first_tty + int(m[1])}", text)
    text = re.sub(r"dev=188:(\d)", lambda m: f"dev=188:{first_tty + int(m[1])}", text)
    text = text.replace("1-2", busport).replace("bus/usb/001/002", f"bus/usb/001/{busport[2:]:0>3}")
    devices = [block.strip() for block in text.split("\n\n") if block.strip()]
    return "\n\n".join(sorted(devices, key=lambda block: block.splitlines()[0].count("/")))


def write_config(workdir: Path) -> Path:
    with socket.socket() as probe:  # a loopback port nobody listens on: MQTT stays down
        probe.bind(("127.0.0.1", 0))
        mqtt_port = probe.getsockname()[1]
    config = workdir / "agent.toml"
    config.write_text(f"""
[device]
id = "imei"
state_dir = "{workdir / 'state'}"

[modem]
port = "auto"
port_role = "secondary"
profile = "auto"
command_timeout = 2.0

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}

[mqtt.tls]
enabled = false

[control]
socket = "{workdir / 'control.sock'}"

[log]
level = "debug"
""")
    return config


async def scenario(testbed, workdir: Path) -> dict:
    config = write_config(workdir)
    notify = NotifyListener(str(workdir / "notify"))
    env = {**os.environ, "UMOCKDEV_DIR": testbed.get_root_dir(), "NOTIFY_SOCKET": str(workdir / "notify")}
    ioctls = TtyIoctls()
    modems: list[Modem] = []
    log = open(workdir / "daemon.log", "wb")
    daemon = subprocess.Popen([VENV_PYTHON, "-m", "agent", "run", "--config", str(config)],
                              env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    result: dict = {"steps": {}}
    try:
        ready = await notify.wait_for(lambda m: m.get("READY") == "1", timeout=20)
        result["steps"]["start"] = {"status": ready.get("STATUS")}

        modems.append(modem := Modem(testbed, ioctls, workdir, "1-2", 0))
        await modem.plug()
        bound = await notify.wait_for(status_starts("binding "))
        result["steps"]["plug"] = {"status": bound["STATUS"], "opened": modem.opened(), "at_port": modem.at_port}

        modem.unplug()
        waiting = await notify.wait_for(status_starts("waiting for modem"))
        result["steps"]["unplug"] = {"status": waiting["STATUS"]}

        modems.append(modem := Modem(testbed, ioctls, workdir, "1-3", 4))
        await modem.plug()
        again = await notify.wait_for(status_starts("binding "))
        result["steps"]["replug"] = {"status": again["STATUS"], "opened": modem.opened(), "at_port": modem.at_port}

        result["evidence"] = evidence(config, env)
        daemon.send_signal(signal.SIGTERM)
        result["exit_code"] = await asyncio.to_thread(daemon.wait, 10)
        modem.unplug()
    except Exception as exc:  # reported with the daemon's log, for the test to show
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["notify"] = notify.messages
        result["opened"] = sorted(ioctls.first_use)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        for modem in modems:
            modem.close()
        log.close()
        result["log"] = (workdir / "daemon.log").read_text(errors="replace")[-4000:]
    return result


def evidence(config: Path, env: dict) -> list[dict]:
    """The daemon's evidence log, exported through its control socket."""
    export = subprocess.run([VENV_PYTHON, "-m", "agent", "--config", str(config), "evidence", "export"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    if export.returncode:
        raise RuntimeError(f"evidence export failed ({export.returncode}): {export.stderr}")
    return json.loads(export.stdout)["entries"]


def main() -> None:
    testbed = UMockdev.Testbed.new()
    with tempfile.TemporaryDirectory(prefix="sa-hp-", dir="/tmp") as name:  # short AF_UNIX paths
        result = asyncio.run(scenario(testbed, Path(name)))
    print(json.dumps(result))


main()
