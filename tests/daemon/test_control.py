"""The control socket: a real Unix socket, real peer credentials, clients as root and as nobody."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import threading

import pytest

from agent.core.operations import SOCKET, Operation, offered
from agent.service.control import (
    MAX_REQUEST,
    BlockingControlClient,
    ControlClient,
    ControlError,
    ControlServer,
    ControlSocketInUse,
    Op,
    socket_op,
)


NOBODY = 65534  # uid and gid of `nobody`/`nogroup`


class ServerThread:
    """A ControlServer on an event loop in a thread, as the daemon would run it."""

    def __init__(self, path, ops, **options) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ControlServer(path, ops, **options)
        self.run(self.server.start())

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def stop(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class Recorder:
    """Handlers that record their calls, so a test can prove a refused op never ran."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def handler(self, name: str):
        async def handle(args, peer):
            self.calls.append((name, args))
            return {"op": name, "args": args, "peer": {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid}}

        return handle


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def daemon(short_dir, recorder):
    async def fails(args, peer):
        raise RuntimeError("modem port vanished")

    async def refuses(args, peer):
        raise ControlError("no_modem", "modem not found")

    async def unserialisable(args, peer):
        return {"when": object()}

    async def slow(args, peer):
        await asyncio.sleep(5)

    ops = [socket_op(name, recorder.handler(name)) for name in offered(SOCKET)]
    ops += [
        Op(Operation("fails"), fails),
        Op(Operation("refuses"), refuses),
        Op(Operation("unserialisable"), unserialisable),
        Op(Operation("slow", timeout=0.2), slow),
    ]
    server = ServerThread(short_dir / "control.sock", ops)
    # In production the socket's group is the service group; nobody stands in for a member.
    os.chown(server.server.path, -1, NOBODY)
    yield server
    server.stop()


