"""Cookie signatures: the format of itsdangerous' Signer, checked against itsdangerous itself."""

from __future__ import annotations

import hashlib
import secrets

import itsdangerous

from buntsession.signing import SALT, CookieSigner


def reference(key: str) -> itsdangerous.Signer:
    return itsdangerous.Signer(key, salt=SALT, digest_method=hashlib.sha256)


def test_signatures_are_itsdangerous_signatures() -> None:
    signer = CookieSigner(["current", "older"])
    for _ in range(200):
        token = secrets.token_urlsafe(32)
        signed = signer.sign(token)
        assert signed == reference("current").sign(token).decode()
        theirs = reference("older").sign(token).decode()
        assert signer.verify(token.encode(), signed.split(".")[1].encode()) == 0
        assert signer.verify(token.encode(), theirs.split(".")[1].encode()) == 1  # an older key: re-sign it
        assert reference("current").unsign(signed).decode() == token


def test_a_signature_by_no_key_or_for_another_token_fails() -> None:
    signer = CookieSigner("current")
    token, other = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    foreign = reference("someone else").sign(token).decode().split(".")[1].encode()
    assert signer.verify(token.encode(), foreign) is None
    assert signer.verify(other.encode(), signer.sign(token).split(".")[1].encode()) is None
    assert signer.verify(token.encode(), b"") is None
