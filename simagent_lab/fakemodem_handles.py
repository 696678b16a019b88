"""Handles that drive a fake modem: in-process (a background thread) or the real
`simagent-fakemodem` in a subprocess, both through the same control operations.
Used by the pytest plugin, the demo and the benchmarks.
"""

from __future__ import annotations

import abc
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from simagent_lab import fakemodem
from simagent_lab.replay import ReplayState
from at_commands import profiles, transcript as at_transcript

MODEM_KEYWORDS = ("profile", "imei", "iccid", "no_sim", "imsi", "pin", "register_delay", "scan_seconds")
# replay=FILE: the fake answers as that AT transcript recorded (no other keyword applies).
REPLAY_KEYWORD = "replay"


def _check_keywords(kwargs: dict[str, Any]) -> None:
    unknown = set(kwargs) - {*MODEM_KEYWORDS, REPLAY_KEYWORD}
    if unknown:
        raise TypeError(f"fake modem: unknown option(s) {sorted(unknown)}; known: {(*MODEM_KEYWORDS, REPLAY_KEYWORD)}")
    if kwargs.get(REPLAY_KEYWORD) is not None and len(kwargs) > 1:
        raise TypeError(f"fake modem: replay= takes no other option (the transcript is the modem), got {sorted(kwargs)}")


class _ControlMixin(abc.ABC):
    """Convenience methods over ``control(op, **args)``; raise on a refused operation."""

    @abc.abstractmethod
    def control(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one control operation; the reply is {"ok": bool, "state"|"error"}."""

    def _ok(self, op: str, **args: Any) -> dict[str, Any]:
        reply = self.control(op, **args)
        if not reply.get("ok"):
            raise ValueError(f"fake modem refused {op}: {reply.get('error')}")
        return reply["state"]

    def state(self) -> dict[str, Any]:
        return self._ok("state")

    def sim_remove(self) -> dict[str, Any]:
        return self._ok("sim-remove")

    def sim_insert(self, iccid: str, **args: Any) -> dict[str, Any]:
        return self._ok("sim-insert", iccid=iccid, **args)

    def set(self, **values: Any) -> dict[str, Any]:
        return self._ok("set", **values)

    def register(self, state: str) -> dict[str, Any]:
        return self._ok("register", state=state)

    def reboot(self) -> dict[str, Any]:
        return self._ok("reboot")

    def urc(self, line: str) -> dict[str, Any]:
        return self._ok("urc", line=line)

    def replay_urc(self, every: bool = False) -> dict[str, Any]:
        """A replay's next recorded URC (``every``: all that are left)."""
        return self._ok("replay-urc", **({"all": True} if every else {}))

    def unplug(self) -> dict[str, Any]:
        return self._ok("unplug")

    def replug(self) -> dict[str, Any]:
        return self._ok("replug")

    def fault(self, kind: str, seconds: float | None = None, count: int = 1) -> dict[str, Any]:
        args: dict[str, Any] = {"kind": kind, "count": count}
        if seconds is not None:
            args["seconds"] = seconds
        return self._ok("fault", **args)


class InProcessFakeModem(_ControlMixin):
    def __init__(self, modem: fakemodem.FakeModem):
        self.modem = modem
        self.port = str(modem.link)

    def control(self, op: str, **args: Any) -> dict[str, Any]:
        return self.modem.control(op, **args)

    @property
    def transcript(self) -> list[dict[str, Any]]:
        return list(self.modem.transcript.entries)

    def stop(self) -> None:
        self.modem.stop()


def start_in_process(directory: Path, name: str = "modem", **kwargs: Any) -> InProcessFakeModem:
    _check_keywords(kwargs)
    replay = kwargs.pop(REPLAY_KEYWORD, None)
    no_sim = kwargs.pop("no_sim", False)
    profile = profiles.get(kwargs.pop("profile", "generic"))
    if no_sim:
        kwargs["iccid"] = None
    state: fakemodem.FakeModemState | ReplayState
    if replay is not None:
        state = ReplayState(at_transcript.load(replay), source=str(replay))
    else:
        state = fakemodem.FakeModemState(profile=profile, **kwargs)
    modem = fakemodem.FakeModem(directory / name, state, transcript_path=directory / f"{name}.transcript")
    return InProcessFakeModem(modem.start())


class ProcessFakeModem(_ControlMixin):
    """The real ``simagent-fakemodem`` in a subprocess, driven through its control socket."""

    def __init__(self, directory: Path, name: str, **kwargs: Any):
        _check_keywords(kwargs)
        self.port = str(directory / name)
        self.control_path = str(directory / f"{name}.ctl")
        self.transcript_path = str(directory / f"{name}.transcript")
        argv = [*_fakemodem_command(), "--link", self.port, "--control", self.control_path,
                "--transcript", self.transcript_path]
        for key, value in kwargs.items():
            if key == "no_sim":
                if value:
                    argv.append("--no-sim")
            elif value is not None:
                argv += [f"--{key.replace('_', '-')}", str(value)]
        # stderr goes to a file, not a pipe nobody reads while the fake runs: what the fake
        # says when it fails is there to show (see control).
        self.stderr_path = directory / f"{name}.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
        ready = self.proc.stdout.readline() if self.proc.stdout else ""
        if not ready.startswith("READY"):
            self.proc.wait(5)
            raise RuntimeError(f"simagent-fakemodem did not start: {self.stderr_path.read_text()}")

    def control(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            return fakemodem.control_request(self.control_path, {"op": op, **args})
        except OSError as exc:  # refused, timed out: say what the fake printed, if anything
            said = self.stderr_path.read_text().strip()
            raise RuntimeError(f"simagent-fakemodem did not answer {op!r} ({exc!r}; exit code "
                               f"{self.proc.poll()}){': ' + said if said else ''}") from exc

    @property
    def transcript(self) -> list[dict[str, Any]]:
        return fakemodem.read_transcript(self.transcript_path)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode


def _fakemodem_command() -> list[str]:
    script = Path(sys.executable).with_name("simagent-fakemodem")
    if script.exists() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "simagent_lab.fakemodem"]
