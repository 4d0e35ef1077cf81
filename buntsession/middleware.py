"""`SessionMiddleware`: a pure ASGI middleware that loads the session before the app runs and commits it just
before the response starts. A drop-in for Starlette's `SessionMiddleware`: same arguments, same cookie.

What a request stores and when is decided in `buntsession.lifecycle`; this module keeps ASGI, the cookie
and the 503s.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any, Literal

import anyio
from starlette.datastructures import Secret
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from buntsession.engine import DB
from buntsession.errors import Error, FileLockedError
from buntsession.lifecycle import CookieChange, Lifecycle
from buntsession.migration import Import, StarletteCookies
from buntsession.session import Session
from buntsession.signing import CookieSigner
from buntsession.stores import BuntStore, Store

__all__ = ["SessionMiddleware"]

logger = logging.getLogger("buntsession")

_EXPIRED = "expires=Thu, 01 Jan 1970 00:00:00 GMT"
_UNAVAILABLE = b"Service Unavailable: the session store is not available"
_FROZEN = "the session was changed after the response started; the change is not stored"


class SessionMiddleware:
    """Server-side sessions: the cookie carries a random token; the data stays in `store`."""

    def __init__(
        self,
        app: ASGIApp,
        secret_key: str | bytes | Secret | Sequence[str | bytes | Secret] | None = None,
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
        import_cookie_sessions: bool = False,
    ) -> None:
        self.app = app
        self.session_cookie = session_cookie
        self.max_age = max_age
        self.path = path
        # Starlette writes same_site into the cookie as given; browsers read the attribute without regard
        # to case, so every spelling of the three values is accepted, and written in lower case.
        same_site = str(same_site).lower()  # type: ignore[assignment]
        if same_site not in ("lax", "strict", "none"):
            raise ValueError(f"same_site must be 'lax', 'strict' or 'none' (any case), not {same_site!r}")
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
        self.signer = CookieSigner(secret_key) if secret_key is not None else None
        if import_cookie_sessions and secret_key is None:
            raise ValueError("import_cookie_sessions needs the secret_key that Starlette's SessionMiddleware used")
        self.importer = StarletteCookies(secret_key, max_age) \
            if import_cookie_sessions and secret_key is not None else None
        # The first cookie of the name decides: its value, when it has the form of a token (plain) or of a
        # token and a signature (signed); the group is None for any other value.
        form = rb"([A-Za-z0-9_-]{43})" if self.signer is None else rb"([A-Za-z0-9_-]{43}\.[A-Za-z0-9_-]{43})"
        name = rb"(?:^|;)[ \t]*" + re.escape(session_cookie.encode()) + rb"="
        self._find_cookie = re.compile(name + rb"(?:" + form + rb"[ \t]*(?=;|$))?").search
        self._find_raw_cookie = re.compile(name + rb"([^;]*)").search  # for import_cookie_sessions
        self.store: Store = store if store is not None else _default_store()
        self.lifecycle = Lifecycle(self.store, max_age, idle_timeout)
        self._opened = False
        self._opening = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
            elif kind == "websocket":
                await self._websocket(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        token, resign = self._token(scope["headers"])
        imported = None
        try:
            if not self._opened:
                await self._open_store()
            if token is None and self.importer is not None:
                session, imported, resign = await self._import(scope["headers"])
            else:
                session = await self.lifecycle.load(token)
        except Error as exc:
            logger.error("the session store failed while loading a session: %s", exc)
            await _unavailable(send)
            return
        scope["session"] = session
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["session"] = session
        started = failed = False

        async def send_with_session(message: Message) -> None:
            nonlocal started, failed
            if failed:
                return  # a 503 went out in place of the app's response: drop the rest of it
            if not started and message["type"] == "http.response.start":
                started = True
                try:
                    await self._commit(scope, message, session, resign, imported)
                except Error as exc:
                    logger.error("the session store failed while committing a session: %s", exc)
                    failed = True
                    await _unavailable(send)
                    return
            await send(message)

        try:
            await self.app(scope, receive, send_with_session)
        except BaseException:
            if not started:  # a destroy() holds even when the app failed after it
                session.freeze(_FROZEN)
                with anyio.CancelScope(shield=True):
                    try:
                        await self.lifecycle.commit(session, ok=False)
                    except Error as exc:
                        logger.error("the session store failed while ending a session: %s", exc)
            raise

    async def _commit(self, scope: Scope, message: Message, session: Session, resign: bool,
                      imported: Import | None = None) -> None:
        """Store what the request changed and set the cookie, just before the response starts."""
        headers = message.get("headers")
        if type(headers) is not list:
            headers = message["headers"] = list(headers or ())
        session.freeze(_FROZEN)
        if imported is None:
            change = await self.lifecycle.commit(session, message["status"] < 500, resign, scope["headers"])
        else:
            change = await self.lifecycle.commit_imported(session, message["status"] < 500, imported, scope["headers"])
        if session.accessed or change is not None:  # a response that sets a cookie must not be shared either
            _add_vary_cookie(headers)
        if change is not None:
            headers.append((b"set-cookie", self._cookie(scope, change).encode("latin-1")))
            for name, _ in headers:
                if name.lower() == b"cache-control":
                    break
            else:
                headers.append((b"cache-control", b"private"))

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if not self._opened:
                await self._open_store()
            session = await self.lifecycle.load(self._token(scope["headers"])[0])
        except Error as exc:
            logger.error("the session store failed while loading a session: %s", exc)
            await send({"type": "websocket.close", "code": 1011, "reason": "session store unavailable"})
            return
        session.freeze("the session of a WebSocket connection is read-only")
        scope["session"] = session
        scope.setdefault("state", {})["session"] = session
        await self.app(scope, receive, send)

    # -- the cookie ---------------------------------------------------------------------------------------

    def _token(self, headers: Any) -> tuple[str | None, bool]:
        """The token of a well-formed (and, with a secret, well-signed) cookie, or None; and whether its
        signature was made with an older key (so the cookie is re-signed). The form is checked before the
        signature, so no work is spent on garbage; the first cookie of the name decides."""
        for name, value in headers:
            if name != b"cookie":
                continue
            found = self._find_cookie(value)
            if found is None:
                continue
            cookie = found[1]
            if cookie is None:
                return None, False
            if self.signer is None:
                return cookie.decode("ascii"), False
            checked = self.signer.check(cookie)
            if checked is None:
                return None, False
            return checked[0], checked[1] > 0
        return None, False

    async def _import(self, headers: Any) -> tuple[Session, Import | None, bool]:
        """The session of a request with no token of ours, when import_cookie_sessions is on: a valid
        Starlette cookie's data (see `Lifecycle.adopt`), or a fresh empty session. Also whether a cookie
        must be sent for a session that is stored already (the cookie was imported before)."""
        assert self.importer is not None
        for name, value in headers:
            if name != b"cookie":
                continue
            found = self._find_raw_cookie(value)
            if found is None:
                continue
            cookie: bytes = found[1].rstrip(b" \t")
            read = self.importer.read(cookie)
            if read is None:
                break
            session, imported = await self.lifecycle.adopt(cookie, *read)
            return session, imported, session.token is not None
        return await self.lifecycle.load(None), None, False

    def _cookie(self, scope: Scope, change: CookieChange) -> str:
        secure = "; secure" if self.always_secure or scope.get("scheme") in ("https", "wss") else ""
        if change.token is None:
            return f"{self.session_cookie}=null; path={self.path}; {_EXPIRED}; Max-Age=0; {self.flags}{secure}" \
                   f"{self.tail_flags}"
        meta = change.meta
        assert meta is not None
        value = change.token if self.signer is None else self.signer.sign(change.token)
        lifetime = ""
        if meta.remember if meta.remember is not None else self.max_age is not None:
            now = self.lifecycle.clock()
            left = max(0, math.ceil(meta.end - now))
            lifetime = f"Max-Age={left}; expires={_http_date(now + left)}; "
        return f"{self.session_cookie}={value}; path={self.path}; {lifetime}{self.flags}{secure}{self.tail_flags}"

    # -- the store's lifecycle -----------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Open the store on startup, before the app starts, and close it after the app shut down. A store
        that cannot open fails the startup with its error's message: the server does not begin serving."""
        startup_failed = False

        async def receive_opening() -> Message:
            nonlocal startup_failed
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._open_store()
                except Exception as exc:
                    # Told to the server here: an app's router may call receive() outside its own error
                    # handling, and a server that sees only an exception takes lifespan as unsupported.
                    startup_failed = True
                    await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                    raise
            return message

        async def send_closing(message: Message) -> None:
            if startup_failed:
                return  # the server has been told; anything the app says after that is out of turn
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed",
                                   "lifespan.startup.failed"):
                await self._close_store()
            await send(message)

        await self.app(scope, receive_opening, send_closing)

    async def _open_store(self) -> None:
        """Open the store once: at lifespan startup, or on the first request when there is no lifespan."""
        # Another request, perhaps on another event loop, may be opening it: poll, since an Event would
        # belong to one loop.
        while self._opening:  # noqa: ASYNC110
            await anyio.sleep(0.001)
        if self._opened:
            return
        self._opening = True
        default = self.store is _DEFAULT.get("store")
        try:
            enter = getattr(self.store, "__aenter__", None)
            if enter is not None:
                await enter()
            self._opened = True
        except FileLockedError as exc:
            if default:
                raise FileLockedError(exc.path, (
                    "buntsession's default session store (shared by the worker processes of this app) is held "
                    "by a process that opened it without shared=True; keep sessions in another file with "
                    "BUNTSESSION_PATH, or pass SessionMiddleware(store=BuntStore(DB(path)))"
                )) from exc
            raise
        finally:
            self._opening = False
        if default:
            assert isinstance(self.store, BuntStore)
            _announce(f"buntsession: sessions are kept in {self.store.db.path} (the default "
                      "store; set BUNTSESSION_PATH, or pass store=, to keep them elsewhere)")

    async def _close_store(self) -> None:
        if self._opened:
            self._opened = False
            leave = getattr(self.store, "__aexit__", None)
            if leave is not None:
                await leave(None, None, None)


