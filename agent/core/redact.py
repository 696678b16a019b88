"""Redaction for what leaves the terminal for support (the `diag --bundle` tarball, the
daemon's AT transcript): secrets out, the rest readable."""

from __future__ import annotations

import re
from typing import Any

from at_commands.commands import REDACTED, redact_secrets

# A field holding a secret: the name is, or ends in, one of these words.
_SECRET_NAME = r"(?:[\w.-]*[_.-])?(?:password|passwd|pass|passphrase|secret|token|key|psk|pin|puk|credentials?)"
_SECRET_NAME_RE = re.compile(rf"^{_SECRET_NAME}$", re.IGNORECASE)
# Public PEM material is useful for support; every other PEM block is key material.
_PUBLIC_PEM = {"CERTIFICATE", "PUBLIC KEY", "X509 CRL", "CERTIFICATE REQUEST"}
_PEM_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?(?:-----END \1-----|\Z)", re.DOTALL)
_JWT_RE = re.compile(r"\beyJ[\w-]*\.[\w-]+\.[\w-]*")
_FIELD_VALUE = "|".join(
    (r'"""[\s\S]*?"""', r"'''[\s\S]*?'''", r'"(?:[^"\\\n]|\\.)*"', r"'[^'\n]*'", r"[^\s,;}\]]+")
)
_FIELD_RE = re.compile(rf"""(?P<name>["']?\b{_SECRET_NAME}\b["']?\s*[=:]\s*)(?:{_FIELD_VALUE})""", re.IGNORECASE)


def redact_text(text: str) -> str:
    """Removes secrets from free text: key PEM blocks, JWTs, `name = value` / `"name": value`
    fields named like secrets, and the arguments of AT commands that carry PINs or
    passwords. Errs towards removing too much, but leaves prose in a comment readable
    (``# Secret: the password is read from this file``)."""
    text = _PEM_RE.sub(lambda m: m.group(0) if m.group(1) in _PUBLIC_PEM else f"-----BEGIN {m.group(1)}----- {REDACTED}", text)
    text = _JWT_RE.sub(REDACTED, text)
    text = redact_secrets(text)  # AT commands that carry PINs or passwords (at_commands' vocabulary)
    return _FIELD_RE.sub(_redact_field, text)


def _redact_field(match: re.Match) -> str:
    quoted = match.group(0)[len(match.group("name")) :].startswith(("'", '"'))
    if not quoted and match.group("name").rstrip().endswith(":") and _in_comment(match):
        return match.group(0)  # "Secret: the ..." in a comment is prose, not a field
    return match.group("name") + (f'"{REDACTED}"' if quoted else REDACTED)  # keeps JSON/TOML parseable


def redact_value(value: Any) -> Any:
    """Redacts a JSON-like value: secret-named keys lose their value, strings are
    cleaned by ``redact_text``."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_NAME_RE.match(str(k)) else redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def _in_comment(match: re.Match) -> bool:
    line_start = match.string.rfind("\n", 0, match.start()) + 1
    return "#" in match.string[line_start:match.start()]
