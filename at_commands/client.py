"""asyncio AT client: a thin imperative shell around the sans-IO ``protocol.Connection``.

It owns the port exclusively (TIOCEXCL on a tty, as ModemManager does), reads with
``loop.add_reader`` + ``os.read``/``recv`` (no polling), runs one command at a time and
turns final results into return values or typed exceptions. When the port goes away
(EOF, EIO, unplug) every waiter gets ``PortLost``; nothing hangs.

The channel (who sends next) is a small scheduler: ``priority=True`` callers (the radio
gate) go before every other waiter, FIFO within a class, and a non-priority caller that
is about to send steps back when a priority caller is waiting. A priority caller that
finds an abortable non-priority command in flight aborts it (one ``ABORT_BYTE``); that
caller gets ``CommandAborted``. If the aborted command's final result does not come
within ``abort_grace`` it is given up like a timeout.

A caller that leaves (timeout or cancellation, while queued, writing, waiting or
resynchronising) leaves the core desynchronised, never wedged: the next command probes
first. ``max_failures`` consecutive timeouts (commands or probes) close the port, as
ModemManager does: ``lost`` resolves with "unresponsive: N consecutive timeouts" and
every waiter gets ``PortLost``; whoever owns the port reopens it. Any answer resets the
count.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import fcntl
import logging
import os
import socket
import struct
import termios
import time
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

import serial

from .commands import is_abortable
from .transcript import Recorder
from .protocol import (Aborted, Connection, Discarded, FinalResult, Line, Prompt, ResultKind,
                       Resynchronised, State, Urc, NEED_DATA)

log = logging.getLogger(__name__)

# TIOCGEXCL (_IOR('T', 0x40, int), Linux >= 3.8): is the tty already exclusive? Checked
# before opening so that a root process (exempt from TIOCEXCL) still refuses a port
# another program owns.
TIOCGEXCL = 0x80045440

__all__ = ["ATClient", "Response", "ATError", "CommandError", "CommandTimeout", "CommandAborted",
           "PortLost", "PortBusy", "PortNotFound"]


# How long a caller's command that cannot be aborted may still keep a waiting priority
# command off the channel before it is given up (SPEC §3: no caller delays the gate).
PRIORITY_WAIT = 0.1
# How often the abort byte is repeated while an aborted command has not ended.
ABORT_REPEAT = 0.02
# How long the gate's own resynchronisation probe waits for its answer.
PRIORITY_PROBE_WAIT = 0.5
# An error final while probing may be the probe's own answer from a module still busy
# (+CME ERROR: 14 to ATS3?): the module is alive, so the next probe goes at once rather
# than after the probe's wait - this many times per resynchronisation. (Only errors: an
# older probe's late OK would otherwise chain re-probes; a probe is never answered OK
# without its marker.)
PROBE_REFUSALS_AT_ONCE = 5
# The gate's radio command still unanswered this long after it was written, when the
# module speaks (a URC), is taken as lost - sent into a hang that has since ended - and
# given up, so that the gate sends it again at once instead of after its timeout (a
# card pushed in meanwhile would register). A module still executing it answers the
# repeat as well: +CFUN and +CGATT are idempotent.
RADIO_LOST_AFTER = 0.5
# Priority levels: a caller's command (0), the radio gate's reads (GATE_READ) and its
# radio commands (GATE_RADIO). Both gate levels go before every caller; a command in
# flight of a lower level than one that arrives is aborted (an abortable caller command)
# or given up after PRIORITY_WAIT, so not even the gate's own read can hold off +CFUN=4.
GATE_READ, GATE_RADIO = 1, 2
# Set (per task) by the radio gate's tasks: all their commands have that priority.
GATE_PRIORITY: contextvars.ContextVar[int] = contextvars.ContextVar("at_gate_priority", default=0)


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


class CommandAborted(ATError):
    """The command was aborted for a priority command. ``response`` holds the final
    result that ended it (None if none came within the grace)."""

    def __init__(self, command: str, response: "Response | None"):
        ended = response.final.text if response is not None else "no final result"
        super().__init__(f"{command}: aborted for a priority command ({ended})")
        self.command = command
        self.response = response


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


class _Channel:
    """Who uses the AT channel next: priority waiters first, FIFO within a class.

    Cancellation-safe: a waiter cancelled while queued leaves the queue; one cancelled
    after it was granted the channel passes it on."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queues: tuple[deque, deque] = (deque(), deque())  # priority, normal
        self.busy = False

    def priority_waiting(self) -> bool:
        return any(not f.done() for f in self._queues[0])

    async def acquire(self, priority: bool, *, front: bool = False) -> None:
        if not self.busy and not any(self._queues):
            self.busy = True
            return
        queue = self._queues[0 if priority else 1]
        granted = self._loop.create_future()
        queue.appendleft(granted) if front else queue.append(granted)
        try:
            await granted
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.release()  # granted, then cancelled before it ran
            else:
                try:
                    queue.remove(granted)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        for queue in self._queues:
            while queue:
                granted = queue.popleft()
                if not granted.done():
                    granted.set_result(None)  # handed over: stays busy
                    return
        self.busy = False


