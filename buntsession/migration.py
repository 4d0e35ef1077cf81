"""Reading the cookies of Starlette's own `SessionMiddleware`, to move their sessions to the server
(`SessionMiddleware(import_cookie_sessions=True)`).

Starlette keeps the whole session in its cookie: `TimestampSigner(secret_key).sign(b64encode(json))`
(itsdangerous: HMAC-SHA1, django-concat key derivation, the signing time in the value), and checks the
signature's age against its `max_age`. `StarletteCookies.read` does the same checks with the same secret
and gives the data back, or None for anything else.

An imported cookie leaves a marker in the store (see `import_marker`), so that the same cookie, sent
again, leads to the server-side session it became rather than to a second copy, and to nothing once that
session has ended: a cookie imported once can never bring a logged-out session back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import itsdangerous
from itsdangerous.exc import BadSignature
from starlette.datastructures import Secret

from buntsession.codec import check_key, check_value

__all__ = ["Import", "StarletteCookies", "hide_token", "import_marker", "reveal_token"]

NO_MAX_AGE_LIMIT = 14 * 24 * 3600
"""How old a Starlette cookie may be when Starlette ran with max_age=None (its signatures never expire)."""


class Import(NamedTuple):
    """A valid Starlette cookie whose data a request took over."""

    marker: str
    """The store key of its marker."""
    pad: bytes
    """32 bytes derived from the cookie, to hide the new session's token in the marker."""
    until: float
    """Unix time until which the cookie would have been accepted: the marker lives that long."""


def import_marker(cookie: bytes) -> tuple[str, bytes]:
    """The marker's store key and pad of `cookie`: two unrelated one-way hashes of it. The key cannot be
    turned back into the cookie nor into the pad, so a copy of the store reveals no token."""
    key = "import:" + hashlib.sha256(b"buntsession.import.key\0" + cookie).hexdigest()
    return key, hashlib.sha256(b"buntsession.import.pad\0" + cookie).digest()


def hide_token(token: str, pad: bytes) -> str:
    """`token` (43 URL-safe characters, 32 bytes) XORed with `pad`, in base64."""
    raw = base64.urlsafe_b64decode(token + "=")
    return base64.b64encode(bytes(a ^ b for a, b in zip(raw, pad, strict=True))).decode("ascii")


def reveal_token(hidden: object, pad: bytes) -> str | None:
    """The token `hide_token` hid with `pad`; None for anything that is not such a value."""
    if type(hidden) is not str:
        return None
    try:
        raw = base64.b64decode(hidden, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 32:
        return None
    return base64.urlsafe_b64encode(bytes(a ^ b for a, b in zip(raw, pad, strict=True))).rstrip(b"=").decode()


class StarletteCookies:
    """Verifies and decodes cookies made by Starlette's `SessionMiddleware` with one of `secret_keys`."""

    def __init__(self, secret_key: str | bytes | Secret | Sequence[str | bytes | Secret], max_age: int | None) -> None:
        # Starlette signs with str(secret_key), whatever it was given (bytes too): so does this.
        keys = [str(secret_key)] if isinstance(secret_key, str | bytes | Secret) else [str(k) for k in secret_key]
        self._signers = [itsdangerous.TimestampSigner(key) for key in keys]
        self.max_age = max_age

    def read(self, cookie: bytes) -> tuple[dict[str, Any], float] | None:
        """The session data of a valid, unexpired Starlette cookie and the unix time until which it stays
        valid; None when the cookie is not one (forged, tampered with, expired, not JSON, not a dict, or
        holding what a session here cannot keep, such as a NaN). With max_age=None (Starlette's signatures
        then never expire) a cookie is taken for `NO_MAX_AGE_LIMIT` seconds after it was signed."""
        if cookie.startswith(b'"') and cookie.endswith(b'"') and len(cookie) > 1:
            cookie = cookie[1:-1]  # a quoted cookie value, as Starlette's cookie parser would unquote it
        max_age = self.max_age if self.max_age is not None else NO_MAX_AGE_LIMIT
        for signer in self._signers:
            try:
                payload, signed_at = signer.unsign(cookie, max_age=max_age, return_timestamp=True)
            except BadSignature:
                continue
            try:
                data = json.loads(base64.b64decode(payload, validate=True))
            except (ValueError, binascii.Error, RecursionError):
                return None
            if type(data) is not dict:
                return None
            try:
                for key, value in data.items():
                    check_key(key)
                    check_value(value)
            except (TypeError, ValueError):
                return None
            return data, signed_at.timestamp() + max_age
        return None
