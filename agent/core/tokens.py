"""Re-binding and unbinding tokens (SPEC §4): a JWT signed with EdDSA (Ed25519) by one
of `[binding] trusted_keys`.

Claims: `sub` (the terminal's IMEI), `iccid`, `act` ("rebind" | "unbind"), `exp`, `jti`;
optional `iat`, `reason`. The header may name the key with `kid` = `key_id(key)` (first 16
hex digits of SHA-256 over the raw 32-byte public key); a token naming a key that is not
trusted is refused as `untrusted_key`, one without `kid` is tried against every key.

Expiry uses the trusted time floor kept in the store (the latest trusted wall time ever
seen), so a device whose clock fell back to 1970 cannot be fooled into taking an old token:
`exp` must be after the floor, and after now when the clock is trusted. With an untrusted
clock a token whose `exp` is after the floor is accepted and the evidence says
`time_trusted: false`.

Each `jti` is accepted once (persisted). A refused token changes nothing but the
`token_refused` evidence entry and event.

Two steps. `open_token` checks the header and the signature and gives the signed payload:
the one step that needs PyJWT and cryptography (about 9 MB of native code and modules),
so the daemon runs it in a short-lived helper process (agent.service.offload) and hands
its `Opened` result to `verify_token` / `accept_token`; the CLI and the platform run it
in-process. Everything else (the header read before the signature, the claims, expiry,
replay, key ids) is plain Python.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core.binding import LAST_DECISION_KEY
from agent.core.clock import Stamp, format_utc
from agent.core.evidence import public_key_bytes
from agent.core.files import MIB, read_bounded
from agent.core.store import PROVISION_DIGEST_KEY, RESET_PENDING_KEY, Binding, Store, Transaction

ALGORITHM = "EdDSA"
BINDING_ACTIONS = ("rebind", "unbind")
# Platform commands that need a signed authorisation but change no binding (SPEC §6).
AUTHORISING_ACTIONS = ("modem_reset", "at")
ACTIONS = BINDING_ACTIONS + AUTHORISING_ACTIONS
REFUSAL_CODES = ("bad_signature", "expired", "replayed", "wrong_device", "malformed", "untrusted_key", "bad_claims")
MAX_TOKEN_LENGTH = 8192
MAX_PROVISION_BYTES = 1 * MIB  # some hundred tokens; a larger file is not a manufacturing one
_DIGITS = re.compile(r"[0-9]{6,22}")  # IMEI (15), IMEISV (16), ICCID (18-20, 22 with check digits)


class TokenError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TrustedKey:
    raw: bytes  # the raw 32-byte Ed25519 public key
    id: str


@dataclass(frozen=True)
class Claims:
    sub: str
    iccid: str | None  # None for tokens that authorise a command (modem_reset, at)
    act: str
    exp: float
    jti: str
    iat: float | None
    reason: str | None


@dataclass(frozen=True)
class TokenResult:
    accepted: bool
    code: str | None = None  # the refusal code
    message: str = ""
    claims: Claims | None = None
    time_trusted: bool | None = None


@dataclass(frozen=True)
class Opened:
    """What `open_token` found: the payload a trusted key signed, or the refusal."""

    payload: Any = None
    refusal: TokenError | None = None


def key_id(raw: bytes) -> str:
    """`kid` of a raw 32-byte public key."""
    return hashlib.sha256(raw).hexdigest()[:16]


def load_trusted_keys(entries: Iterable[str]) -> list[TrustedKey]:
    """`[binding] trusted_keys`: each a PEM public key or base64 of the raw 32 bytes."""
    keys = []
    for index, text in enumerate(entries):
        try:
            raw = public_key_bytes(text)
        except ValueError as exc:
            raise ValueError(f"trusted_keys[{index}]: {exc}") from None
        keys.append(TrustedKey(raw, key_id(raw)))
    return keys


def signing_candidates(token: str, keys: list[TrustedKey]) -> list[TrustedKey]:
    """The refusals that come before the signature, from the unverified header: a
    malformed token, an algorithm other than EdDSA, a key that is not trusted. Returns
    the keys the signature may be checked with. Plain Python: the daemon refuses such
    tokens without starting a helper process."""
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("malformed", "empty or oversized token")
    header = _unverified_part(token, 0)
    if not isinstance(header, dict):
        raise TokenError("malformed", "not a JWT (the header is not a JSON object)")
    if header.get("alg") != ALGORITHM:
        # Never let the token pick its algorithm ("none", or HS256 keyed with a public key).
        raise TokenError("bad_signature", f"alg {header.get('alg')!r} is not allowed, only {ALGORITHM}")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenError("malformed", "not a JWT (the kid header is not a string)")
    candidates = [k for k in keys if kid is None or k.id == kid]
    if not candidates:
        raise TokenError("untrusted_key", "no trusted key configured" if not keys else f"key {kid!r} is not trusted")
    return candidates


def _unverified_part(token: str, index: int) -> Any:
    """The JSON of the header (0) or the payload (1), nothing checked."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("malformed", "not a JWT (expected three dot-separated parts)")
    try:
        return json.loads(base64.urlsafe_b64decode(parts[index] + "=" * (-len(parts[index]) % 4)))
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise TokenError("malformed", f"not a JWT ({type(exc).__name__} in part {index + 1})") from None


