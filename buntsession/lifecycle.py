"""A session's life across one request, with no ASGI in sight: load it by token, decide at commit what the
request writes and which cookie goes with it, and end the sessions it destroyed or renewed.

    lifecycle = Lifecycle(store, max_age=14 * 24 * 3600)
    session = await lifecycle.load(token)          # a fresh empty Session when the token finds nothing
    ...                                            # the app reads and changes it
    cookie = await lifecycle.commit(session, ok=True)

`commit` returns what the cookie must say, or None when it need not be sent:

- nothing changed (reads, and list or dict values read but not changed in place): nothing is written;
- a new session with data (or one renewed or destroyed and given data again): it is created under its
  token, and the cookie carries that token;
- changes to a stored session: merged into what is stored (see `buntsession.merge`); the cookie is sent
  only when remember-me or the whole session (`clear()`) changed, since its token and end did not;
- destroyed: its record is deleted, durably, and the cookie expired. Renewed: the old record is deleted,
  durably, and the data stored under the new token.

Changes to a session that was destroyed or renewed meanwhile by another request are dropped and logged.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from buntsession.codec import MAX_RECORD_SIZE, Meta, decode_record
from buntsession.errors import StoreError
from buntsession.merge import Update
from buntsession.migration import Import, hide_token, import_marker, reveal_token
from buntsession.session import Pending, Session, fingerprint, new_token, store_key, thaw
from buntsession.stores.base import SessionStore, Store
from buntsession.stores.plain import session_store
from buntsession.users import UserSessions

__all__ = ["BROWSER_SESSION_KEEP", "CookieChange", "Lifecycle"]

logger = logging.getLogger("buntsession")

BROWSER_SESSION_KEEP = 14 * 24 * 3600
"""How long the server keeps a session whose cookie ends with the browser session (max_age=None)."""


ACTIVITY_INTERVAL = 300.0
"""Seconds between updates of a user's session's last-active time: a request that finds it older than
this writes it (once; it moves the idle deadline too). Anonymous sessions never write for it."""

USER_AGENT_LENGTH = 512
"""The longest User-Agent kept for a session's listing (longer ones are cut)."""

DECODED_SESSIONS = 4096
"""How many sessions' decoded records a lifecycle keeps, the most recently loaded or written."""


class _Decoded(NamedTuple):
    """A record and what it decodes to. Loading the same record again copies the lists and dicts from
    their marshal fingerprints (several times faster than parsing JSON) and shares the immutable values;
    the fingerprints then tell at commit which lists and dicts the request changed in place. A store
    that returns other bytes for the key (a write since, by any process) makes this entry useless, never
    wrong: it is used only for a record equal to its own."""

    record: bytes
    meta: Meta
    values: dict[str, Any]
    """Every key in the record's order: its immutable value, or None for a list or dict (see `pristine`)."""
    pristine: dict[str, bytes]
    """The fingerprint of each list or dict value."""

    def thaw(self) -> dict[str, Any]:
        values = self.values.copy()
        for key, blob in self.pristine.items():
            values[key] = thaw(blob)
        return values


_NONE: Mapping[str, bytes] = {}


def _decoded(record: bytes, meta: Meta, values: dict[str, Any], blobs: Mapping[str, bytes] = _NONE) -> _Decoded:
    """The cache entry of `record`, which holds `values`: datetimes as decoding gives them back (a fixed
    UTC offset, fold 0), so a load served from the cache equals one served from the store. `blobs` holds
    the fingerprints already known of list and dict values (see `Pending.blobs`)."""
    kept = values.copy()
    pristine: dict[str, bytes] = {}
    for name, value in values.items():
        kind = type(value)
        if kind is list or kind is dict:
            blob = blobs.get(name) or fingerprint(value)
            if blob is None:
                return _Decoded(b"", meta, {}, {})  # not JSON-like: keep nothing (never equals a record)
            kept[name] = None
            pristine[name] = blob
        elif kind is datetime:
            kept[name] = datetime.fromisoformat(value.isoformat())
    return _Decoded(record, meta, kept, pristine)


class CookieChange(NamedTuple):
    """What the response's cookie must say."""

    token: str | None
    """The token to send; None expires the cookie (the session was destroyed)."""
    meta: Meta | None
    """The session's metadata (its end and remember-me choice set the cookie's lifetime)."""


EXPIRE_COOKIE = CookieChange(None, None)


