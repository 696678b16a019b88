"""asyncio AT client: a thin imperative shell around the sans-IO ``protocol.Connection``.

It owns the port exclusively (TIOCEXCL on a tty, as ModemManager does), reads with
``loop.add_reader`` + ``os.read``/``recv`` (no polling), runs one command at a time and
turns final results into return values or typed exceptions. When the port goes away
(EOF, EIO, unplug) every waiter gets ``PortLost``; nothing hangs.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
import struct
import termios
from dataclasses import dataclass
from typing import Callable, Iterable

import serial

from .protocol import (Connection, Discarded, FinalResult, Line, Prompt, ResultKind, Resynchronised,
                       Urc, NEED_DATA)

log = logging.getLogger(__name__)

# TIOCGEXCL (_IOR('T', 0x40, int), Linux >= 3.8): is the tty already exclusive? Checked
# before opening so that a root process (exempt from TIOCEXCL) still refuses a port
# another program owns.
TIOCGEXCL = 0x80045440

__all__ = ["ATClient", "Response", "ATError", "CommandError", "CommandTimeout", "PortLost",
           "PortBusy", "PortNotFound"]


class ATError(Exception):
    """Base of the AT client's errors."""


class PortNotFound(ATError):
    pass


class PortBusy(ATError):
    pass


class PortLost(ATError):
    pass


class CommandTimeout(ATError):
    def __init__(self, command: str, timeout: float):
        super().__init__(f"{command}: no final result within {timeout:g}s")
        self.command = command
        self.timeout = timeout


class CommandError(ATError):
    def __init__(self, command: str, response: "Response"):
        final = response.final
        detail = f"{final.kind.value}" + (f" {final.code}" if final.code is not None else "")
        if final.text and final.kind in (ResultKind.CME_ERROR, ResultKind.CMS_ERROR) and final.code is None:
            detail += f" {final.text}"
        super().__init__(f"{command}: {detail}")
        self.command = command
        self.response = response
        self.final = final

    @property
    def cme(self) -> tuple[int | None, str] | None:
        """(code, text) of a +CME ERROR, else None."""
        if self.final.kind is ResultKind.CME_ERROR:
            return self.final.code, self.final.text
        return None


@dataclass(frozen=True)
class Response:
    lines: list[str]
    final: FinalResult


UrcCallback = Callable[[str], None]


def _open_serial(port: str, baudrate: int) -> serial.SerialBase:
    if "://" in port:
        try:
            return serial.serial_for_url(port, baudrate=baudrate, timeout=0)
        except serial.SerialException as exc:
            raise PortNotFound(f"{port}: {exc}") from exc
    try:
        probe_fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise PortNotFound(f"{port}: no such device") from exc
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise PortBusy(f"{port}: in exclusive use by another program") from exc
        raise PortNotFound(f"{port}: {exc.strerror}") from exc
    try:
        buf = fcntl.ioctl(probe_fd, TIOCGEXCL, struct.pack("i", 0))
        if struct.unpack("i", buf)[0]:
            raise PortBusy(f"{port}: in exclusive use by another program")
    except OSError:
        pass  # not a tty or an old kernel: TIOCEXCL below still protects us
    finally:
        os.close(probe_fd)
    try:
        ser = serial.Serial(port, baudrate=baudrate, timeout=0)
    except serial.SerialException as exc:
        if exc.errno == errno.EBUSY:
            raise PortBusy(f"{port}: in exclusive use by another program") from exc
        raise PortNotFound(f"{port}: {exc}") from exc
    try:
        fcntl.ioctl(ser.fd, termios.TIOCEXCL)
    except OSError as exc:
        ser.close()
        raise PortNotFound(f"{port}: cannot take exclusive use ({exc.strerror})") from exc
    return ser


