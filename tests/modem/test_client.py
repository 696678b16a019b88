"""ATClient against a real pty (and a TCP socket) answered by a thread."""

from __future__ import annotations

import asyncio
import os
import errno
import threading

import pytest

from at_commands.client import (ATClient, CommandError, CommandTimeout, PortBusy, PortLost,
                                PortNotFound)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_command_returns_lines_and_final(pty_responder):
    responder = pty_responder()

    async def main():
        client = await ATClient.open(responder.path)
        try:
            response = await client.command("AT+CSQ", timeout=2)
            assert response.lines == ["+CSQ: 20,99"]
            assert response.final.ok
        finally:
            client.close()

    run(main())
    assert responder.received == ["AT+CSQ"]


def test_echo_is_dropped(pty_responder):
    responder = pty_responder(echo=True)

    async def main():
        client = await ATClient.open(responder.path)
        try:
            assert (await client.command("AT+CSQ", timeout=2)).lines == ["+CSQ: 20,99"]
            assert (await client.command("AT+CPIN?", timeout=2)).lines == ["+CPIN: READY"]
        finally:
            client.close()

    run(main())


def test_urcs_interleaved_are_delivered_to_subscribers_not_to_the_command(pty_responder, replies):
    def handler(command):
        if command == "AT+CSQ":
            return (b"\r\n+CREG: 1,\"8BE3\",\"2B5D\"\r\n+CSQ: 17,99\r\nRING\r\n\r\nOK\r\n"
                    b"\r\n+CTZE: \"+32\",0,\"2024/01/02,03:04:05\"\r\n")
        return replies.canned(command)

    responder = pty_responder(handler)

    async def main():
        client = await ATClient.open(responder.path)
        urcs: list[str] = []
        unsubscribe = client.subscribe_urcs(urcs.append)
        try:
            responder.write(b"\r\n+CPIN: NOT READY\r\n")  # before the command
            response = await client.command("AT+CSQ", timeout=2)
            assert response.lines == ["+CSQ: 17,99"]
            for _ in range(100):
                if len(urcs) == 4:
                    break
                await asyncio.sleep(0.01)
            assert urcs == ["+CPIN: NOT READY", '+CREG: 1,"8BE3","2B5D"', "RING",
                            '+CTZE: "+32",0,"2024/01/02,03:04:05"']
            unsubscribe()
            responder.write(b"\r\nRING\r\n")
            await client.command("AT", timeout=2)
            assert len(urcs) == 4
        finally:
            client.close()

    run(main())


def test_cme_error_raises_typed_error(pty_responder, replies):
    responder = pty_responder(lambda c: b"\r\n+CME ERROR: 10\r\n" if c == "AT+CPIN?" else replies.canned(c))

    async def main():
        client = await ATClient.open(responder.path)
        try:
            with pytest.raises(CommandError) as info:
                await client.command("AT+CPIN?", timeout=2)
            assert info.value.cme == (10, "10")
            raw = await client.send_raw_line("AT+CPIN?")
            assert raw.final.kind.value == "cme_error" and raw.final.code == 10
        finally:
            client.close()

    run(main())


@pytest.mark.parametrize("late_after", [0.3, 0.6])
def test_late_reply_is_never_given_to_the_next_command(pty_responder, late_after, replies):
    def handler(command):
        if command == "AT+SLOW":
            return (late_after, replies.ok("+SLOW: stale"))
        return replies.canned(command)

    responder = pty_responder(handler)

    async def main():
        client = await ATClient.open(responder.path)
        try:
            with pytest.raises(CommandTimeout):
                await client.command("AT+SLOW", timeout=0.1)
            if late_after < 0.5:
                await asyncio.sleep(late_after)  # the late reply lands while idle
            response = await client.command("AT+CSQ", timeout=3)
            assert response.lines == ["+CSQ: 20,99"]
            assert (await client.command("AT+CPIN?", timeout=2)).lines == ["+CPIN: READY"]
        finally:
            client.close()

    run(main())
    assert responder.received[:3] == ["AT+SLOW", "ATS3?", "AT+CSQ"]


def test_unanswered_probes_close_the_port_as_unresponsive(pty_responder, replies):
    """A command timeout then two unanswered probes: 3 consecutive timeouts close the
    port (ModemManager's policy); the caller and every waiter get PortLost."""
    def handler(command):
        if command in ("AT+HANG", "ATS3?", "ATS4?"):
            return None
        return replies.canned(command)

    responder = pty_responder(handler)

    async def main():
        client = await ATClient.open(responder.path, resync_timeout=0.05)
        with pytest.raises(CommandTimeout):
            await client.command("AT+HANG", timeout=0.05)
        queued = asyncio.ensure_future(client.command("AT+CPIN?", timeout=2))
        with pytest.raises(PortLost, match="unresponsive: 3 consecutive timeouts"):
            await client.command("AT+CSQ", timeout=2)
        with pytest.raises(PortLost):
            await queued
        assert client.lost.done() and "unresponsive" in str(client.lost.result())
        again = await ATClient.open(responder.path, resync_timeout=0.05)  # the port was released
        try:
            assert (await again.command("AT+CSQ", timeout=2)).lines == ["+CSQ: 20,99"]
        finally:
            again.close()

    run(main())
    assert responder.received[:3] == ["AT+HANG", "ATS3?", "ATS4?"]
    assert "AT+CPIN?" not in responder.received


