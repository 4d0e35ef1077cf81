"""Hostile Cookie headers: never a 5xx, no store lookup for a malformed or forged value, nothing echoed."""

from __future__ import annotations

import secrets

import anyio
from helpers import asgi_get
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from buntsession import MemoryStore, SessionMiddleware


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    async def find_with_expiry(self, key: str) -> tuple[bytes, float] | None:
        self.lookups += 1
        return await super().find_with_expiry(key)


async def read(request: Request) -> JSONResponse:
    return JSONResponse(request.session.get_string("user"))


store = CountingStore()
app = SessionMiddleware(Starlette(routes=[Route("/", read)]), store=store, secret_key="fuzz")
token = secrets.token_urlsafe(32)
well_formed = st.just(token) | st.from_regex(r"[A-Za-z0-9_-]{43}", fullmatch=True)
forged = st.builds(lambda t, s: f"{t}.{s}", well_formed, st.from_regex(r"[A-Za-z0-9_-]{43}", fullmatch=True))
values = (
    st.binary(max_size=64) | st.binary(min_size=1, max_size=4).map(lambda chunk: (chunk * 16384)[:16384])
    | st.just(b"\\" * 8192) | st.just(b'"' * 300) | forged.map(str.encode) | well_formed.map(str.encode)
    | st.sampled_from([b"", b"null", b"\x00", b"\r\n", b"a;b", b"=", b"\xff\xfe\xfd"])
)
cookie = st.builds(lambda name, value: name + b"=" + value, st.sampled_from([b"session", b"other", b"Session"]), values)
headers = st.lists(st.lists(cookie, min_size=0, max_size=100).map(b"; ".join) | st.binary(max_size=256),
                   min_size=1, max_size=3)


async def call(raw_headers: list[bytes]) -> tuple[int, list[tuple[bytes, bytes]]]:
    return await asgi_get(app, [(b"cookie", value) for value in raw_headers])


async def call_all(requests: list[list[bytes]]) -> list[tuple[int, list[tuple[bytes, bytes]]]]:
    return [await call(raw_headers) for raw_headers in requests]


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(headers, min_size=10, max_size=10))
def test_hostile_cookie_headers(requests: list[list[bytes]]) -> None:
    """2,000 examples of 10 requests each: 20,000 hostile Cookie headers."""
    before = store.lookups
    for status, response_headers in anyio.run(call_all, requests):
        assert status == 200
        assert not any(name == b"set-cookie" for name, _ in response_headers)  # nothing echoed, nothing set
    # The signature is checked before any lookup, and forged ones never verify (the secret is not in them).
    assert store.lookups == before


def test_a_well_signed_unknown_token_is_looked_up_once_and_not_adopted() -> None:
    signed = app.signer.sign(secrets.token_urlsafe(32))  # type: ignore[union-attr]
    before = store.lookups
    status, response_headers = anyio.run(call, [f"other=1; session={signed}; session=x".encode()])
    assert (status, store.lookups - before) == (200, 1)
    assert not any(name == b"set-cookie" for name, _ in response_headers)