@dataclass
class _InFlight:
    """The exchange on the wire: what a priority caller needs to abort it."""

    waiter: asyncio.Future
    abortable: bool
    priority: int  # 0 (a caller), GATE_READ or GATE_RADIO
    timer: asyncio.TimerHandle | None = None  # set once the line is written
    abort_wanted: bool = False  # a priority caller came while the line was being written
    aborted: bool = False
    interrupted: bool = False  # the module restarted: no answer will come (see interrupt())
    given_up: bool = False  # a caller's command given up for a waiting priority command
    give_up_timer: asyncio.TimerHandle | None = None
    written_at: float | None = None  # loop time the line was out
    abort_bytes: bytes = b""
    abort_repeat: asyncio.TimerHandle | None = None


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


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
        try:  # a program that locks the port the pyserial way (exclusive=True: flock) holds it too
            fcntl.flock(probe_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(probe_fd, fcntl.LOCK_UN)
        except BlockingIOError:
            raise PortBusy(f"{port}: locked by another program (flock)") from None
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
        if f"({errno.ENOTTY}," in str(exc):  # "Could not configure port: (25, 'Inappropriate ioctl for device')"
            raise PortNotFound(f"{port}: not a serial port (no terminal device): name the modem's AT port, "
                               "e.g. /dev/ttyUSB2") from exc
        raise PortNotFound(f"{port}: {exc}") from exc
    try:
        fcntl.ioctl(ser.fd, termios.TIOCEXCL)
    except OSError as exc:
        ser.close()
        raise PortNotFound(f"{port}: cannot take exclusive use ({exc.strerror})") from exc
    return ser


class Transcript:
    """A bounded ring of the recent AT traffic for a support bundle: one entry per line,
    ``(wall time, ">" sent or "<" received, text)``; received bytes are framed into lines
    across reads. Secrets are the reader's to redact (``agent.core.redact``)."""

    MAX_LINE = 300

    def __init__(self, max_lines: int = 400) -> None:
        self._ring: deque[tuple[float, str, str]] = deque(maxlen=max_lines)
        self._partial = {">": "", "<": ""}

    def add(self, direction: str, data: bytes) -> None:
        text = self._partial[direction] + data.decode("ascii", errors="replace").replace("\r", "\n")
        *lines, self._partial[direction] = text.split("\n")
        self._partial[direction] = self._partial[direction][-self.MAX_LINE:]
        now = time.time()
        self._ring.extend((now, direction, line[:self.MAX_LINE]) for line in lines if line.strip())

    def lines(self) -> list[str]:
        """``HH:MM:SS.mmm > AT+CSQ`` lines, oldest first (UTC)."""
        return [f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(t))}.{int(t % 1 * 1000):03d}Z {d} {text}"
                for t, d, text in self._ring]