class Lifecycle:
    """Loads and commits sessions in one store. See the module docstring."""

    def __init__(self, store: Store, max_age: int | None, idle_timeout: float | None = None) -> None:
        self.store: SessionStore = session_store(store)
        if idle_timeout is not None and self.store is not store:
            raise ValueError("idle_timeout needs a store with find_with_expiry() and touch() (the shipped ones have)")
        self.max_age = max_age
        self.idle_timeout = idle_timeout
        self.clock: Callable[[], float] = time.time
        self.activity_interval = ACTIVITY_INTERVAL
        self.users: UserSessions | None = self.store if isinstance(self.store, UserSessions) else None
        """The store's user index, when it keeps one (the shipped stores do)."""
        self._decoded: dict[str, _Decoded] = {}

        # The sessions this lifecycle hands out carry the store's user calls as a class attribute: a
        # subclass per lifecycle, so that no request pays for handing them over.
        self._session: type[Session] = Session if self.users is None else \
            type("Session", (Session,), {"_users": self.users, "__module__": Session.__module__})
        self._fresh = self._session

    async def load(self, token: str | None) -> Session:
        """The live session stored under `token`, or a fresh empty one. Never adopts a client's token: one
        that finds nothing (unknown, expired, ended, undecodable) gives a session without a token."""
        if token is None:
            return self._fresh()
        key = store_key(token)
        found = await self.store.find_with_expiry(key)
        if found is None:
            return self._fresh()
        record, expires = found
        known = self._decoded.get(key)
        if known is not None and known.record == record:  # the same object, mostly: no bytes compared
            meta, values = known.meta, known.thaw()
        else:
            try:
                meta, values = decode_record(record)
            except ValueError:
                logger.warning("a stored session could not be decoded (tampered with?); starting a fresh one")
                return self._fresh()
            known = _decoded(record, meta, values)
            self._keep(key, known)
        now = self.clock()
        if meta.end <= now or expires <= now:
            return self._fresh()  # ended (the store's clock may lag ours): never served
        if meta.user is not None and now - (meta.active or meta.created) >= self.activity_interval:
            active = await self._activity(key, record, meta, values, now, known.pristine)
            if active is not None:
                record, meta, expires, known = active
        elif self.idle_timeout is not None:
            deadline = min(meta.end, now + self.idle_timeout)
            if deadline - expires >= self.idle_timeout / 10:  # move it, but not on every request
                try:
                    if await self.store.touch(key, deadline):
                        expires = deadline
                except StoreError:
                    logger.warning("could not move the idle deadline of a session", exc_info=True)
        return self._session.restore(token, key, record, meta, values, expires, known.pristine)

    async def _activity(self, key: str, record: bytes, meta: Meta, values: dict[str, Any], now: float,
                        blobs: Mapping[str, bytes]) -> tuple[bytes, Meta, float, _Decoded] | None:
        """Write a user's session's last-active time (and move its idle deadline): one write, at most once
        per `activity_interval`. None when the session is gone meanwhile or the write failed (logged: the
        request goes on with the session as loaded)."""
        meta = dataclasses.replace(meta, active=now)
        expires = self._expiry(meta, now)
        update = Update(values, meta, expires, base=record, meta_changed=True)
        try:
            if not await self._write(key, update, blobs):
                return None
        except StoreError:
            logger.warning("could not record the activity of a session", exc_info=True)
            return None
        return update.record(), meta, expires, self._decoded[key]

    async def adopt(self, cookie: bytes, data: dict[str, Any], until: float) -> tuple[Session, Import | None]:
        """The session of a request whose cookie is a valid Starlette cookie (`cookie`, holding `data`,
        valid until the unix time `until`).

        The first time: a new session holding `data`, not stored yet, and the `Import` to pass to
        `commit_imported`, which stores the session under a new token and leaves a marker. Later (the same
        cookie again, from a request that overlapped the first or from a replay): the session the cookie
        became, as `load` gives it (fresh and empty once that session has ended or been renewed), and None;
        a stored one must be given its cookie (`commit(..., resend=True)`). An empty `data` gives a fresh
        session and None: there is nothing to import.
        """
        if not data:
            return self._fresh(), None
        marker, pad = import_marker(cookie)
        found = await self.store.find_with_expiry(marker)
        if found is not None:
            try:
                _, values = decode_record(found[0])
            except ValueError:
                values = {}
            return await self.load(reveal_token(values.get("t"), pad)), None
        session = self._fresh()
        session.update(data)
        return session, Import(marker, pad, until)

    async def commit_imported(self, session: Session, ok: bool, imported: Import,
                              request_headers: Sequence[tuple[bytes, bytes]] = ()) -> CookieChange | None:
        """`commit` for a session `adopt` made from a Starlette cookie: then, when the response is not a
        failure, leave the cookie's marker, pointing at the session's token once it is stored (or at none
        when the request stored nothing)."""
        change = await self.commit(session, ok, False, request_headers)
        if ok:
            await self._mark_import(imported, session.token if session.expires_at is not None else None)
        return change

    async def commit(self, session: Session, ok: bool, resend: bool = False,
                     request_headers: Sequence[tuple[bytes, bytes]] = ()) -> CookieChange | None:
        """Store what the request did to `session`; return the cookie to send, or None.

        `ok` is False for a response of 500 or more: then nothing is written but a destroy(). `resend`
        asks for the cookie of a stored session even when nothing else would send it (to re-sign it with
        the current key). `request_headers` (ASGI's list of name and value pairs) are read only for a
        login, for its User-Agent. Raises StoreError when the store fails or the session cannot be stored.
        """
        try:
            pending = session.pending(always=resend)
        except (TypeError, ValueError, RecursionError) as exc:
            # Assigned values were checked then; a list or dict was changed in place since.
            raise StoreError(f"a session value changed in place cannot be stored: {exc}") from exc
        if pending is None:
            return None
        if pending.destroyed:
            if pending.dead_tokens:
                await self.end(pending.dead_tokens, pending.dead_user)
            if not ok or not (pending.data or pending.user is not None):
                return EXPIRE_COOKIE
            return await self._create(session, pending, request_headers)  # refilled after destroy(): new
        if not ok:
            return None
        if pending.dead_tokens:
            return await self._renew(session, pending, request_headers)
        if pending.meta is None:  # a new session: stored when it holds data, or is a user's
            return await self._create(session, pending, request_headers) \
                if pending.data or pending.user is not None else None
        return await self._update(session, pending, resend)

    async def _create(self, session: Session, pending: Pending, request_headers: Sequence[tuple[bytes, bytes]],
                      data: dict[str, Any] | None = None, token: str | None = None) -> CookieChange:
        """Store a new session under its token (a new one when it has none), bound to its user if any."""
        now = self.clock()
        new = token or pending.token or new_token()
        keep = self.max_age if self.max_age is not None else BROWSER_SESSION_KEEP
        user = pending.user
        if user is None:
            meta = Meta(now, now + keep, pending.remember)
        else:
            agent = _user_agent(request_headers) if pending.login else pending.agent
            meta = Meta(now, now + keep, pending.remember, user, agent, now)
        if keep > 0:  # else a session that has already ended: a cookie that says so, nothing stored
            expires = self._expiry(meta, now)
            key = store_key(new)
            update = Update(pending.data if data is None else data, meta, expires, create=True)
            if user is not None and self.users is not None:
                self._encode(update)  # a session that cannot be stored leaves no index entry either
                await self.users.bind_user(user, key, meta.end)  # before the record: never hidden
            await self._write(key, update, pending.blobs if data is None else _NONE)
            session.stored(new, key, meta, expires)
        return CookieChange(new, meta)

    async def _update(self, session: Session, pending: Pending, resend: bool) -> CookieChange | None:
        """Merge the request's changes into the stored session."""
        token, meta = pending.token, pending.meta
        assert token is not None and meta is not None
        if pending.remember_changed:
            meta = dataclasses.replace(meta, remember=pending.remember)
        expires = self._expiry(meta, self.clock())
        if not (pending.put or pending.removed or pending.cleared or pending.remember_changed):
            return CookieChange(token, meta) if resend else None  # nothing changed: only a re-signed cookie
        update = Update(pending.data, meta, expires, base=pending.base, put=pending.put, removed=pending.removed,
                        cleared=pending.cleared, meta_changed=pending.remember_changed)
        key = pending.key or store_key(token)
        if not await self._write(key, update, pending.blobs):
            logger.warning("changes to a session that was destroyed or renewed meanwhile were dropped")
            return None
        session.stored(token, key, meta, expires)
        return CookieChange(token, meta) if resend or pending.remember_changed or pending.cleared else None

    async def _renew(self, session: Session, pending: Pending,
                     request_headers: Sequence[tuple[bytes, bytes]]) -> CookieChange | None:
        """Move the stored session to the session's new token, with the request's changes: first merged into
        the old record (so what other requests stored meanwhile is kept), then the whole of it stored under
        the new token, then the old token ended. A session ended meanwhile (a logout in another request)
        stays ended: the request's changes are dropped and logged, and no new token is issued."""
        old = pending.dead_tokens[-1]
        old_key = store_key(old)
        base_meta = pending.base_meta
        assert base_meta is not None and pending.token is not None
        update = Update(pending.data, base_meta, base_meta.end, base=pending.base, put=pending.put,
                        removed=pending.removed, cleared=pending.cleared)
        merged = await self._write(old_key, update, pending.blobs)
        found = await self.store.find_with_expiry(old_key) if merged else None
        if found is None:
            logger.warning("a session that was destroyed or renewed meanwhile was not renewed; its changes were "
                           "dropped")
            return None
        try:
            values = decode_record(found[0])[1]
        except ValueError:
            values = {}
        change = None
        if values or pending.user is not None:
            change = await self._create(session, pending, request_headers, values, pending.token)
            if await self.store.find_with_expiry(old_key) is None:  # ended while we copied it: so is the copy
                await self.end((pending.token,), pending.user)
                logger.warning("a session that was destroyed meanwhile was not renewed")
                return None
        await self.end((old,), pending.dead_user)
        return change if change is not None else EXPIRE_COOKIE

    async def end(self, tokens: tuple[str, ...], user: str | None = None) -> None:
        """Delete the sessions of `tokens` and make that durable: a logout must survive a power cut. Then,
        when they were bound to `user`, drop them from the user's index (after: never hidden)."""
        keys = [store_key(token) for token in tokens]
        for key in keys:
            self._decoded.pop(key, None)
            await self.store.delete(key)
        await self.store.sync()
        if user is not None and self.users is not None:
            await self.users.unbind_user(user, keys)

    async def _mark_import(self, imported: Import, token: str | None) -> None:
        """Leave the marker of an imported Starlette cookie: written after the session it became, so that
        a crash in between costs at most a second import of the same data, never a lost session. It
        lives as long as the cookie would have been valid, pointing at the session's token (hidden) or,
        when the request stored nothing, at none."""
        now = self.clock()
        if imported.until <= now:
            return
        data = {} if token is None else {"t": hide_token(token, imported.pad)}
        await self.store.merge(imported.marker, Update(data, Meta(now, imported.until), imported.until, create=True))

    async def _write(self, key: str, update: Update, blobs: Mapping[str, bytes] = _NONE) -> bool:
        """Merge `update` into the store; on success, keep what was written for the next load of it (with
        `blobs`, the fingerprints of its lists and dicts known already)."""
        record = self._encode(update)
        if len(record) > MAX_RECORD_SIZE:
            raise StoreError(f"a session of {len(record):,} bytes is over the limit of {MAX_RECORD_SIZE:,} bytes; "
                             "nothing was stored")
        # Taken before the store is awaited: other tasks may change the lists and dicts meanwhile.
        known = _decoded(record, update.meta, update.data, blobs)
        if not await self.store.merge(key, update):
            return False
        self._keep(key, known)
        return True

    def _keep(self, key: str, known: _Decoded) -> None:
        cache = self._decoded
        cache.pop(key, None)
        if len(cache) >= DECODED_SESSIONS:
            del cache[next(iter(cache))]  # the oldest: first in, first out
        cache[key] = known

    @staticmethod
    def _encode(update: Update) -> bytes:
        try:
            return update.record()
        except (TypeError, ValueError, RecursionError) as exc:
            # Assigned values were checked; this is a list or dict changed in place to hold what a session
            # cannot keep (a set, a NaN, an object).
            raise StoreError(f"a session value changed in place cannot be stored: {exc}") from exc

    def _expiry(self, meta: Meta, now: float) -> float:
        """When the store may forget the session: the earlier of its end and its idle deadline."""
        return meta.end if self.idle_timeout is None else min(meta.end, now + self.idle_timeout)


def _user_agent(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The request's User-Agent (the first), cut to USER_AGENT_LENGTH characters; None when it sent none."""
    for name, value in headers:
        if name.lower() == b"user-agent":
            return value.decode("latin-1")[:USER_AGENT_LENGTH] or None
    return None