def test_a_success_resets_the_failure_count(pty_responder, replies):
    def handler(command):
        return None if command == "AT+HANG" else replies.canned(command)

    responder = pty_responder(handler)

    async def main():
        client = await ATClient.open(responder.path)
        try:
            for _ in range(5):  # timeout, then a probe and a command that succeed
                with pytest.raises(CommandTimeout):
                    await client.command("AT+HANG", timeout=0.05)
                assert (await client.command("AT+CSQ", timeout=2)).final.ok
            assert not client.is_lost
        finally:
            client.close()

    run(main())


def test_unplug_mid_command_raises_port_lost_for_every_waiter(pty_responder, replies):
    responder = pty_responder(lambda c: None if c == "AT+HANG" else replies.canned(c))

    async def main():
        client = await ATClient.open(responder.path)
        first = asyncio.create_task(client.command("AT+HANG", timeout=10))
        queued = asyncio.create_task(client.command("AT+CSQ", timeout=10))
        await asyncio.sleep(0.1)
        threading.Thread(target=responder.unplug).start()
        for task in (first, queued):
            with pytest.raises(PortLost):
                await task
        await asyncio.wait_for(client.wait_closed(), 2)
        assert client.lost.done()
        with pytest.raises(PortLost):
            await client.command("AT", timeout=1)

    run(main())


def test_garbage_and_nuls_around_replies(pty_responder, replies):
    def handler(command):
        if command == "AT":
            return b"\x00\x00\xff\xfe\x01\r\n\x00\x00OK\r\n"
        if command == "AT+CSQ":
            return b"\xff\xff\r\r\n+CSQ: 5,99\r\r\n\r\r\nOK\r\r\n"
        return replies.canned(command)

    responder = pty_responder(handler)

    async def main():
        client = await ATClient.open(responder.path)
        try:
            assert (await client.command("AT", timeout=2)).final.ok
            assert (await client.command("AT+CSQ", timeout=2)).lines == ["+CSQ: 5,99"]
        finally:
            client.close()

    run(main())


def test_second_open_is_refused_with_port_busy(pty_responder):
    responder = pty_responder()

    async def main():
        client = await ATClient.open(responder.path)
        try:
            with pytest.raises(PortBusy):
                await ATClient.open(responder.path)
            # A process without CAP_SYS_ADMIN gets EBUSY from the kernel itself (TIOCEXCL).
            os.chmod(responder.path, 0o666)
            pid = os.fork()
            if pid == 0:  # child: drop root, try to open, report through the exit code
                code = 4
                try:
                    if os.geteuid() == 0:
                        os.setgid(65534)
                        os.setuid(65534)
                    os.close(os.open(responder.path, os.O_RDWR | os.O_NOCTTY))
                except OSError as exc:
                    code = 0 if exc.errno == errno.EBUSY else 3
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert (await client.command("AT", timeout=2)).final.ok
        finally:
            client.close()
        # Closing releases the port.
        again = await ATClient.open(responder.path)
        again.close()

    run(main())


def test_missing_port_is_port_not_found(tmp_path):
    with pytest.raises(PortNotFound):
        run(ATClient.open(str(tmp_path / "ttyUSB9")))


def test_socket_url(socket_responder):
    responder = socket_responder(echo=True)

    async def main():
        client = await ATClient.open(responder.url)
        try:
            assert (await client.command("AT+CSQ", timeout=2)).lines == ["+CSQ: 20,99"]
            with pytest.raises(CommandError):
                await client.command("AT+NOPE", timeout=2)
        finally:
            client.close()

    run(main())


def test_timer_and_answer_in_the_same_loop_turn_is_not_a_protocol_error(pty_responder, replies):
    """The timer fires and the final result is read before the caller resumes (one loop
    turn): the caller gets CommandTimeout, the core is in step, nothing is refused."""
    responder = pty_responder(lambda c: None if c == "AT+SLOW" else replies.canned(c))

    async def main():
        client = await ATClient.open(responder.path)
        try:
            caller = asyncio.ensure_future(client.command("AT+SLOW", timeout=10))
            while "AT+SLOW" not in responder.received:
                await asyncio.sleep(0.005)
            # The same loop turn, in this order: the timer, then the reader.
            responder.write(replies.ok("+SLOW: 1"))
            client._waiter.set_exception(TimeoutError())
            client._on_readable()
            with pytest.raises(CommandTimeout):
                await caller
            assert (await client.command("AT+CSQ", timeout=2)).lines == ["+CSQ: 20,99"]
        finally:
            client.close()

    run(main())
    assert "ATS3?" not in responder.received  # in step: no probe was needed