def open_token(token: str, keys: list[TrustedKey]) -> Opened:
    """The header checks and the signature (PyJWT and cryptography, imported here)."""
    try:
        candidates = signing_candidates(token, keys)
        return Opened(payload=_verified_payload(token.strip(), candidates))
    except TokenError as refusal:
        return Opened(refusal=refusal)


def verify_token(token: str, keys: list[TrustedKey], device_imei: str | None, now: Stamp,
                 time_floor: float | None, *, actions: Iterable[str] = BINDING_ACTIONS,
                 opened: Opened | None = None) -> Claims:
    """Checks everything but replay (that needs the store); `actions` are the `act`
    values the caller is about to carry out; `opened`: what `open_token` gave for this
    token where it ran (the daemon's helper process), else it runs here. Raises TokenError."""
    if opened is None:
        opened = open_token(token, keys)
    if opened.refusal is not None:
        raise opened.refusal
    claims = _claims(opened.payload)
    actions = tuple(actions)
    if claims.act not in actions:
        raise TokenError("bad_claims", f"token authorises {claims.act}, not {' or '.join(actions)}")
    if device_imei is None:
        raise TokenError("wrong_device", "this terminal's IMEI is not known yet")
    if claims.sub != device_imei:
        raise TokenError("wrong_device", f"token is for IMEI {claims.sub}, this terminal is {device_imei}")
    floor = max(filter(None, (time_floor, now.wall if now.trusted else None)), default=None)
    if floor is not None and claims.exp <= floor:
        raise TokenError("expired", f"expired at {format_utc(claims.exp)}, {'now' if now.trusted else 'trusted time floor'} is {format_utc(floor)}")
    return claims


def _verified_payload(token: str, candidates: list[TrustedKey]) -> Any:
    import jwt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    options = {"verify_exp": False, "verify_iat": False, "verify_nbf": False, "verify_aud": False, "verify_iss": False}
    for candidate in candidates:
        try:
            return jwt.decode(token, Ed25519PublicKey.from_public_bytes(candidate.raw), algorithms=[ALGORITHM],
                              options=options)
        except jwt.InvalidSignatureError:
            continue
        except jwt.DecodeError as exc:
            raise TokenError("malformed", str(exc)) from None
        except jwt.InvalidTokenError as exc:
            raise TokenError("bad_claims", str(exc)) from None
    raise TokenError("bad_signature", "signature does not verify with any trusted key")


def _claims(payload: Any) -> Claims:
    if not isinstance(payload, dict):
        raise TokenError("bad_claims", "payload is not a JSON object")

    def text(name: str, pattern: re.Pattern | None = None, required: bool = True, limit: int = 256) -> str | None:
        value = payload.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value or len(value) > limit or (pattern and not pattern.fullmatch(value)):
            raise TokenError("bad_claims", f"claim {name!r} missing or invalid")
        return value

    def number(name: str, required: bool = True) -> float | None:
        value = payload.get(name)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TokenError("bad_claims", f"claim {name!r} missing or not a number")
        return value

    act = text("act")
    if act not in ACTIONS:
        raise TokenError("bad_claims", f"claim 'act' must be one of {', '.join(ACTIONS)}, got {act!r}")
    return Claims(
        sub=text("sub", _DIGITS), iccid=text("iccid", _DIGITS, required=act in BINDING_ACTIONS), act=act, exp=number("exp"),
        jti=text("jti", limit=128), iat=number("iat", required=False), reason=text("reason", required=False),
    )


# A verified token's `iat` this close before our trusted time corroborates it (SPEC §5).
IAT_AGREEMENT = 900.0


def accept_token(store: Store, token: str, keys: list[TrustedKey], device_imei: str | None, *,
                 source: str = "token", actions: Iterable[str] = BINDING_ACTIONS,
                 opened: Opened | None = None) -> TokenResult:
    """Verifies and applies a token in one transaction (`opened`: see verify_token).
    Accepted: the binding change (for rebind/unbind), `token_accepted` and
    `bound`/`unbound`. Refused: only `token_refused`."""
    with store.transaction() as tx:
        now = tx.now()
        try:
            claims = verify_token(token, keys, device_imei, now, tx.time_floor(), actions=actions, opened=opened)
            _apply(tx, claims, now, source)
            if claims.iat is not None and now.trusted and 0 <= now.wall - claims.iat <= IAT_AGREEMENT:
                # The platform's signed issue time and our trusted clock agree: two sources.
                tx.raise_time_floor(dataclasses.replace(now, agreed=True))
        except TokenError as refusal:
            tx.record("token_refused", {"code": refusal.code, "message": refusal.message, "source": source, **_identity(token)})
            return TokenResult(False, refusal.code, refusal.message)
    return TokenResult(True, claims=claims, time_trusted=now.trusted)


