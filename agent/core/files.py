"""Reading a file that comes from outside (a config, a token file, a secret, the evidence
anchor, a device key): its content is hostile input, and so is what the path names. A FIFO
would block the reader (the daemon's whole loop, when read there), /dev/zero would fill
the memory, a huge file would too. `read_bounded` reads only a regular file, and at most
`limit` bytes of it."""

from __future__ import annotations

import os
import stat

KIB = 1024
MIB = 1024 * KIB
SECRET_MAX_BYTES = 64 * KIB  # a password file


class UnreadableFile(OSError):
    """The path is not a regular file, or is larger than the reader accepts. An OSError,
    so a caller that already answers a file it cannot read answers this one the same way
    (`strerror` is the reason alone, as for an OSError from the system)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.strerror = reason


def read_bounded(path: str | os.PathLike, limit: int) -> bytes:
    """The content of the regular file at `path`, of at most `limit` bytes. Raises
    UnreadableFile for anything else (a FIFO, a device, a directory, a larger file) and
    OSError when it cannot be opened."""
    # O_NONBLOCK: opening a FIFO with no writer would block; it is refused below unread.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnreadableFile(path, "not a regular file")
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise UnreadableFile(path, f"larger than {_size(limit)}")
    return b"".join(chunks)


def read_secret(path: str | os.PathLike) -> str:
    """The first line of a secret file (a password; the newline is not part of it). Raises
    OSError (UnreadableFile included) or UnicodeDecodeError; the caller names the setting,
    never the content."""
    lines = read_bounded(path, SECRET_MAX_BYTES).decode("utf-8").splitlines()
    return lines[0] if lines else ""


def _size(limit: int) -> str:
    for unit, name in ((MIB, "MiB"), (KIB, "KiB")):
        if limit >= unit and limit % unit == 0:
            return f"{limit // unit} {name}"
    return f"{limit} bytes"
