"""`SessionMiddleware`: a pure ASGI middleware that loads the session before the app runs and commits it just
before the response starts. A drop-in for Starlette's `SessionMiddleware`: same arguments, same cookie."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Literal

import anyio
import itsdangerous
from starlette.datastructures import MutableHeaders, Secret
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from buntsession.codec import Meta, Update, apply_update
from buntsession.engine import DB
from buntsession.errors import FileLockedError, StoreError
from buntsession.session import Session, new_token, store_key
from buntsession.stores import BuntStore, SessionStore, Store

__all__ = ["SessionMiddleware"]

logger = logging.getLogger("buntsession")

BROWSER_SESSION_KEEP = 14 * 24 * 3600
"""How long the server keeps a session whose cookie ends with the browser session (max_age=None)."""

_TOKEN = "[A-Za-z0-9_-]{43}"
_PLAIN_COOKIE = re.compile(_TOKEN)
_SIGNED_COOKIE = re.compile(rf"{_TOKEN}\.[A-Za-z0-9_-]{{43}}")
_EXPIRED = "expires=Thu, 01 Jan 1970 00:00:00 GMT"
_UNAVAILABLE = b"Service Unavailable: the session store is not available"


class SessionMiddleware:
    """Server-side sessions: the cookie carries a random token; the data stays in `store`."""

    def __init__(
        self,
        app: ASGIApp,
        secret_key: str | Secret | Sequence[str | Secret] | None = None,
        session_cookie: str = "session",
        max_age: int | None = 14 * 24 * 60 * 60,  # 14 days, in seconds
        path: str = "/",
        same_site: Literal["lax", "strict", "none"] = "lax",
        https_only: bool = False,
        domain: str | None = None,
        partitioned: bool = False,
        *,
        store: Store | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.app = app
        self.session_cookie = session_cookie
        self.max_age = max_age
        self.path = path
        self.idle_timeout = idle_timeout
        if same_site not in ("lax", "strict", "none"):
            raise ValueError(f"same_site must be 'lax', 'strict' or 'none', not {same_site!r}")
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", session_cookie):
            raise ValueError(f"{session_cookie!r} is not a valid cookie name")
        if idle_timeout is not None and not (idle_timeout > 0 and math.isfinite(idle_timeout)):
            raise ValueError(f"idle_timeout must be a positive number of seconds, not {idle_timeout!r}")
        if session_cookie.startswith("__Host-") and (path != "/" or domain is not None):
            raise ValueError("a __Host- cookie needs path='/' and no domain")
        self.always_secure = https_only or session_cookie.startswith(("__Host-", "__Secure-"))
        self.flags = "httponly; samesite=" + same_site
        self.tail_flags = (f"; domain={domain}" if domain is not None else "") + (
            "; partitioned" if partitioned else ""
        )
        self.signer = _signer(secret_key)
        self._cookie_form = _PLAIN_COOKIE if self.signer is None else _SIGNED_COOKIE
        self.store: Store = store if store is not None else _default_store()
        # The richer calls (atomic merge, expiry-only touch, sync), where the store offers them.
        self._rich: SessionStore | None = self.store if isinstance(self.store, SessionStore) else None
        if idle_timeout is not None and self._rich is None:
            raise ValueError("idle_timeout needs a store with find_with_expiry() and touch() (the shipped ones have)")
        self._opened = False
        self._opening = False
        self._clock: Callable[[], float] = time.time

    # -- the store's lifecycle ---------------------------------------------------------------------------

    async def _open_store(self) -> None:
        """Open the store once: at lifespan startup, or on the first request when there is no lifespan."""
        # Another request, perhaps on another event loop, may be opening it: poll, since an Event would
        # belong to one loop.
        while self._opening:  # noqa: ASYNC110
            await anyio.sleep(0.001)
        if self._opened:
            return
        self._opening = True
        try:
            enter = getattr(self.store, "__aenter__", None)
            if enter is not None:
                await enter()
            self._opened = True
        except FileLockedError as exc:
            if self.store is _DEFAULT.get("store"):
                raise FileLockedError(exc.path, (
                    "buntsession's default session store is held by another process; give each process its "
                    "own file with BUNTSESSION_PATH or SessionMiddleware(store=BuntStore(DB(path)))"
                )) from exc
            raise
        finally:
            self._opening = False

    async def _close_store(self) -> None:
        if self._opened:
            self._opened = False
            leave = getattr(self.store, "__aexit__", None)
            if leave is not None:
                await leave(None, None, None)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def receive_opening() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._open_store()  # an error here fails the startup, as it should
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed",
                                   "lifespan.startup.failed"):
                await self._close_store()
            await send(message)

        await self.app(scope, receive_opening, send_closing)

    # -- a request -----------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        cookie = self._token_from_cookie(scope)
        try:
            if not self._opened:
                await self._open_store()
            session = await self._load(cookie)
        except StoreError:
            logger.exception("the session store failed while loading a session")
            await _unavailable(kind, send)
            return
        scope["session"] = session
        scope.setdefault("state", {})["session"] = session
        if kind == "websocket":
            session._freeze("the session of a WebSocket connection is read-only")
            await self.app(scope, receive, send)
            return
        await self._serve(scope, receive, send, session)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, session: Session) -> None:
        started = False
        failed = False

        async def send_with_session(message: Message) -> None:
            nonlocal started, failed
            if failed:
                return  # a 503 went out in place of the app's response: drop the rest of it
            if message["type"] == "http.response.start" and not started:
                started = True
                try:
                    await self._commit(scope, message, session)
                except StoreError:
                    logger.exception("the session store failed while committing a session")
                    failed = True
                    await _unavailable("http", send)
                    return
            await send(message)

        try:
            await self.app(scope, receive, send_with_session)
        except BaseException:
            if not started and session._dead_tokens and session._destroyed:
                with anyio.CancelScope(shield=True):
                    await self._end_sessions(session)  # a logout holds even when the app failed after it
            raise

    def _token_from_cookie(self, scope: Scope) -> str | None:
        """The token of a well-formed (and, with a secret, well-signed) cookie, or None. The form is checked
        before the signature, so no work is spent on garbage; the first cookie of the name decides."""
        prefix = self.session_cookie + "="
        for name, value in scope["headers"]:
            if name != b"cookie":
                continue
            header: str = value.decode("latin-1")
            for part in header.split(";"):
                pair = part.strip()
                if not pair.startswith(prefix):
                    continue
                candidate = pair[len(prefix) :]
                if not self._cookie_form.fullmatch(candidate):
                    return None
                if self.signer is None:
                    return candidate
                try:
                    return self.signer.unsign(candidate).decode("ascii")
                except itsdangerous.BadSignature:
                    return None
        return None

    async def _load(self, token: str | None) -> Session:
        if token is None:
            return Session()
        key = store_key(token)
        found: tuple[bytes, float | None] | None
        if self._rich is not None:
            found = await self._rich.find_with_expiry(key)
        else:
            data = await self.store.find(key)
            found = None if data is None else (data, None)
        if found is None:
            return Session()  # unknown, expired or ended: never adopt the client's token
        data, expires = found
        try:
            session = Session._from_store(token, data, expires)
        except (ValueError, TypeError):
            logger.warning("a stored session could not be decoded (tampered with?); starting a fresh one")
            return Session()
        now = self._clock()
        meta = session._meta
        assert meta is not None
        if meta.end <= now or (expires is not None and expires <= now):
            return Session()  # ended (the store's clock may lag ours): never served
        if self.idle_timeout is not None and self._rich is not None and expires is not None:
            deadline = min(meta.end, now + self.idle_timeout)
            if deadline - expires >= self.idle_timeout / 10:
                try:
                    if await self._rich.touch(key, deadline):
                        session._expires = deadline
                except StoreError:
                    logger.warning("could not move the idle deadline of a session", exc_info=True)
        return session

    # -- commit ---------------------------------------------------------------------------------------------

    async def _commit(self, scope: Scope, message: Message, session: Session) -> None:
        """Store what the request changed and set the cookie, just before the response starts."""
        message.setdefault("headers", [])
        headers = MutableHeaders(scope=message)
        if session.accessed:
            headers.add_vary_header("Cookie")
        ok = message["status"] < 500
        session._freeze("the session was changed after the response started; the change is not stored")
        cookie = None
        if session._dead_tokens and (ok or session._destroyed):
            # Dead tokens belong to sessions loaded from the store, so the request carried their cookie.
            await self._end_sessions(session)
            if session._destroyed:
                cookie = self._expired_cookie(scope)
        if ok:
            cookie = await self._write(scope, session) or cookie
        if cookie is not None:
            headers.append("Set-Cookie", cookie)
            if "cache-control" not in headers:
                headers["Cache-Control"] = "private"

    async def _end_sessions(self, session: Session) -> None:
        """Delete the records of the sessions that destroy() or renew_token() ended, durably."""
        tokens, session._dead_tokens = session._dead_tokens, []
        for token in tokens:
            await self.store.delete(store_key(token))
        if self._rich is not None:
            await self._rich.sync()

    async def _write(self, scope: Scope, session: Session) -> str | None:
        """Write the session's changes; return the Set-Cookie value, or None when nothing is sent."""
        now = self._clock()
        meta = session._meta
        if meta is None:  # a new session (or one renewed or destroyed by this request)
            if not dict.__len__(session):
                return None  # an empty new session is never stored
            token = session._token or new_token()
            keep = self.max_age if self.max_age is not None else BROWSER_SESSION_KEEP
            meta = Meta(created=now, end=now + keep, remember=session._remember)
            if keep > 0:
                expires = self._expiry(meta, now)
                await self._apply(store_key(token), Update(
                    put=session._encoded(), cleared=True, meta=meta, expires_at=expires, create=True))
                session._meta, session._expires = meta, expires
            session._token = token
            return self._cookie(scope, self._value(token), meta, now)
        put, removed = session._changes()
        if not (put or removed or session._cleared or session._remember_changed):
            return None
        if session._remember_changed:
            meta = Meta(meta.created, meta.end, session._remember)
        expires = self._expiry(meta, now)
        assert session._token is not None
        update = Update(put=put, removed=removed, cleared=session._cleared,
                        meta=meta if session._remember_changed else None, expires_at=expires, base=session._base)
        if not await self._apply(store_key(session._token), update):
            logger.warning("changes to a session that was destroyed or renewed meanwhile were dropped")
            return None
        session._meta, session._expires = meta, expires
        return self._cookie(scope, self._value(session._token), meta, now)

    def _expiry(self, meta: Meta, now: float) -> float:
        """When the store may forget the session: the earlier of its end and its idle deadline."""
        return meta.end if self.idle_timeout is None else min(meta.end, now + self.idle_timeout)

    async def _apply(self, key: str, update: Update) -> bool:
        if self._rich is not None:
            return await self._rich.merge(key, update)
        # A plain store: read, change, write. Not atomic: overlapping requests may lose each other's keys.
        merged = apply_update(await self.store.find(key), update)
        if merged is None:
            return False
        await self.store.commit(key, merged, update.expires_at)
        return True

    # -- cookies (formatted as Starlette formats them) ----------------------------------------------------

    def _value(self, token: str) -> str:
        return token if self.signer is None else self.signer.sign(token).decode("ascii")

    def _secure(self, scope: Scope) -> str:
        return "; secure" if self.always_secure or scope.get("scheme") in ("https", "wss") else ""

    def _cookie(self, scope: Scope, value: str, meta: Meta, now: float) -> str:
        persistent = meta.remember if meta.remember is not None else self.max_age is not None
        lifetime = ""
        if persistent:
            left = max(0, math.ceil(meta.end - now))
            lifetime = f"Max-Age={left}; expires={_http_date(now + left)}; "
        return (f"{self.session_cookie}={value}; path={self.path}; {lifetime}{self.flags}"
                f"{self._secure(scope)}{self.tail_flags}")

    def _expired_cookie(self, scope: Scope) -> str:
        return (f"{self.session_cookie}=null; path={self.path}; {_EXPIRED}; Max-Age=0; {self.flags}"
                f"{self._secure(scope)}{self.tail_flags}")


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _http_date(unix_time: float) -> str:
    """RFC 7231's IMF-fixdate, as email.utils.formatdate(usegmt=True) writes it, at a third of its cost."""
    t = time.gmtime(unix_time)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