def _apply(tx: Transaction, claims: Claims, now: Stamp, source: str) -> None:
    """Applies an already verified token; raises TokenError (before any write) when it
    cannot be applied."""
    current = tx.bindings()
    if claims.act == "unbind" and not any(b.iccid == claims.iccid for b in current):
        raise TokenError("bad_claims", f"no binding for ICCID {claims.iccid} to unbind")
    if not tx.use_token_id(claims.jti, claims.exp, now):
        raise TokenError("replayed", f"token {claims.jti!r} was used before")
    tx.record("token_accepted", {
        "jti": claims.jti, "act": claims.act, "imei": claims.sub, "iccid": claims.iccid, "exp": claims.exp,
        "reason": claims.reason, "source": source, "time_trusted": now.trusted,
    })
    if claims.act in AUTHORISING_ACTIONS:
        return
    # A token changes the bindings: the next decision is a new one, recorded afresh.
    tx.set_meta(LAST_DECISION_KEY, None)
    if claims.act == "rebind":
        tx.set_meta(RESET_PENDING_KEY, None)  # the token says which card belongs here
        tx.delete_all_bindings()
        tx.put_binding(Binding(claims.iccid, claims.sub, now.iso(), source))
        replaced = [{"iccid": b.iccid, "imei": b.imei} for b in current if (b.iccid, b.imei) != (claims.iccid, claims.sub)]
        tx.record("bound", {"iccid": claims.iccid, "imei": claims.sub, "source": source, "jti": claims.jti, "replaced": replaced})
    else:
        tx.delete_binding(claims.iccid)
        tx.record("unbound", {"iccid": claims.iccid, "imei": claims.sub, "source": source, "jti": claims.jti, "reason": claims.reason})


def _identity(token: str) -> dict:
    """What a refused token said it was, for the record - never the token itself (a valid
    one would be a usable credential in the evidence and on MQTT)."""
    try:
        payload = _unverified_part(token.strip(), 1)
    except TokenError:
        return {}
    if not isinstance(payload, dict):
        return {}
    return {k: payload[k] for k in ("jti", "act", "sub", "iccid") if isinstance(payload.get(k), str) and len(payload[k]) <= 128}


@dataclass(frozen=True)
class Provision:
    """A provision file's content not processed yet: its tokens and its digest."""

    tokens: list[str]
    digest: str


def read_provision_file(path: str | Path) -> bytes | None:
    """The provision file's content (None when there is none), read bounded: a FIFO or a
    device there is refused unread (OSError), never waited on or read without end. Blocking
    I/O: the daemon runs it off its loop."""
    try:
        return read_bounded(path, MAX_PROVISION_BYTES)
    except FileNotFoundError:
        return None


def pending_provision(store: Store, content: bytes | None, device_imei: str | None) -> Provision | None:
    """Tokens written at manufacturing (`[binding] provision_file`, its `content`), one per
    line; blank lines and lines starting with '#' are skipped. Judged at start; a file
    already processed (same content) is not judged again, so its tokens are not refused as
    replays each boot. Nothing is judged while this terminal's IMEI is still unknown.
    None: nothing to do."""
    if device_imei is None or content is None:
        return None  # IMEI: judged once the modem has told us who we are
    digest = hashlib.sha256(content).hexdigest()
    if store.read().get_meta(PROVISION_DIGEST_KEY) == digest:
        return None
    lines = content.decode("utf-8", errors="replace").splitlines()
    return Provision([line for line in lines if line.strip() and not line.lstrip().startswith("#")], digest)


def apply_provision(store: Store, provision: Provision, keys: list[TrustedKey], device_imei: str,
                    opened: list[Opened] | None = None) -> list[TokenResult]:
    """Accepts or refuses each token (`opened`: `open_token` of each, run elsewhere), then
    marks the file's content processed."""
    opened = opened or [None] * len(provision.tokens)
    results = [accept_token(store, token, keys, device_imei, source="provision-file", opened=each)
               for token, each in zip(provision.tokens, opened, strict=True)]
    with store.transaction() as tx:
        tx.set_meta(PROVISION_DIGEST_KEY, provision.digest)
    return results


def provision_from_file(store: Store, path: str | Path, keys: list[TrustedKey], device_imei: str | None) -> list[TokenResult]:
    """`pending_provision` and `apply_provision` in one process (tests, tools)."""
    provision = pending_provision(store, read_provision_file(path), device_imei)
    return apply_provision(store, provision, keys, device_imei) if provision else []
