"""Cookie signatures: the format of itsdangerous' Signer, checked against itsdangerous itself."""

from __future__ import annotations

import hashlib
import secrets

import itsdangerous
import pytest

from buntsession import signing
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


def test_check_remembers_good_cookies_only_and_tells_an_older_key() -> None:
    signer = CookieSigner(["current", "older"])
    token = secrets.token_urlsafe(32)
    good = signer.sign(token).encode()
    older = reference("older").sign(token)
    for _ in range(2):  # the second time from memory: the same answers
        assert signer.check(good) == (token, 0)
        assert signer.check(older) == (token, 1)
    forged = good[:-1] + (b"A" if good[-1:] != b"A" else b"B")
    assert signer.check(forged) is None
    assert signer.check(good[:43] + good[44:]) is None  # no dot
    assert signer.check("é".encode() + good[2:]) is None  # not even ASCII
    assert signer.check(good) == (token, 0)  # a refused look-alike changed nothing


def test_check_keeps_a_bounded_number_of_cookies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signing, "VERIFIED_COOKIES", 3)
    signer = CookieSigner("current")
    tokens = [secrets.token_urlsafe(32) for _ in range(7)]
    for token in tokens:
        assert signer.check(signer.sign(token).encode()) == (token, 0)
        assert 1 <= len(signer._verified) <= 3
    for token in tokens:  # forgotten or not, every one is still good
        assert signer.check(signer.sign(token).encode()) == (token, 0)


def test_a_cookie_that_comes_back_is_not_verified_again(monkeypatch: pytest.MonkeyPatch) -> None:
    signer = CookieSigner("current")
    cookie = signer.sign(secrets.token_urlsafe(32)).encode()
    macs: list[bytes] = []
    real = signer._signature
    monkeypatch.setattr(signer, "_signature", lambda index, value: macs.append(value) or real(index, value))
    for _ in range(3):
        assert signer.check(cookie) is not None
    assert len(macs) == 1
    for _ in range(2):  # a forged cookie is never remembered: each one costs its HMAC
        assert signer.check(cookie[:-1] + b"0" if cookie[-1:] != b"0" else cookie[:-1] + b"1") is None
    assert len(macs) == 3
