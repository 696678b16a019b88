"""The sans-IO core: table-driven cases, every byte split, hypothesis fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from at_commands.protocol import (NEED_DATA, TRANSITIONS, Aborted, Connection, Discarded, FinalResult,
                                  Input, Line, LocalProtocolError, Prompt, ResultKind,
                                  Resynchronised, State, Urc)

OK = FinalResult(ResultKind.OK, None, "OK")

# (name, command or None, input bytes, expected events)
CASES = [
    ("plain", "AT+CSQ", b"\r\n+CSQ: 20,99\r\n\r\nOK\r\n", [Line("+CSQ: 20,99"), OK]),
    ("echo", "AT+CSQ", b"AT+CSQ\r\r\n+CSQ: 20,99\r\n\r\nOK\r\n", [Line("+CSQ: 20,99"), OK]),
    ("echo lower-case", "at+csq", b"at+csq\r\r\n+CSQ: 1,0\r\nOK\r\n", [Line("+CSQ: 1,0"), OK]),
    ("crcrlf", "ATI", b"\r\r\nQuectel\r\r\nEC25\r\r\n\r\r\nOK\r\r\n", [Line("Quectel"), Line("EC25"), OK]),
    ("bare lf", "ATI", b"\nQuectel\nOK\n", [Line("Quectel"), OK]),
    ("leading nuls and junk", "AT", b"\x00\x00\xff\xfe\x01\r\n\x00OK\r\n", [OK]),
    ("junk-only line", "AT", b"\r\n\xff\xfe\x00\r\nOK\r\n", [OK]),
    ("error", "AT+FOO", b"\r\nERROR\r\n", [FinalResult(ResultKind.ERROR, None, "ERROR")]),
    ("cme numeric", "AT+CPIN?", b"\r\n+CME ERROR: 10\r\n", [FinalResult(ResultKind.CME_ERROR, 10, "10")]),
    ("cme text", "AT+CPIN?", b"\r\n+CME ERROR: SIM not inserted\r\n",
     [FinalResult(ResultKind.CME_ERROR, None, "SIM not inserted")]),
    ("cms", "AT+CMGS=1", b"\r\n+CMS ERROR: 500\r\n", [FinalResult(ResultKind.CMS_ERROR, 500, "500")]),
    # "²" is a digit to str.isdigit() but not to int(); "٤" is one to both: neither is a 27.007 code.
    ("cme with a superscript digit", "AT+CPIN?", "\r\n+CME ERROR: ²\r\n".encode(),
     [FinalResult(ResultKind.CME_ERROR, None, "²")]),
    ("cms with an Arabic-Indic digit", "AT+CMGS=1", "\r\n+CMS ERROR: ٤\r\n".encode(),
     [FinalResult(ResultKind.CMS_ERROR, None, "٤")]),
    ("not supported", "AT+X", b"\r\nCOMMAND NOT SUPPORT\r\n",
     [FinalResult(ResultKind.NOT_SUPPORTED, None, "COMMAND NOT SUPPORT")]),
    ("no carrier", "ATD123;", b"\r\nNO CARRIER\r\n", [FinalResult(ResultKind.NO_CARRIER, None, "NO CARRIER")]),
    ("urc before, inside, after", "AT+CSQ",
     b"\r\nRING\r\n\r\n+CSQ: 20,99\r\n+CREG: 1\r\n\r\nOK\r\n\r\n+QIND: SMS DONE\r\n",
     [Urc("RING"), Line("+CSQ: 20,99"), Urc("+CREG: 1"), OK, Urc("+QIND: SMS DONE")]),
    ("solicited creg is a line", "AT+CREG?", b"\r\n+CREG: 2,1,\"8BE3\",\"2B5D\"\r\n\r\nOK\r\n",
     [Line('+CREG: 2,1,"8BE3","2B5D"'), OK]),
    ("unsolicited creg during creg?", "AT+CREG?",
     b"\r\n+CREG: 1,\"8BE3\",\"2B5D\"\r\n+CREG: 2,1\r\nOK\r\n",
     [Urc('+CREG: 1,"8BE3","2B5D"'), Line("+CREG: 2,1"), OK]),
    ("cpin answer vs cpin urc", "AT+CPIN?", b"\r\n+CPIN: READY\r\nOK\r\n", [Line("+CPIN: READY"), OK]),
    ("cpin urc during another command", "AT+CSQ", b"\r\n+CPIN: NOT READY\r\n+CSQ: 1,1\r\nOK\r\n",
     [Urc("+CPIN: NOT READY"), Line("+CSQ: 1,1"), OK]),
    ("idle lines are urcs", None, b"\r\nRDY\r\n\r\n+CFUN: 1\r\nhello\r\n",
     [Urc("RDY"), Urc("+CFUN: 1"), Urc("hello")]),
    ("stray final while idle", None, b"\r\nOK\r\n", [Discarded("stray", "OK")]),
    ("overlong line dropped", "AT+X", b"\r\n" + b"A" * 5000 + b"\r\nOK\r\n", [Discarded("overlong", "", 5000), OK]),
    ("profile urc regex", "AT+CSQ", b"\r\n+ACME: SIM OUT\r\n+CSQ: 3,3\r\nOK\r\n",
     [Urc("+ACME: SIM OUT"), Line("+CSQ: 3,3"), OK]),
]


def feed_all(conn: Connection, chunks) -> list:
    events = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
        assert conn.buffered <= conn.max_line
    return events


def fresh(command: str | None) -> Connection:
    conn = Connection(urc_patterns=[r"^\+ACME: SIM"])
    if command:
        conn.send_command(command)
    return conn


@pytest.mark.parametrize("name,command,data,expected", CASES, ids=[c[0] for c in CASES])
def test_case(name, command, data, expected):
    assert feed_all(fresh(command), [data]) == expected


@pytest.mark.parametrize("name,command,data,expected", CASES, ids=[c[0] for c in CASES])
def test_every_split_gives_the_same_events(name, command, data, expected):
    for i in range(len(data) + 1):
        assert feed_all(fresh(command), [data[:i], data[i:]]) == expected, f"split at {i}"
    assert feed_all(fresh(command), [data[i:i + 1] for i in range(len(data))]) == expected


def test_transition_table_is_complete():
    assert set(TRANSITIONS) == {(s, i) for s in State for i in Input}


def test_one_command_at_a_time():
    conn = fresh("AT")
    with pytest.raises(LocalProtocolError):
        conn.send_command("AT+CSQ")
    with pytest.raises(ValueError):
        Connection().send_command("AT\r+CFUN=0")


def test_timeout_then_late_reply_then_probe():
    conn = fresh("AT+CPIN?")
    conn.command_timed_out()
    with pytest.raises(LocalProtocolError):
        conn.send_command("AT+CSQ")  # must resynchronise first
    # Late reply (a +CPIN: line looks like a URC but answers the timed-out command),
    # a real URC, then the probe and its answer.
    events = feed_all(conn, [b"\r\n+CPIN: READY\r\n\r\nOK\r\n\r\nRING\r\n"])
    assert events == [Discarded("stale", "+CPIN: READY"), Discarded("stale", "OK"), Urc("RING")]
    assert conn.send_probe() == b"ATS3?\r"
    # The late reply may also arrive after the probe went out.
    events = feed_all(conn, [b"\r\n+CPIN: READY\r\nOK\r\nATS3?\r\r\n013\r\n\r\nOK\r\n"])
    assert events[-1] == Resynchronised()
    assert all(isinstance(e, Discarded) for e in events[:-1])
    assert conn.state is State.IDLE
    conn.send_command("AT+CSQ")
    assert feed_all(conn, [b"\r\n+CSQ: 9,9\r\nOK\r\n"]) == [Line("+CSQ: 9,9"), OK]


def test_probes_rotate_and_an_old_probes_answer_is_stale():
    conn = fresh("AT+X")
    conn.command_timed_out()
    assert conn.send_probe() == b"ATS3?\r"
    assert conn.send_probe() == b"ATS4?\r"  # re-probe from PROBING: a different register
    # The first probe's answer comes late: stale, not the marker of the second.
    events = feed_all(conn, [b"ATS3?\r\r\n013\r\n\r\nOK\r\n"])
    assert all(isinstance(e, Discarded) for e in events) and conn.state is State.PROBING
    conn.receive_data(b"\r\n010\r\n")
    assert conn.state is State.PROBE_ANSWERED
    assert conn.send_probe() == b"ATS5?\r"  # re-probe from PROBE_ANSWERED too
    events = feed_all(conn, [b"\r\nOK\r\n\r\n008\r\n\r\nOK\r\n"])
    assert events[-1] == Resynchronised() and conn.state is State.IDLE
    conn.send_command("AT")  # in step again


def test_give_up_from_every_pending_state_leaves_a_recoverable_core():
    for setup in ("awaiting", "aborting", "probing", "probe-answered", "desync", "idle"):
        conn = Connection()
        if setup != "idle":
            conn.send_command("AT+COPS=?")
        if setup == "aborting":
            conn.abort()
        if setup in ("probing", "probe-answered", "desync"):
            conn.command_timed_out()
        if setup in ("probing", "probe-answered"):
            conn.send_probe()
        if setup == "probe-answered":
            conn.receive_data(b"\r\n013\r\n")
        assert conn.state.value == setup
        conn.give_up()
        assert conn.state is (State.IDLE if setup == "idle" else State.DESYNC)
        if conn.needs_resync:
            probe = conn.send_probe()
            marker = {b"ATS3?\r": b"013", b"ATS4?\r": b"010"}[probe]
            feed_all(conn, [b"\r\n" + marker + b"\r\nOK\r\n"])
        assert conn.state is State.IDLE, setup


def test_abort_ends_with_the_commands_final_result_as_aborted():
    conn = fresh("AT+COPS=?")
    assert conn.abort() == b"\r"
    assert conn.state is State.ABORTING
    with pytest.raises(LocalProtocolError):
        conn.abort()  # one abort per command
    with pytest.raises(LocalProtocolError):
        conn.send_command("AT+CFUN=4")
    events = feed_all(conn, [b"\r\n+CREG: 0\r\n\r\nERROR\r\n"])
    assert events == [Urc("+CREG: 0"), Aborted(FinalResult(ResultKind.ERROR, None, "ERROR"))]
    assert conn.state is State.IDLE
    conn.send_command("AT+CFUN=4")


def test_abort_without_final_result_desyncs():
    conn = fresh("AT+COPS=?")
    conn.abort()
    conn.command_timed_out()  # the grace ran out
    assert conn.state is State.DESYNC
    # The scan's late answer is stale while resynchronising.
    conn.send_probe()
    events = feed_all(conn, [b'\r\n+COPS: (2,"A","A","46000",7)\r\nOK\r\n\r\n013\r\nOK\r\n'])
    assert events[:2] == [Discarded("stale", '+COPS: (2,"A","A","46000",7)'), Discarded("stale", "OK")]
    assert events[-1] == Resynchronised()


def test_abort_is_refused_when_nothing_is_executing():
    for conn in (Connection(), fresh("AT")):
        if conn.state is State.AWAITING:
            conn.command_timed_out()
        with pytest.raises(LocalProtocolError):
            conn.abort()


def test_prompt_and_payload():
    conn = Connection()
    conn.send_command('AT+CMGS="123"', expect_prompt=True)
    assert feed_all(conn, [b"\r\n> "]) == [Prompt()]
    assert conn.send_payload(b"hi") == b"hi\x1a"
    assert feed_all(conn, [b"\r\n+CMGS: 4\r\n\r\nOK\r\n"]) == [Line("+CMGS: 4"), OK]


junk = st.binary(max_size=64)
tokens = st.sampled_from([b"OK\r\n", b"ERROR\r\n", b"+CME ERROR: 14\r\n", b"+CSQ: 1,2\r\n", b"RING\r\n",
                          b"+CREG: 1,\"00A\",\"1\"\r\n", b"\x00", b"\xff", b"\r", b"\n", b"> ",
                          b"013\r\n", b"Z" * 300, "+CME ERROR: ²\r\n".encode(), "+CSQ: ²,٤\r\n".encode(),
                          "\u0663".encode()])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(junk, tokens), max_size=40), st.integers(1, 64), st.booleans())
def test_fuzz_no_exception_and_bounded_buffer(parts, chunk, timed_out):
    conn = Connection(max_line=256)
    conn.send_command("AT+CSQ", expect_prompt=True)
    if timed_out:
        conn.command_timed_out()
        conn.send_probe()
    data = b"".join(parts)
    events = feed_all(conn, [data[i:i + chunk] for i in range(0, len(data), chunk)])
    assert len(events) <= data.count(b"\r") + data.count(b"\n") + data.count(b">") + 1
    # The same bytes in one piece give the same events.
    conn2 = Connection(max_line=256)
    conn2.send_command("AT+CSQ", expect_prompt=True)
    if timed_out:
        conn2.command_timed_out()
        conn2.send_probe()
    assert feed_all(conn2, [data]) == events


def test_aborted_command_that_had_already_finished_still_ends_as_aborted():
    """The scan's OK crossed the abort byte on the wire: the OK ends it (as Aborted) and
    the CR reaches the modem as an empty line, which it ignores."""
    conn = fresh("AT+COPS=?")
    conn.abort()
    events = feed_all(conn, [b'\r\n+COPS: (2,"A","A","46000",7),,(0,1),(0,2)\r\n\r\nOK\r\n'])
    assert events == [Line('+COPS: (2,"A","A","46000",7),,(0,1),(0,2)'), Aborted(OK)]
    conn.send_command("AT+CFUN=4")
    assert feed_all(conn, [b"\r\nOK\r\n"]) == [OK]


# Caller actions in every state: what the table allows, and where it leads.
CALLER_ACTIONS = {
    State.IDLE: {"send": State.AWAITING},
    State.AWAITING: {"timeout": State.DESYNC, "abort": State.ABORTING},
    State.ABORTING: {"timeout": State.DESYNC},
    State.DESYNC: {"timeout": State.DESYNC, "probe": State.PROBING},
    State.PROBING: {"timeout": State.DESYNC, "probe": State.PROBING},
    State.PROBE_ANSWERED: {"timeout": State.DESYNC, "probe": State.PROBING},
}


def connection_in(state: State) -> Connection:
    conn = Connection()
    if state is State.IDLE:
        return conn
    conn.send_command("AT+COPS=?")
    if state is State.ABORTING:
        conn.abort()
    elif state is not State.AWAITING:
        conn.command_timed_out()
        if state is not State.DESYNC:
            conn.send_probe()
        if state is State.PROBE_ANSWERED:
            conn.receive_data(b"\r\n013\r\n")
    assert conn.state is state
    return conn


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize("action", ["send", "timeout", "probe", "abort"])
def test_caller_actions_in_every_state(state, action):
    conn = connection_in(state)
    do = {"send": lambda: conn.send_command("AT"), "timeout": conn.command_timed_out,
          "probe": conn.send_probe, "abort": conn.abort}[action]
    target = CALLER_ACTIONS[state].get(action)
    if target is None:
        with pytest.raises(LocalProtocolError):
            do()
        assert conn.state is state
    else:
        do()
        assert conn.state is target


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_line_inputs_in_every_state(state):
    """A final result, a text line, a URC and an echo in each state (one table row each)."""
    expected = {
        State.IDLE: [Urc("hello"), Urc("RING"), Discarded("stray", "OK")],
        State.AWAITING: [Line("hello"), Urc("RING"), OK],
        State.ABORTING: [Line("hello"), Urc("RING"), Aborted(OK)],
        State.DESYNC: [Discarded("stale", "hello"), Urc("RING"), Discarded("stale", "OK")],
        State.PROBING: [Discarded("stale", "hello"), Urc("RING"), Discarded("stale", "OK")],
        State.PROBE_ANSWERED: [Discarded("stale", "hello"), Urc("RING"), Resynchronised()],
    }[state]
    conn = connection_in(state)
    assert feed_all(conn, [b"AT+COPS=?\r\r\nhello\r\nRING\r\nOK\r\n"])[-3:] == expected


def _aborting() -> Connection:
    conn = fresh("AT+COPS=?")
    conn.abort()
    return conn


def _second_probe() -> Connection:
    conn = fresh("AT+CPIN?")
    conn.command_timed_out()
    conn.send_probe()
    conn.send_probe()
    return conn


NEW_STATE_CASES = [
    ("aborting", _aborting, b'AT+COPS=?\r\r\n+COPS: (1,"A","A","46000",7)\r\n+CREG: 0\r\n\r\nERROR\r\n',
     [Line('+COPS: (1,"A","A","46000",7)'), Urc("+CREG: 0"), Aborted(FinalResult(ResultKind.ERROR, None, "ERROR"))]),
    ("old probe answer then new", _second_probe,
     b"\r\n+CPIN: READY\r\nOK\r\nATS3?\r\r\n013\r\n\r\nOK\r\nATS4?\r\r\n010\r\n\r\nOK\r\n",
     [Discarded("stale", "+CPIN: READY"), Discarded("stale", "OK"), Discarded("stale", "ATS3?"),
      Discarded("stale", "013"), Discarded("stale", "OK"), Discarded("stale", "ATS4?"), Resynchronised()]),
]


@pytest.mark.parametrize("name,make,data,expected", NEW_STATE_CASES, ids=[c[0] for c in NEW_STATE_CASES])
def test_every_split_in_the_new_states(name, make, data, expected):
    for i in range(len(data) + 1):
        assert feed_all(make(), [data[:i], data[i:]]) == expected, f"split at {i}"
    assert feed_all(make(), [data[i:i + 1] for i in range(len(data))]) == expected


def test_a_final_dropped_while_probing_says_which_result_it_was():
    """The client re-probes at once on a dropped error final (a busy module's answer to the
    probe); the event carries the result so it need not classify the text again."""
    conn = fresh("AT+CPIN?")
    conn.command_timed_out()
    conn.send_probe()
    conn.receive_data(b"\r\n+CME ERROR: 14\r\n\r\nOK\r\n")
    refused, old_ok = conn.events()
    assert refused == Discarded("stale", "+CME ERROR: 14") and old_ok == Discarded("stale", "OK")
    assert refused.final == FinalResult(ResultKind.CME_ERROR, 14, "14") and old_ok.final.ok
    assert conn.state is State.PROBING


@pytest.mark.parametrize("tail", [b">", b"\r\n> "])
def test_a_prompt_char_inside_an_overlong_line_is_no_prompt_however_it_is_cut(tail):
    """Found by the fuzz test: 300 x "Z" then ">" gave a Prompt when the Zs came in chunks
    (the overlong part was already skipped, so ">" looked like a line start) and none in one
    piece. A line end after the overlong part still lets the prompt through, after the
    overlong line is reported."""
    data = b"Z" * 300 + tail
    expected = None
    for chunk in (1, 7, 60, len(data)):
        conn = Connection(max_line=256)
        conn.send_command("AT+CMGS=12", expect_prompt=True)
        events = feed_all(conn, [data[i:i + chunk] for i in range(0, len(data), chunk)])
        expected = events if expected is None else expected
        assert events == expected, chunk
    assert expected == ([] if tail == b">" else [Discarded("overlong", "", 300), Prompt()])

