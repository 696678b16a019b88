"""A mosquitto of our own on a loopback port: for the demo, the benchmarks and the tests.

It is started from the Debian package's binary with a generated configuration in a
directory the caller owns, so it never touches a system broker.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_password_line(user: str, password: str) -> str:
    """mosquitto's `$7$` format (PBKDF2-SHA512, 101 rounds), as mosquitto_passwd writes it."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"{user}:$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"



@dataclass
class Broker:
    """`tls` is anything with `ca_file`, `server_cert` and `server_key` paths."""

    directory: Path
    tls: Any = None
    require_certificate: bool = False
    users: dict[str, str] | None = None
    acl: str | None = None
    persistence: bool = False  # sessions and queued messages survive stop()/start()
    sys_interval: int | None = None  # seconds between $SYS/broker/# updates (None: mosquitto's 10 s)
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    def config(self) -> str:
        persistence = ["persistence true", f"persistence_location {self.directory}/"] if self.persistence else ["persistence false"]
        lines = [f"listener {self.port} {self.host}", *persistence, f"log_dest file {self.log_path}",
                 "log_type error", "log_type warning", "log_type notice", "log_type information"]
        if self.sys_interval is not None:
            lines.append(f"sys_interval {self.sys_interval}")
        if os.geteuid() == 0:
            lines.insert(0, "user root")  # keep access to the files in pytest's 0700 tmp dirs
        if self.tls:
            lines += [f"cafile {self.tls.ca_file}", f"certfile {self.tls.server_cert}", f"keyfile {self.tls.server_key}",
                      f"require_certificate {'true' if self.require_certificate else 'false'}"]
        if self.users is not None:
            passwords = self.directory / "passwords"
            passwords.write_text("".join(mosquitto_password_line(u, p) + "\n" for u, p in self.users.items()))
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            (self.directory / "acl").write_text(self.acl.strip() + "\n")
            lines.append(f"acl_file {self.directory / 'acl'}")
        return "\n".join(lines) + "\n"

    def start(self) -> "Broker":
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "mosquitto.conf"
        conf.write_text(self.config())
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.process.stderr.read().decode(errors='replace')}\n{self.log()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log()}")
                time.sleep(0.01)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def reload(self, *, acl: str | None = None) -> None:
        """Rewrites the ACL and makes mosquitto re-read it (SIGHUP)."""
        if acl is not None:
            self.acl = acl
            (self.directory / "acl").write_text(acl.strip() + "\n")
        self.process.send_signal(1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