class ATClient:
    """One exclusive AT port. Create with ``await ATClient.open(port)``."""

    def __init__(self, ser: serial.SerialBase, urc_patterns: Iterable[str] = (), *,
                 resync_timeout: float = 1.0, max_failures: int = 3, abort_grace: float = 1.0,
                 resync_first: bool = False):
        self._serial = ser
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = getattr(ser, "_socket", None)
        self._fd = self._sock.fileno() if self._sock is not None else ser.fd
        if self._sock is None:
            os.set_blocking(self._fd, False)
        # resync_first: a port reopened after a failure may still carry the old session's
        # answers; the first command then probes before it is sent.
        self._conn = Connection(urc_patterns=urc_patterns, state=State.DESYNC if resync_first else State.IDLE)
        self._channel = _Channel(self._loop)
        self._lines: list[str] = []
        self._waiter: asyncio.Future | None = None  # FinalResult / Aborted / Resynchronised / Prompt
        self._inflight: _InFlight | None = None
        self._line_dirty = False  # a cancelled write may have left half a command line
        self._failures = 0  # consecutive timeouts (commands and probes)
        self._probe_refusals = 0  # error finals taken as probe answers in this resync
        self._subscribers: list[UrcCallback] = []
        # Lines taken for a caller's answer (or discarded as a caller's late answer) that
        # may have been URCs: a pending command that names a URC's tag (AT+QSIMSTAT?,
        # AT+CPIN?) gets the URC as its answer. The gate hears of them too.
        self._lookalike_subscribers: list[UrcCallback] = []
        self._offer_stale = False  # the command whose late answer may still come was a caller's
        self._recorder: Recorder | None = None
        self._commands_sent = 0  # tells the recorder whether a command that failed went out
        self.resync_timeout = resync_timeout
        self.max_failures = max_failures
        self.abort_grace = abort_grace
        self.lost: asyncio.Future = self._loop.create_future()  # result: the cause or None
        self.transcript: Transcript | None = None  # set by an owner that keeps one (the daemon)
        self.port = getattr(ser, "portstr", None) or getattr(ser, "port", "")
        self._loop.add_reader(self._fd, self._on_readable)

    @classmethod
    async def open(cls, port: str, *, baudrate: int = 115200, urc_patterns: Iterable[str] = (),
                   resync_timeout: float = 1.0, max_failures: int = 3, abort_grace: float = 1.0,
                   resync_first: bool = False) -> "ATClient":
        ser = _open_serial(port, baudrate)
        return cls(ser, urc_patterns, resync_timeout=resync_timeout, max_failures=max_failures,
                   abort_grace=abort_grace, resync_first=resync_first)

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

    def record(self, recorder: Recorder | None) -> None:
        """Every command sent from now on (resynchronisation probes and abort bytes aside)
        with its answer, and every URC, go to ``recorder`` (``transcript``); None stops."""
        self._recorder = recorder

    def subscribe_lookalikes(self, callback: UrcCallback) -> Callable[[], None]:
        """``callback(line)`` for each answer line of a non-priority command (and each
        discarded late answer line of one): a URC naming the pending command's tag is
        taken for its answer, so a subscriber that must not miss a URC looks at these
        too (the priority callers' own answers are not offered)."""
        self._lookalike_subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._lookalike_subscribers:
                self._lookalike_subscribers.remove(callback)

        return unsubscribe

    async def command(self, command: str, timeout: float = 5.0, *, check: bool = True,
                      priority: bool | int = False, abortable: bool = False,
                      guard: Callable[[], None] | None = None) -> Response:
        """Send one command; return its response, or raise ``CommandError`` (when
        ``check``), ``CommandTimeout``, ``CommandAborted`` or ``PortLost``.

        ``priority``: the radio gate's command; it goes as soon as the command in flight
        ends, and aborts that command if it is ``abortable`` (and not itself priority).
        Every command a task sends after ``GATE_PRIORITY.set(True)`` has priority (the
        gate's own tasks: their reads go through the typed modem API).
        ``abortable``: V.250 lets the DTE abort this command while it executes
        (``commands.is_abortable``).
        ``guard``: called once the channel is this command's, right before the line is
        written; an exception it raises is raised here and nothing is sent (the radio
        gate's last word on a caller's write that waited for the channel)."""
        priority = max(int(priority), GATE_PRIORITY.get())
        response = await self._recorded(command, self._run(command, timeout, priority=priority, abortable=abortable,
                                                           guard=guard))
        if check and not response.final.ok:
            raise CommandError(command, response)
        return response

    async def command_with_payload(self, command: str, payload: bytes, timeout: float = 5.0, *,
                                   priority: bool = False) -> Response:
        """A command that answers ``> `` and then takes ``payload`` (Ctrl-Z appended)."""
        response = await self._recorded(command, self._run(command, timeout, priority=priority, abortable=False,
                                                           payload=payload))
        if not response.final.ok:
            raise CommandError(command, response)
        return response

    async def send_raw_line(self, line: str, timeout: float = 10.0, *, priority: bool = False) -> Response:
        """For the interactive console: any final result is returned, not raised. A line
        that V.250 lets the DTE abort (a network scan) is sent abortable."""
        return await self.command(line, timeout, check=False, priority=priority, abortable=is_abortable(line))

    def interrupt(self, reason: str) -> None:
        """The module restarted (a boot URC): the command on the wire will never be
        answered, and nothing sent before the restart can still arrive (the boot URC came
        after it on the line). Its caller gets CommandTimeout now (not counted towards
        ``max_failures``) and the line is idle at once, so whoever is waiting - the radio
        gate above all - gets the channel without a timeout or a probe."""
        if self._conn.state is State.IDLE:
            return
        log.info("%s: %s: the command in flight will not be answered", self.port, reason)
        self._conn.module_restarted()
        flight = self._inflight
        if flight is not None and not flight.waiter.done():
            flight.interrupted = True
            _expire(flight.waiter)

    def close(self) -> None:
        self._shutdown(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self.lost)

    # -- internals --------------------------------------------------------------------

    async def _recorded(self, command: str, exchange: Awaitable[Response]) -> Response:
        """Awaits the exchange; tells the recorder (if any) how it ended. A command that
        never went out (refused by its guard, the port already lost) is not recorded."""
        recorder = self._recorder
        sent = self._commands_sent
        try:
            response = await exchange
        except CommandAborted as exc:
            if recorder is not None:
                recorder.exchange(command, exc.response.lines if exc.response else (),
                                  exc.response.final.line if exc.response else None, aborted=True)
            raise
        except (CommandTimeout, PortLost, asyncio.CancelledError):
            if recorder is not None and self._commands_sent != sent:
                recorder.exchange(command, (), None)
            raise
        if recorder is not None:
            recorder.exchange(command, response.lines, response.final.line)
        return response

    def _ensure_alive(self) -> None:
        if self.lost.done():
            cause = self.lost.result()
            raise PortLost(f"{self.port}: {cause or 'closed'}")

    async def _run(self, command: str, timeout: float, *, priority: int, abortable: bool,
                   payload: bytes | None = None, guard: Callable[[], None] | None = None) -> Response:
        self._ensure_alive()
        if priority:
            self._preempt(int(priority))
        await self._channel.acquire(bool(priority))
        try:
            try:
                self._ensure_alive()
                if self._conn.needs_resync:
                    await self._resync(priority)
                while self._conn.needs_resync or (not priority and self._channel.priority_waiting()):
                    # A higher-priority caller came while we queued or resynchronised (and
                    # cut our resynchronisation short): it goes first; we queue again, a
                    # caller at the front of its class, the gate's read behind the radio.
                    self._channel.release()
                    await self._channel.acquire(bool(priority), front=not priority)
                    self._ensure_alive()
                    if self._conn.needs_resync:
                        await self._resync(priority)
                if guard is not None:
                    guard()
                self._lines = []
                data = self._conn.send_command(command, expect_prompt=payload is not None)
                self._commands_sent += 1
                result = await self._exchange(data, command, timeout, abortable=abortable, priority=priority)
                if payload is not None and isinstance(result, Prompt):
                    result = await self._exchange(self._conn.send_payload(payload), command, timeout,
                                                  abortable=False, priority=priority)
            except BaseException:
                # Whatever made us leave (timeout, cancellation, lost port), the core must
                # not stay AWAITING / ABORTING / PROBING: the next caller resynchronises.
                self._conn.give_up()
                raise
        finally:
            self._channel.release()
        return result  # a Response: a Prompt was answered with the payload

    def _preempt(self, level: int) -> None:
        """A priority caller arrived: abort the command in flight if V.250 allows it; a
        caller's command that cannot be aborted is given up if it is still unanswered
        PRIORITY_WAIT after this (a healthy module answers in milliseconds: one that has
        not has lost it, e.g. to a hang; its late answer is discarded by the resync)."""
        flight = self._inflight
        if flight is None or flight.priority >= level or self.lost.done():
            return
        if self._conn.state in (State.PROBING, State.PROBE_ANSWERED):  # a caller's resynchronisation
            if flight.give_up_timer is None:
                flight.give_up_timer = self._loop.call_later(PRIORITY_WAIT, self._give_up_for_priority, flight)
            return
        if self._conn.state is not State.AWAITING:
            return
        if not flight.abortable or flight.priority:
            if flight.give_up_timer is None:
                flight.give_up_timer = self._loop.call_later(PRIORITY_WAIT, self._give_up_for_priority, flight)
            return
        if flight.timer is None:
            # Still writing the line: a CR now would cut it in two (and the tail would
            # answer the next command). Abort as soon as the line is out.
            flight.abort_wanted = True
            return
        self._abort(flight)

    def _abort(self, flight: _InFlight) -> None:
        flight.abort_bytes = self._conn.abort()
        if not self._send_abort(flight):
            return
        flight.aborted = True
        log.info("%s: aborting %r for a priority command", self.port, self._conn.pending)
        if flight.timer is not None:
            flight.timer.cancel()
        flight.timer = self._loop.call_later(self.abort_grace, _expire, flight.waiter)

    def _send_abort(self, flight: _InFlight) -> bool:
        """Writes the abort byte, and again every ABORT_REPEAT until the command ends: a
        byte that reached the module before the command began executing (right behind
        its line) aborts nothing (V.250 modules ignore early input), a later one does; a
        byte after the end is an empty line. False when the port is gone."""
        try:
            if self._sock is not None:
                self._sock.send(flight.abort_bytes)
            else:
                os.write(self._fd, flight.abort_bytes)
        except (BlockingIOError, InterruptedError):
            pass  # not written: the next repeat, or the grace, deals with it
        except OSError as exc:
            self._shutdown(exc)
            return False
        flight.abort_repeat = self._loop.call_later(ABORT_REPEAT, self._abort_again, flight)
        return True

    def _abort_again(self, flight: _InFlight) -> None:
        if not flight.waiter.done() and self._conn.state is State.ABORTING and self._inflight is flight:
            self._send_abort(flight)

    def _give_up_for_priority(self, flight: _InFlight) -> None:
        if not flight.waiter.done() and self._conn.state in (State.AWAITING, State.PROBING, State.PROBE_ANSWERED):
            log.info("%s: %r unanswered; given up for a priority command", self.port, self._conn.pending)
            flight.given_up = True
            _expire(flight.waiter)

    async def _exchange(self, data: bytes, command: str, timeout: float, *, abortable: bool,
                        priority: int) -> Response | Prompt:
        waiter = self._waiter = self._loop.create_future()
        flight = self._inflight = _InFlight(waiter, abortable, priority)
        self._offer_stale = not priority
        try:
            # A short command fits the tty's buffer at once: no coroutine for the write on
            # the hot path of every round trip; `_write` waits for room when it does not.
            if self.transcript is not None:
                self.transcript.add(">", data)
            rest = data if self._sock is not None else self._write_now(data)
            if rest:
                await self._write(rest)
            flight.timer = self._loop.call_later(timeout, _expire, waiter)
            flight.written_at = self._loop.time()
            if flight.abort_wanted and self._conn.state is State.AWAITING:
                self._abort(flight)
            try:
                result = await waiter
            except TimeoutError:
                if self._conn.state is not State.IDLE:
                    self._conn.command_timed_out()
                    if not (flight.interrupted or flight.given_up):
                        self._timed_out()
                # else the final result was read in the same loop turn as the timer
                # fired: the line is in step and the modem did answer (not a failure).
                if flight.aborted:
                    raise CommandAborted(command, None) from None
                raise CommandTimeout(command, timeout) from None
        finally:
            if flight.timer is not None:
                flight.timer.cancel()
            if flight.give_up_timer is not None:
                flight.give_up_timer.cancel()
            if flight.abort_repeat is not None:
                flight.abort_repeat.cancel()
            self._waiter = None
            self._inflight = None
        self._failures = 0
        if isinstance(result, Prompt):
            return result
        if isinstance(result, Aborted):
            raise CommandAborted(command, Response(self._lines, result.final))
        return Response(self._lines, result)

    def _timed_out(self) -> None:
        """One more consecutive timeout; at ``max_failures`` the port is closed."""
        self._failures += 1
        if self._failures >= self.max_failures:
            self._shutdown(TimeoutError(f"unresponsive: {self._failures} consecutive timeouts"))
            self._ensure_alive()  # raises PortLost

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

    async def _resync(self, level: int = 0) -> None:
        """Probe until the line is in step (each probe distinguishable from the older
        ones); every unanswered probe counts towards ``max_failures``. The gate's probes
        wait PRIORITY_PROBE_WAIT, not ``resync_timeout`` (a module that answers at all
        answers ATS3? in milliseconds; one lost to a hang is re-probed sooner). A caller's
        resynchronisation given up for a priority command returns unfinished."""
        silent_since = self._loop.time()  # failures count per resync_timeout of silence
        self._probe_refusals = 0
        while True:
            self._ensure_alive()
            waiter = self._waiter = self._loop.create_future()
            flight = self._inflight = _InFlight(waiter, False, level)
            try:
                data = self._conn.send_probe()
                if self._line_dirty:
                    # End the half-written line a cancelled caller left behind, so that
                    # the probe is a line of its own.
                    data = b"\r" + data
                    self._line_dirty = False
                if self.transcript is not None:
                    self.transcript.add(">", data)
                await self._write(data)
                wait = min(self.resync_timeout, PRIORITY_PROBE_WAIT) if level else self.resync_timeout
                flight.timer = self._loop.call_later(wait, _expire, waiter)
                if isinstance(await waiter, Discarded):
                    log.debug("%s: probe %r refused; probing again", self.port, self._conn.pending)
                    silent_since = self._loop.time()  # the module answered: not silence
                    continue
            except TimeoutError:
                if self._conn.state is State.IDLE:  # answered in the same loop turn
                    self._failures = 0
                    return
                log.debug("%s: probe %r unanswered", self.port, self._conn.pending)
                if flight.given_up:
                    return  # the priority caller resynchronises itself
                if not flight.interrupted and self._loop.time() - silent_since >= self.resync_timeout * 0.999:
                    silent_since = self._loop.time()
                    self._timed_out()
                continue
            finally:
                if flight.timer is not None:
                    flight.timer.cancel()
                if flight.give_up_timer is not None:
                    flight.give_up_timer.cancel()
                self._waiter = None
                self._inflight = None
            self._failures = 0
            return

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
        except asyncio.CancelledError:
            self._line_dirty = True  # part of the line may be out
            raise
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
        if self.transcript is not None:
            self.transcript.add("<", data)
        self._conn.receive_data(data)
        while (event := self._conn.next_event()) is not NEED_DATA:
            self._dispatch(event)

    def _dispatch(self, event) -> None:
        if isinstance(event, Line):
            self._lines.append(event.text)
            if self._inflight is not None and not self._inflight.priority:
                self._offer_lookalike(event.text)
        elif isinstance(event, (FinalResult, Aborted, Resynchronised, Prompt)):
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(event)
        elif isinstance(event, Urc):
            self._give_up_lost_radio_command()
            if self._recorder is not None:
                self._recorder.urc(event.line)
            for callback in list(self._subscribers):
                try:
                    callback(event.line)
                except Exception:  # a subscriber's bug must not kill the reader
                    log.exception("URC subscriber failed on %r", event.line)
        elif isinstance(event, Discarded):
            if event.reason == "stale" and self._offer_stale:
                self._offer_lookalike(event.text)
            if (event.final is not None and not event.final.ok and self._conn.state is State.PROBING
                    and self._probe_refusals < PROBE_REFUSALS_AT_ONCE
                    and self._waiter is not None and not self._waiter.done()):
                self._probe_refusals += 1
                self._waiter.set_result(event)  # re-probe at once (see _resync)
            log.debug("%s: discarded %s input %r (%d bytes)", self.port, event.reason, event.text, event.length)

    def _give_up_lost_radio_command(self) -> None:
        """See RADIO_LOST_AFTER: the module speaks, the gate's radio command waits."""
        flight = self._inflight
        if (flight is None or flight.priority != GATE_RADIO or flight.written_at is None or flight.waiter.done()
                or self._conn.state is not State.AWAITING or self._loop.time() - flight.written_at < RADIO_LOST_AFTER):
            return
        log.info("%s: the module speaks but %r is unanswered after %.1f s: taken as lost", self.port,
                 self._conn.pending, self._loop.time() - flight.written_at)
        flight.given_up = True
        _expire(flight.waiter)

    def _offer_lookalike(self, line: str) -> None:
        for callback in list(self._lookalike_subscribers):
            try:
                callback(line)
            except Exception:  # a subscriber's bug must not kill the reader
                log.exception("lookalike subscriber failed on %r", line)

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