def raw_exchange(path, payload: bytes) -> list[dict]:
    """Sends raw bytes, half-closes, and returns every reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_socket_file_is_0660_and_staging_is_gone(daemon):
    path = daemon.server.path
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert sorted(os.listdir(path.parent)) == ["control.sock"]


def test_root_client_sees_result_and_its_own_credentials(daemon):
    with BlockingControlClient.connect(daemon.server.path) as client:
        result = client.call("status")
        assert result["peer"] == {"pid": os.getpid(), "uid": 0, "gid": os.getgid()}
        assert client.call("bind_reset", reason="technician swap")["args"] == {"reason": "technician swap"}


def test_async_client(daemon):
    async def scenario():
        client = await ControlClient.connect(daemon.server.path)
        async with client:
            return await client.call("bind_show"), await client.call("diag")

    shown, diag = asyncio.run(scenario())
    assert shown["op"] == "bind_show" and diag["op"] == "diag"


def test_nobody_may_read_but_not_change_state(daemon, recorder, run_as):
    path = daemon.server.path

    def as_nobody():
        with BlockingControlClient.connect(path) as client:
            status = client.call("status")
            try:
                client.call("bind_accept", token="eyJ...")
            except ControlError as exc:
                return {"status_peer": status["peer"], "refused": exc.code}
            return {"status_peer": status["peer"], "refused": None}

    outcome = run_as(NOBODY, NOBODY, as_nobody)["value"]
    assert outcome["status_peer"]["uid"] == NOBODY
    assert outcome["status_peer"]["gid"] == NOBODY
    assert outcome["status_peer"]["pid"] != os.getpid()
    assert outcome["refused"] == "permission_denied"
    assert [name for name, _ in recorder.calls] == ["status"]  # bind_accept never ran


def test_a_user_outside_the_group_cannot_connect(daemon, run_as):
    outcome = run_as(12345, 12345, lambda: BlockingControlClient.connect(daemon.server.path) is None)
    assert outcome["raised"].startswith("PermissionError")


def test_at_writes_need_root_and_unsafe(daemon, recorder, run_as):
    path = daemon.server.path
    with BlockingControlClient.connect(path) as client:
        assert client.call("at", command="AT+CSQ")["args"] == {"command": "AT+CSQ"}
        with pytest.raises(ControlError) as refused:
            client.call("at", command="AT+CFUN=4")
        assert refused.value.code == "unsafe_required"
        assert client.call("at", command="AT+CFUN=4", unsafe=True)["op"] == "at"
        with pytest.raises(ControlError) as malformed:
            client.call("at", cmd="AT")
        assert malformed.value.code == "bad_args"  # the same word as over MQTT: one table of operations

    def as_nobody():
        with BlockingControlClient.connect(path) as client:
            client.call("at", command="AT+CGSN")
            client.call("at", command="AT+CFUN=1", unsafe=True)

    assert run_as(NOBODY, NOBODY, as_nobody)["code"] == "permission_denied"
    assert [args["command"] for _, args in recorder.calls] == ["AT+CSQ", "AT+CFUN=4", "AT+CGSN"]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json\n", "bad_request"),
        (b"\xff\xfe\n", "bad_request"),
        (b"[1, 2]\n", "bad_request"),
        (b'{"args": {}}\n', "bad_request"),
        (b'{"name": "status", "args": [1]}\n', "bad_request"),
        (b"[" * 100_000 + b"\n", "bad_request"),
        (b'{"name": "reboot_everything"}\n', "unknown_op"),
    ],
)
def test_malformed_requests_get_error_replies_and_the_connection_lives_on(daemon, payload, code):
    replies = raw_exchange(daemon.server.path, payload + b'{"name": "status", "id": 7}\n')
    assert replies[0]["ok"] is False and replies[0]["error"]["code"] == code
    assert replies[1]["ok"] is True and replies[1]["id"] == 7


def test_oversized_request_is_refused_and_the_server_lives_on(daemon):
    huge = json.dumps({"name": "status", "args": {"pad": "x" * (MAX_REQUEST + 10)}}).encode() + b"\n"
    replies = raw_exchange(daemon.server.path, huge)
    assert replies == [{"ok": False, "error": {"code": "too_large", "message": f"request longer than {MAX_REQUEST} bytes"}}]
    with BlockingControlClient.connect(daemon.server.path) as client:
        assert client.call("status")["op"] == "status"


def test_handler_failures_become_error_replies(daemon):
    with BlockingControlClient.connect(daemon.server.path) as client:
        for op, code, text in [
            ("fails", "internal", "RuntimeError: modem port vanished"),
            ("refuses", "no_modem", "modem not found"),
            ("unserialisable", "internal", "not JSON"),
            ("slow", "timeout", "longer than 0.2 s"),
        ]:
            with pytest.raises(ControlError) as failure:
                client.call(op)
            assert failure.value.code == code and text in failure.value.message
        assert client.call("status")["op"] == "status"  # same connection, still served


def test_idle_connections_are_closed_and_excess_clients_told_busy(short_dir):
    async def status(args, peer):
        return "up"

    server = ServerThread(short_dir / "c.sock", [Op(Operation("status"), status)], idle_timeout=0.2, root_reserve=1)
    try:
        with socket.socket(socket.AF_UNIX) as idle:
            idle.settimeout(5)
            idle.connect(str(server.server.path))
            idle.sendall(b'{"name": "status"}\n')
            assert json.loads(idle.recv(1024)) == {"ok": True, "result": "up"}
            assert raw_exchange(server.server.path, b'{"name": "status"}\n')[0]["error"]["code"] == "busy"
            assert idle.recv(1024) == b""  # closed by the server after 0.2 s of silence
        with BlockingControlClient.connect(server.server.path) as client:
            assert client.call("status") == "up"
    finally:
        server.stop()


def test_stale_socket_file_is_replaced(short_dir):
    path = short_dir / "control.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays behind, nobody listens: a crashed daemon's leftover
    assert BlockingControlClient.connect(path) is None

    async def status(args, peer):
        return "fresh"

    server = ServerThread(path, [Op(Operation("status"), status)])
    try:
        with BlockingControlClient.connect(path) as client:
            assert client.call("status") == "fresh"
    finally:
        server.stop()
    assert not path.exists()  # removed on close


def test_second_server_is_refused_and_the_first_keeps_serving(daemon):
    second = ControlServer(daemon.server.path, [])
    with pytest.raises(ControlSocketInUse):
        asyncio.run(second.start())
    with BlockingControlClient.connect(daemon.server.path) as client:
        assert client.call("status")["op"] == "status"


def test_a_file_that_is_not_a_socket_is_never_replaced(short_dir):
    path = short_dir / "control.sock"
    path.write_text("important")
    with pytest.raises(FileExistsError):
        asyncio.run(ControlServer(path, []).start())
    assert path.read_text() == "important"


def test_close_leaves_a_successors_socket_alone(short_dir):
    path = short_dir / "control.sock"
    first = ServerThread(path, [])
    path.unlink()  # e.g. removed by an administrator; a new daemon then takes the path
    second = ServerThread(path, [])
    first.stop()
    assert path.exists()
    second.stop()
    assert not path.exists()


def test_missing_runtime_directory_is_created(short_dir):
    server = ServerThread(short_dir / "run" / "simagent" / "control.sock", [])
    try:
        assert stat.S_IMODE(os.stat(short_dir / "run" / "simagent").st_mode) == 0o755
    finally:
        server.stop()


def test_connect_without_daemon_returns_none(short_dir):
    assert BlockingControlClient.connect(short_dir / "absent.sock") is None
    assert asyncio.run(ControlClient.connect(short_dir / "absent.sock")) is None


def test_an_op_cannot_be_registered_twice(recorder):
    server = ControlServer("/nonexistent/x.sock", [socket_op("status", recorder.handler("status"))])
    with pytest.raises(ValueError):
        server.register(socket_op("status", recorder.handler("status")))


class Pieces:
    """A StreamedResult source: JSON in pieces, optionally failing after the first."""

    def __init__(self, pieces: list[bytes], fail: bool = False) -> None:
        self.pieces, self.fail, self.closed = list(pieces), fail, 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if not self.pieces:
            if self.fail:
                raise RuntimeError("worker died")
            raise StopAsyncIteration
        return self.pieces.pop(0)

    async def close(self) -> None:
        self.closed += 1


def test_a_streamed_result_is_one_reply_line_and_a_broken_one_is_cut(short_dir):
    from agent.service.control import StreamedResult

    made = []

    def op(name):
        async def handler(args, peer):
            source = Pieces([b'{"entries": [1,', b" 2, 3]", b', "x": "\\u00e9"}']) if name == "whole" \
                else Pieces([b'{"entries": ['], fail=True)
            made.append(source)
            return StreamedResult(source, source.close)
        return Op(Operation(name), handler)

    server = ServerThread(short_dir / "control.sock", [op("whole"), op("broken")])
    try:
        with BlockingControlClient.connect(server.server.path) as client:
            assert client.call("whole") == {"entries": [1, 2, 3], "x": "é"}
            assert client.call("whole")["entries"] == [1, 2, 3]  # the connection goes on after a streamed reply
        with BlockingControlClient.connect(server.server.path) as client:
            with pytest.raises(ConnectionError, match="cut short|closed"):
                client.call("broken")
    finally:
        server.stop()
    assert [source.closed for source in made] == [1, 1, 1]  # closed once each, whatever happened


def test_a_group_member_cannot_lock_root_out(short_dir, run_as):
    """16 idle connections of one group member (issue 10: root was locked out for 600 s):
    the member gets at most 4, root is always served."""
    async def status(args, peer):
        return "up"

    server = ServerThread(short_dir / "c.sock", [Op(Operation("status"), status)])
    os.chmod(short_dir, 0o755)
    os.chown(server.server.path, 0, NOBODY)
    try:
        def hold_many():
            held, refused = [], 0
            for _ in range(16):
                conn = socket.socket(socket.AF_UNIX)
                conn.settimeout(5)
                conn.connect(str(server.server.path))
                conn.sendall(b'{"name": "status"}\n')
                reply = json.loads(conn.makefile().readline())
                if reply.get("ok"):
                    held.append(conn)
                else:
                    refused += 1
                    assert reply["error"]["code"] == "busy"
            # root, meanwhile, is served (asked from the parent while these stay open)
            os.write(go_write, b"x")
            os.read(done_read, 1)
            return {"held": len(held), "refused": refused}

        go_read, go_write = os.pipe()
        done_read, done_write = os.pipe()
        import threading

        outcome: dict = {}
        worker = threading.Thread(target=lambda: outcome.update(run_as(NOBODY, NOBODY, hold_many)))
        worker.start()
        os.read(go_read, 1)
        with BlockingControlClient.connect(server.server.path) as client:
            assert client.call("status") == "up"
        os.write(done_write, b"x")
        worker.join(30)
        assert outcome["value"] == {"held": 4, "refused": 12}
    finally:
        server.stop()


def test_close_with_a_connection_open_logs_no_error(short_dir, caplog):
    """SIGTERM with a CLI connected: the connection ends quietly (Python 3.11 logged a
    cancelled connection handler as "Exception in callback ... CancelledError")."""
    async def scenario():
        server = ControlServer(short_dir / "control.sock", [])
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(short_dir / "control.sock"))
        await asyncio.sleep(0.05)  # the server is waiting for the request line
        await server.close()
        assert await reader.read() == b""
        writer.close()

    asyncio.run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
