"""TEMPORARY stub; replaced by the AT-layer branch."""
import re


def _norm(line: str) -> str:
    return re.sub(r"\s+", "", line).upper()


def is_network_scan(line: str) -> bool:
    return "+COPS=?" in _norm(line)


def is_abortable(line: str) -> bool:
    return is_network_scan(line)
