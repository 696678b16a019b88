"""The command vocabulary: which lines are network scans, which may be aborted."""

from __future__ import annotations

import pytest

from at_commands.commands import is_abortable, is_network_scan, split_line

CASES = [
    # line, scan, abortable
    ("AT+COPS=?", True, True),
    ("at+cops=?", True, True),
    ("  AT +COPS = ?  ", True, True),
    ("AT+COPS=?;+COPS=?", True, True),
    ("AT+CSQ;+COPS=?", True, False),  # a scan anywhere is a scan; CSQ is not abortable
    ("AT+CFUN=1;+COPS=?", True, False),
    ("ATE0+COPS=?", True, False),  # basic command then extended, no ';'
    ("AT+COPS?", False, False),
    ("AT+COPS=0", False, False),
    ('AT+CMGS="+COPS=?"', False, False),  # quoted data is not a command
    ("AT", False, False),
    ("", False, False),
]


@pytest.mark.parametrize("line, scan, abortable", CASES)
def test_classification(line, scan, abortable):
    assert (is_network_scan(line), is_abortable(line)) == (scan, abortable)


def test_split_line():
    assert split_line("at +csq; +cops = ?") == ["+CSQ", "+COPS=?"]
    assert split_line('AT+CPBW=1,"a;b"') == ['+CPBW=1,""']