def _add_vary_cookie(headers: list[tuple[bytes, bytes]]) -> None:
    for i, (name, value) in enumerate(headers):
        if name.lower() == b"vary":
            fields = {field.strip() for field in value.lower().split(b",")}
            if b"cookie" not in fields and b"*" not in fields:
                headers[i] = (name, value + b", Cookie")
            return
    headers.append((b"vary", b"Cookie"))


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _http_date(unix_time: float) -> str:
    """RFC 7231's IMF-fixdate, as email.utils.formatdate(usegmt=True) writes it, at a third of its cost."""
    t = time.gmtime(unix_time)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


async def _unavailable(send: Send) -> None:
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(_UNAVAILABLE)).encode()),
        (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": _UNAVAILABLE})


def _announce(text: str) -> None:
    """Log `text` where the person running the app looks: the package's logger when logging is set up,
    else uvicorn's error log (uvicorn configures its own loggers only, so ours would print nothing)."""
    (logger if logger.hasHandlers() else logging.getLogger("uvicorn.error")).info(text)


_DEFAULT: dict[str, BuntStore] = {}


def _default_store() -> BuntStore:
    """One BuntStore per process over DB("sessions.db") (or $BUNTSESSION_PATH), shared by every middleware
    that was given no store. Shared mode, so that the worker processes of `uvicorn --workers N` (each with
    its own default store) all see every session."""
    store = _DEFAULT.get("store")
    if store is None:
        path = os.path.abspath(os.environ.get("BUNTSESSION_PATH", "sessions.db"))  # a later chdir moves nothing
        store = _DEFAULT["store"] = BuntStore(DB(path, shared=True))
    return store
