"""Signed cookie values, in the format of itsdangerous' `Signer` (HMAC-SHA256, salt "buntsession.cookie").

itsdangerous derives each key and defines the format; the per-request work is done here with the key's
HMAC state prepared once, since a call through `Signer` costs several times the HMAC itself. The check
compares signatures in constant time (`hmac.compare_digest`). A list of keys rotates: the first signs,
every one verifies, and a value verified by a later key is reported as such, so its cookie is re-signed.

A browser sends the same cookie with every request, so the cookies verified last are remembered: one that
comes back costs a dict lookup instead of an HMAC. Only cookies that verified are kept, and an entry is
found only by the exact bytes of such a cookie, so the lookup tells nothing about any other signature.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Any

import itsdangerous
from starlette.datastructures import Secret

__all__ = ["CookieSigner"]

SALT = "buntsession.cookie"
SIGNATURE_LENGTH = 43
"""Characters of an unpadded URL-safe base64 SHA-256 digest."""
VERIFIED_COOKIES = 4096
"""How many verified cookies a signer remembers at most (it forgets them all when it has that many)."""


def _python_mac(key: bytes, digestmod: str) -> Any:
    return hmac.new(key, digestmod=digestmod)


try:  # OpenSSL's HMAC object itself: copying it skips the pure-Python wrapper of hmac.HMAC.copy
    from _hashlib import hmac_new

    _mac: Callable[..., Any] = hmac_new
except ImportError:  # pragma: no cover  (a Python built without OpenSSL's hashlib)
    _mac = _python_mac
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


class CookieSigner:
    """Signs and verifies `token.signature` values with one or more keys."""

    def __init__(self, secret_key: str | bytes | Secret | Sequence[str | bytes | Secret]) -> None:
        given: list[object] = [secret_key] if isinstance(secret_key, str | bytes | Secret) else list(secret_key)
        keys: list[str | bytes] = []
        for key in given:
            if not isinstance(key, str | bytes | Secret):
                # A bytes-like or other iterable taken for a list would make each of its items a key.
                raise TypeError("secret_key must be a str, bytes or Secret, or a list of them")
            keys.append(key if isinstance(key, bytes) else str(key))
        if not keys or not all(keys):
            raise ValueError("secret_key must be a non-empty key or a list of them")
        self._macs = [
            _mac(itsdangerous.Signer(key, salt=SALT, digest_method=hashlib.sha256).derive_key(), digestmod="sha256")
            for key in keys
        ]
        self._verified: dict[bytes, tuple[str, int]] = {}

    def _signature(self, index: int, value: bytes) -> bytes:
        mac = self._macs[index].copy()
        mac.update(value)
        return binascii.b2a_base64(mac.digest(), newline=False)[:SIGNATURE_LENGTH].translate(_TO_URLSAFE)

    def sign(self, token: str) -> str:
        """`token` and its signature by the first key."""
        return f"{token}.{self._signature(0, token.encode('ascii')).decode('ascii')}"

    def verify(self, value: bytes, signature: bytes) -> int | None:
        """The index of the key that signed `value` (0 is the current one), or None when none did."""
        for index in range(len(self._macs)):
            if hmac.compare_digest(self._signature(index, value), signature):
                return index
        return None

    def check(self, cookie: bytes) -> tuple[str, int] | None:
        """For a cookie value `token.signature`: the token and the index of the key that signed it (0 is the
        current one); None when no key did, or the value has another form."""
        known = self._verified.get(cookie)
        if known is not None:
            return known
        token, _, signature = cookie.partition(b".")
        index = self.verify(token, signature)  # no dot: an empty signature, which no key made
        if index is None:
            return None
        known = (token.decode("latin-1"), index)
        verified = self._verified
        if len(verified) >= VERIFIED_COOKIES:
            verified.clear()  # one call, safe with threads: the cookies still in use come back at once
        verified[cookie] = known
        return known