class ATClient:
    """One exclusive AT port. Create with ``await ATClient.open(port)``."""

    def __init__(self, ser: serial.SerialBase, urc_patterns: Iterable[str] = (), *,
                 resync_timeout: float = 1.0):
        self._serial = ser
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = getattr(ser, "_socket", None)
        self._fd = self._sock.fileno() if self._sock is not None else ser.fd
        if self._sock is None:
            os.set_blocking(self._fd, False)
        self._conn = Connection(urc_patterns=urc_patterns)
        self._lock = asyncio.Lock()
        self._lines: list[str] = []
        self._waiter: asyncio.Future | None = None  # FinalResult / Resynchronised / Prompt
        self._subscribers: list[UrcCallback] = []
        self.resync_timeout = resync_timeout
        self.lost: asyncio.Future = self._loop.create_future()  # result: the cause or None
        self.port = getattr(ser, "portstr", None) or getattr(ser, "port", "")
        self._loop.add_reader(self._fd, self._on_readable)

    @classmethod
    async def open(cls, port: str, *, baudrate: int = 115200, urc_patterns: Iterable[str] = (),
                   resync_timeout: float = 1.0) -> "ATClient":
        ser = _open_serial(port, baudrate)
        return cls(ser, urc_patterns, resync_timeout=resync_timeout)

    # -- public API -------------------------------------------------------------------

    @property
    def is_lost(self) -> bool:
        return self.lost.done()

    def subscribe_urcs(self, callback: UrcCallback) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    async def command(self, command: str, timeout: float = 5.0, *, check: bool = True, priority: bool = False,
                      abortable: bool = False) -> Response:
        """Send one command; return its response, or raise ``CommandError`` (when
        ``check``), ``CommandTimeout`` or ``PortLost``."""
        async with self._lock:
            self._ensure_alive()
            if self._conn.needs_resync:
                await self._resync()
            self._lines = []
            response = await self._exchange(self._conn.send_command(command), command, timeout)
        if check and not response.final.ok:
            raise CommandError(command, response)
        return response

    async def command_with_payload(self, command: str, payload: bytes, timeout: float = 5.0) -> Response:
        """A command that answers ``> `` and then takes ``payload`` (Ctrl-Z appended)."""
        async with self._lock:
            self._ensure_alive()
            if self._conn.needs_resync:
                await self._resync()
            self._lines = []
            prompt = await self._exchange(self._conn.send_command(command, expect_prompt=True), command, timeout)
            if isinstance(prompt, Response):  # answered without a prompt
                response = prompt
            else:
                response = await self._exchange(self._conn.send_payload(payload), command, timeout)
        if not response.final.ok:
            raise CommandError(command, response)
        return response

    async def send_raw_line(self, line: str, timeout: float = 10.0) -> Response:
        """For the interactive console: any final result is returned, not raised."""
        return await self.command(line, timeout, check=False)

    def close(self) -> None:
        self._shutdown(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self.lost)

    # -- internals --------------------------------------------------------------------

    def _ensure_alive(self) -> None:
        if self.lost.done():
            cause = self.lost.result()
            raise PortLost(f"{self.port}: {cause or 'closed'}")

    async def _exchange(self, data: bytes, command: str, timeout: float) -> Response | Prompt:
        waiter = self._waiter = self._loop.create_future()
        try:
            # A short command fits the tty's buffer at once: no coroutine for the write on
            # the hot path of every round trip; `_write` waits for room when it does not.
            rest = data if self._sock is not None else self._write_now(data)
            if rest:
                await self._write(rest)
            try:
                result = await self._wait(waiter, timeout)
            except TimeoutError:
                self._conn.command_timed_out()
                raise CommandTimeout(command, timeout) from None
        finally:
            self._waiter = None
        if isinstance(result, Prompt):
            return result
        return Response(self._lines, result)

    def _write_now(self, data: bytes) -> bytes:
        """Writes what the tty takes without waiting; returns the rest."""
        try:
            return data[os.write(self._fd, data):]
        except (BlockingIOError, InterruptedError):
            return data
        except OSError as exc:
            self._shutdown(exc)
            self._ensure_alive()  # raises PortLost
            raise

    async def _wait(self, waiter: asyncio.Future, timeout: float):
        # A timer on the future instead of asyncio.wait_for: no extra task per command
        # (this is the hot path of every AT round trip).
        def expire() -> None:
            if not waiter.done():
                waiter.set_exception(TimeoutError())

        timer = self._loop.call_later(timeout, expire)
        try:
            return await waiter
        finally:
            timer.cancel()

    async def _resync(self) -> None:
        for attempt in range(3):
            waiter = self._waiter = self._loop.create_future()
            try:
                await self._write(self._conn.send_probe())
                await self._wait(waiter, self.resync_timeout)
                log.debug("%s: resynchronised after %d probe(s)", self.port, attempt + 1)
                return
            except TimeoutError:
                self._ensure_alive()
                self._conn.command_timed_out()
            finally:
                self._waiter = None
        # The modem never answered ATS3? with 013: carry on rather than wedge the port.
        log.warning("%s: AT probe unanswered; continuing without resynchronisation", self.port)
        self._conn.abandon_resync()

    async def _write(self, data: bytes) -> None:
        try:
            if self._sock is not None:
                await self._loop.sock_sendall(self._sock, data)
                return
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self._fd, view)
                    view = view[n:]
                except BlockingIOError:
                    ready = self._loop.create_future()
                    self._loop.add_writer(self._fd, ready.set_result, None)
                    try:
                        await ready
                    finally:
                        self._loop.remove_writer(self._fd)
        except OSError as exc:
            self._shutdown(exc)
        self._ensure_alive()

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(65536) if self._sock is not None else os.read(self._fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EIO: the pty master or the USB device went away
            self._shutdown(exc)
            return
        if not data:
            self._shutdown(EOFError("end of file"))
            return
        self._conn.receive_data(data)
        while (event := self._conn.next_event()) is not NEED_DATA:
            self._dispatch(event)

    def _dispatch(self, event) -> None:
        if isinstance(event, Line):
            self._lines.append(event.text)
        elif isinstance(event, (FinalResult, Resynchronised, Prompt)):
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(event)
        elif isinstance(event, Urc):
            for callback in list(self._subscribers):
                try:
                    callback(event.line)
                except Exception:  # a subscriber's bug must not kill the reader
                    log.exception("URC subscriber failed on %r", event.line)
        elif isinstance(event, Discarded):
            log.debug("%s: discarded %s input %r (%d bytes)", self.port, event.reason, event.text, event.length)

    def _shutdown(self, cause: BaseException | None) -> None:
        if self.lost.done():
            return
        self._loop.remove_reader(self._fd)
        try:
            if self._sock is None:
                # The exclusive flag belongs to the tty, not to our fd: clear it, or the
                # port stays locked while anyone else (a pty master) keeps it open.
                fcntl.ioctl(self._fd, termios.TIOCNXCL)
        except OSError:
            pass
        try:
            self._serial.close()
        except Exception:  # closing a vanished device may fail; it is gone either way
            pass
        self.lost.set_result(cause)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(PortLost(f"{self.port}: {cause or 'closed'}"))
        if cause is not None:
            log.warning("%s: port lost: %s", self.port, cause)