def _signer(secret_key: str | Secret | Sequence[str | Secret] | None) -> itsdangerous.Signer | None:
    """A signer whose first key signs and all keys verify (itsdangerous signs with the last one)."""
    if secret_key is None:
        return None
    keys = [str(secret_key)] if isinstance(secret_key, str | Secret) else [str(k) for k in secret_key]
    if not keys or not all(keys):
        raise ValueError("secret_key must be a non-empty key or a list of them")
    return _Signer(list(reversed(keys)), salt="buntsession.cookie", digest_method=hashlib.sha256)


class _Signer(itsdangerous.Signer):
    """itsdangerous' Signer, deriving each key once rather than on every sign and verify."""

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        key = self.secret_keys[-1] if secret_key is None else secret_key
        derived = self._derived.get(key)
        if derived is None:
            derived = self._derived[key] = super().derive_key(key)
        return derived

    @property
    def _derived(self) -> dict[str | bytes, bytes]:
        cache: dict[str | bytes, bytes] | None = self.__dict__.get("_derived_keys")
        if cache is None:
            cache = self.__dict__["_derived_keys"] = {}
        return cache


async def _unavailable(kind: str, send: Send) -> None:
    if kind == "websocket":
        await send({"type": "websocket.close", "code": 1011, "reason": "session store unavailable"})
        return
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(_UNAVAILABLE)).encode()),
        (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": _UNAVAILABLE})


_DEFAULT: dict[str, BuntStore] = {}


def _default_store() -> BuntStore:
    """One BuntStore per process over DB("sessions.db") (or $BUNTSESSION_PATH), shared by every middleware
    that was given no store."""
    store = _DEFAULT.get("store")
    if store is None:
        store = _DEFAULT["store"] = BuntStore(DB(os.environ.get("BUNTSESSION_PATH", "sessions.db")))
    return store
