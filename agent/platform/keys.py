"""Operator keys and the tokens they sign (SPEC §4).

A token is made with the agent's own vocabulary (`agent.core.tokens`: algorithm, actions,
claims, key id) and checked with the agent's own verifier before it is printed, so a
token this module hands out is one the terminal accepts (until it expires or is used).
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.core import tokens
from agent.core.clock import Stamp
from agent.core.evidence import public_key_b64, raw_public_key
from agent.platform.errors import PlatformError, UsageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# The command names of `simagent-platform token` -> the token's `act` claim.
TOKEN_COMMANDS = {"rebind": "rebind", "unbind": "unbind", "modem-reset": "modem_reset", "at": "at"}
DEFAULT_TTL_S = 600
MAX_TTL_S = 7 * 24 * 3600  # a token is a credential: it lives for a job, not for ever
MAX_REASON = 200
_TTL = re.compile(r"([0-9]+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    kid: str
    trusted_keys_value: str  # base64 of the raw public key, as `[binding] trusted_keys` takes it


def parse_ttl(text: str) -> int:
    """`600`, `90s`, `10m`, `2h`, `1d` -> seconds, 1 s .. MAX_TTL_S."""
    match = _TTL.fullmatch(text.strip())
    if not match:
        raise UsageError(f"--ttl: expected a number with an optional unit s, m, h or d (10m), got {text[:40]!r}")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if not 1 <= seconds <= MAX_TTL_S:
        raise UsageError(f"--ttl: must be between 1 s and {MAX_TTL_S // 86400} days, got {text!r}")
    return seconds


def generate(private_path: Path, *, force: bool = False) -> KeyPair:
    """Writes a new Ed25519 key: PRIVATE (PEM PKCS8, mode 0600, created so that it is
    never readable by others, not even for an instant) and PRIVATE.pub (PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public_path = private_path.with_name(private_path.name + ".pub")
    if not force:
        for path in (private_path, public_path):
            if path.exists() or path.is_symlink():
                raise UsageError(f"{path} exists; choose another --out, or --force to replace it")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    temporary = private_path.with_name(f".{private_path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, private_path)
        public_path.write_bytes(public_pem)
    except OSError as exc:
        raise PlatformError(f"cannot write {exc.filename or private_path}: {exc.strerror}") from None
    finally:
        temporary.unlink(missing_ok=True)
    return KeyPair(private_path, public_path, tokens.key_id(raw_public_key(key.public_key())), public_key_b64(key.public_key()))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise UsageError(f"--key: cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"--key: {path} is readable by others (mode {stat.S_IMODE(mode):04o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: encrypted
        raise UsageError(f"--key: {path} is not an unencrypted PEM private key ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"--key: {path} is not an Ed25519 key")
    return key


def mint(key: Ed25519PrivateKey, act: str, device_imei: str, *, iccid: str | None, ttl_s: int,
         reason: str | None = None, now: float | None = None) -> str:
    """A signed token for `act` on the terminal `device_imei`; raises UsageError when the
    terminal would refuse it (checked by the agent's own verifier)."""
    import jwt

    if act not in tokens.ACTIONS:
        raise UsageError(f"unknown action {act!r}")
    if act in tokens.BINDING_ACTIONS and not iccid:
        raise UsageError(f"{act} needs --iccid (the card the terminal is to {'take' if act == 'rebind' else 'release'})")
    if reason is not None and len(reason) > MAX_REASON:
        raise UsageError(f"--reason: at most {MAX_REASON} characters")
    now = time.time() if now is None else now
    claims = {"sub": device_imei, "act": act, "iat": int(now), "exp": int(now) + ttl_s, "jti": secrets.token_urlsafe(16)}
    if iccid:
        claims["iccid"] = iccid
    if reason:
        claims["reason"] = reason
    raw = raw_public_key(key.public_key())
    kid = tokens.key_id(raw)
    token = jwt.encode(claims, key, algorithm=tokens.ALGORITHM, headers={"kid": kid})
    trusted = [tokens.TrustedKey(raw, kid)]
    stamp = Stamp(wall=now, trusted=True, mono=0.0, boot_id="platform")
    try:
        tokens.verify_token(token, trusted, device_imei, stamp, None, actions=(act,))
    except tokens.TokenError as exc:  # bad IMEI/ICCID syntax and the like: the terminal would say the same
        raise UsageError(f"the terminal would refuse this token: {exc.message} (--device is its IMEI, --iccid the card's ICCID)") from None
    return token
