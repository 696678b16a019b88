"""The daemon's control socket and the client the CLI uses to reach it (SPEC §8, §12).

While the daemon runs it owns the modem port exclusively (TIOCEXCL), so the CLI asks
the daemon instead. Protocol: a Unix stream socket carrying JSON lines, one request
``{"name": OPERATION, "args": {...}, "id"?: X}`` answered by one reply
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code", "message"}}``
(``id`` echoed when given). Error codes: ``bad_request``, ``too_large``, ``unknown_op``,
``permission_denied``, ``unsafe_required``, ``timeout``, ``busy``, ``internal``, plus
whatever a handler raises as ``ControlError``.

Who may do what is the table of operations' (`agent.core.operations`): the socket file
is 0660 (the service group may connect); a call that writes additionally needs uid 0,
read from the kernel (SO_PEERCRED), never from the request. The file never exists with wider permissions: it is bound inside a
private 0700 staging directory, chmod-ed there, then hard-linked into place. That
avoids changing the process-wide umask, which would race with other threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
import tempfile
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from agent.core.operations import OPERATIONS, SOCKET, Operation, OperationRefused, offered

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/simagent/control.sock"
SOCKET_MODE = 0o660
MAX_REQUEST = 1 << 20  # bytes in one request line
MAX_REPLY = 64 << 20  # bytes in one reply line (evidence exports are the big ones)
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


class ControlError(Exception):
    """An error reply. Handlers raise it for expected failures; clients get it back."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ControlSocketInUse(Exception):
    """Another process answers on the control socket path: a second daemon must not start."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


Handler = Callable[[dict[str, Any], Peer], Awaitable[Any]]


@dataclass(frozen=True)
class StreamedResult:
    """A result too large to hold in memory (an evidence bundle), returned by a handler:
    `chunks` yields the bytes of one JSON value (with no newline in them). The server
    writes the reply line around them as they come, within `timeout` seconds, and awaits
    `close()` whatever happens. A failure half-way cannot become an error reply any more:
    the connection is cut, and the client sees a reply without its end of line."""

    chunks: AsyncIterable[bytes]
    close: Callable[[], Awaitable[None]]
    timeout: float = 60.0


@dataclass(frozen=True)
class Op:
    """An operation of the table served here: ``handler(args, peer)`` returns the
    JSON-serialisable result."""

    operation: Operation
    handler: Handler

    @property
    def name(self) -> str:
        return self.operation.name


def socket_op(name: str, handler: Handler, table: Mapping[str, Operation] = OPERATIONS) -> Op:
    """The operation `name` of the table, served on the control socket by `handler`."""
    operation = offered(SOCKET, table).get(name)
    if operation is None:
        raise ValueError(f"{name!r} is not a control socket operation")
    return Op(operation, handler)


def peer_credentials(sock: socket.socket) -> Peer:
    return Peer(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


class ControlServer:
    """Serves registered operations on a Unix socket inside the daemon's event loop.

    Bounded: request lines up to ``max_request`` bytes, ``max_clients`` connections of
    users other than root, at most ``max_per_uid`` of one uid, ``root_reserve`` kept
    for root whatever the others hold,
    ``idle_timeout`` seconds of silence per connection (generous: the interactive AT
    console keeps one open), each handler call ``Op.timeout`` seconds."""

    def __init__(
        self,
        path: str | os.PathLike = DEFAULT_SOCKET,
        ops: Iterable[Op] = (),
        *,
        max_request: int = MAX_REQUEST,
        max_clients: int = 16,
        max_per_uid: int = 4,
        root_reserve: int = 16,
        idle_timeout: float = 600.0,
    ) -> None:
        self.path = Path(path)
        self.max_request = max_request
        self.max_clients = max_clients
        self.max_per_uid = max_per_uid
        self.root_reserve = root_reserve
        self.idle_timeout = idle_timeout
        self._ops: dict[str, Op] = {}
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: set[asyncio.Task] = set()
        self._per_uid: dict[int, int] = {}  # open connections of each uid
        for op in ops:
            self.register(op)

    def register(self, op: Op) -> None:
        if op.name in self._ops:
            raise ValueError(f"control op {op.name!r} registered twice")
        self._ops[op.name] = op

    async def start(self) -> None:
        """Creates the socket. Raises ControlSocketInUse when another daemon answers,
        FileExistsError when something that is not a socket sits at the path."""
        sock = _bind_socket(self.path)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._serve_client, sock=sock, limit=self.max_request)
        log.info("control socket listening on %s", self.path)

    async def serve(self) -> None:
        """Serves until closed (started first when it is not); supervised by the daemon,
        so a server that failed is closed and started again."""
        try:
            if self._server is None:
                await self.start()
            await self._server.serve_forever()
        except asyncio.CancelledError:
            raise
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        # Remove the file only if it is still ours, not a successor's.
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()

    async def __aenter__(self) -> "ControlServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        peer: Peer | None = None
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
            refusal = self._admission(peer)
            if refusal is not None:
                log.warning("control: connection of uid %d (pid %d) refused: %s", peer.uid, peer.pid, refusal)
                await _hang_up(reader, writer, ControlError("busy", refusal))
                peer = None
                return
            self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
                except TimeoutError:
                    return
                except ValueError:  # the line overran the stream limit
                    # The rest of the line may still be coming; no way to resynchronise.
                    await _hang_up(reader, writer, ControlError("too_large", f"request longer than {self.max_request} bytes"))
                    return
                if not line.strip():
                    if not line:
                        return  # end of stream
                    continue
                reply = await self._answer(line, peer)
                if isinstance(reply.get("result"), StreamedResult):
                    if not await _send_streamed(writer, reply):
                        return
                else:
                    await _send(writer, reply)
        except ConnectionError:
            pass  # the client went away; nothing to answer
        except asyncio.CancelledError:
            # close() ends the connection. The task ends normally: on Python 3.11 the stream
            # server's done-callback logs a cancelled handler as an error with a traceback.
            pass
        finally:
            self._clients.discard(task)
            if peer is not None:
                self._per_uid[peer.uid] -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _admission(self, peer: Peer) -> str | None:
        """Why this peer may not open another connection (None: it may). Each uid may
        hold `max_per_uid`; other users share `max_clients`; root always has
        `root_reserve` connections of its own, so no group member can lock it out."""
        mine = self._per_uid.get(peer.uid, 0)
        if peer.uid == 0:
            return None if mine < self.root_reserve else "too many control connections for root"
        if mine >= self.max_per_uid:
            return f"too many control connections for uid {peer.uid} (at most {self.max_per_uid})"
        others = sum(n for uid, n in self._per_uid.items() if uid != 0)
        return None if others < self.max_clients else "too many control connections"

    async def _answer(self, line: bytes, peer: Peer) -> dict[str, Any]:
        request_id = None
        try:
            request = _parse_request(line)
            request_id = request.get("id")
            op = self._ops.get(request["name"])
            if op is None:
                raise ControlError("unknown_op", f"unknown operation {request['name']!r}; known: {', '.join(sorted(self._ops))}")
            args = request["args"]
            self._authorise(op, args, peer)
            deadline = asyncio.timeout(op.operation.timeout)
            try:
                async with deadline:
                    result = await op.handler(args, peer)
            except TimeoutError:
                if deadline.expired():  # ours, not a TimeoutError the handler raised
                    raise ControlError("timeout", f"{op.name} took longer than {op.operation.timeout:g} s") from None
                raise
            reply: dict[str, Any] = {"ok": True, "result": result}
            if not isinstance(result, StreamedResult):
                _encode(reply)  # fails here, inside the error handling, if not serialisable
        except ControlError as exc:
            reply = _error_reply(exc)
        except Exception as exc:
            log.exception("control op failed")
            reply = _error_reply(ControlError("internal", f"{type(exc).__name__}: {exc}"))
        if request_id is not None:
            reply["id"] = request_id
        return reply

    @staticmethod
    def _authorise(op: Op, args: dict[str, Any], peer: Peer) -> None:
        try:
            op.operation.check_args(args)
        except OperationRefused as exc:
            raise ControlError(exc.code, exc.message) from exc
        if not op.operation.is_write(args):
            return
        if peer.uid != 0:
            log.warning("control: %s refused for uid %d (pid %d): needs root", op.name, peer.uid, peer.pid)
            raise ControlError("permission_denied", f"{op.name} changes state and needs root (sudo)")
        if op.operation.unsafe_flag and args.get("unsafe") is not True:
            raise ControlError("unsafe_required", f"this {op.name} request changes state: repeat it with --unsafe")
        log.info("control: %s by uid %d (pid %d)", op.name, peer.uid, peer.pid)  # audit; args may hold tokens


class ControlClient:
    """One connection to the daemon. Calls are serialised: one request, one reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self._next_id = 1

    @classmethod
    async def connect(cls, path: str | os.PathLike = DEFAULT_SOCKET, *, timeout: float = 2.0) -> "ControlClient | None":
        """None when no daemon answers (the CLI then works directly). PermissionError
        propagates: a daemon runs, but this user may not talk to it."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(os.fspath(path), limit=MAX_REPLY), timeout)
        except (FileNotFoundError, ConnectionRefusedError, TimeoutError):
            return None
        return cls(reader, writer)

    async def call(self, op: str, /, **args: Any) -> Any:
        """The op's result; raises ControlError for an error reply and ConnectionError
        when the daemon closes the connection."""
        async with self._lock:
            request_id = self._next_id
            self._next_id += 1
            await _send(self._writer, {"id": request_id, "name": op, "args": args})
            line = await self._reader.readline()
            if not line:
                raise ConnectionError("the daemon closed the control connection")
            if not line.endswith(b"\n"):
                raise ConnectionError("the daemon's reply was cut short")
            reply = json.loads(line)
            if reply.get("id") not in (request_id, None):
                raise ConnectionError(f"reply to request {reply.get('id')} while waiting for {request_id}")
            if not reply.get("ok"):
                error = reply.get("error") or {}
                raise ControlError(str(error.get("code", "internal")), str(error.get("message", "")))
            return reply.get("result")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> "ControlClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class BlockingControlClient:
    """ControlClient for synchronous callers (the CLI), on an event loop of its own."""

    def __init__(self, runner: asyncio.Runner, client: ControlClient) -> None:
        self._runner = runner
        self._client = client

    @classmethod
    def connect(cls, path: str | os.PathLike = DEFAULT_SOCKET, *, timeout: float = 2.0) -> "BlockingControlClient | None":
        runner = asyncio.Runner()
        try:
            client = runner.run(ControlClient.connect(path, timeout=timeout))
        except BaseException:
            runner.close()
            raise
        if client is None:
            runner.close()
            return None
        return cls(runner, client)

    def call(self, op: str, /, **args: Any) -> Any:
        return self._runner.run(self._client.call(op, **args))

    def close(self) -> None:
        self._runner.run(self._client.close())
        self._runner.close()

    def __enter__(self) -> "BlockingControlClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _parse_request(line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd nesting
        raise ControlError("bad_request", f"not a JSON line: {exc}") from None
    if not isinstance(request, dict):
        raise ControlError("bad_request", 'a request is a JSON object {"name": ..., "args": {...}}')
    if not isinstance(request.get("name"), str):
        raise ControlError("bad_request", 'missing "name" (the operation)')
    request.setdefault("args", {})
    if not isinstance(request["args"], dict):
        raise ControlError("bad_request", '"args" must be a JSON object')
    return request


def _error_reply(error: ControlError) -> dict[str, Any]:
    return {"ok": False, "error": error.to_json()}


def _encode(message: dict[str, Any]) -> bytes:
    try:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise ControlError("internal", f"result is not JSON: {exc}") from None


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(_encode(message))
    await writer.drain()


async def _send_streamed(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> bool:
    """Writes a reply whose result is a StreamedResult; False when it had to be cut
    short (the connection is then unusable and is aborted)."""
    result: StreamedResult = reply["result"]
    head = {key: value for key, value in reply.items() if key != "result"}
    try:
        async with asyncio.timeout(result.timeout):
            writer.write(_encode(head)[:-2] + b',"result":')  # the head without its closing "}\n"
            async for chunk in result.chunks:
                writer.write(chunk)
                await writer.drain()
            writer.write(b"}\n")
            await writer.drain()
        return True
    except Exception as exc:  # a timeout, the worker failing, the client gone
        if not isinstance(exc, ConnectionError):
            log.warning("control: streamed reply cut short: %s", exc)
        writer.transport.abort()
        return False
    finally:
        await result.close()


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: ControlError) -> None:
    """Sends a last error reply and ends the connection. What the client still sends is
    read and dropped for a moment first: closing a Unix socket with unread input resets
    the connection, and the reset would destroy the reply on its way."""
    await _send(writer, _error_reply(error))
    writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            while await reader.read(65536):
                pass


def _bind_socket(path: Path) -> socket.socket:
    """A listening-ready socket bound at `path` with mode 0660 from its first instant."""
    # Normally systemd's RuntimeDirectory= made the directory; 0755 like its default.
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _remove_stale(path)
    staging = Path(tempfile.mkdtemp(prefix=".c", dir=path.parent))  # mode 0700
    staged = staging / "s"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(os.fspath(staged))
        os.chmod(staged, SOCKET_MODE)
        try:
            os.link(staged, path)  # atomic: fails rather than replace a racing daemon's socket
        except FileExistsError:
            raise ControlSocketInUse(f"{path} appeared while starting: another simagent daemon is starting") from None
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        staging.rmdir()
    return sock


def _remove_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except ConnectionRefusedError:
        path.unlink()
        log.info("removed stale control socket %s", path)
        return
    except FileNotFoundError:
        return
    except TimeoutError:
        pass  # someone listens, but its backlog is full: still in use
    finally:
        probe.close()
    raise ControlSocketInUse(f"another simagent daemon answers on {path}")
