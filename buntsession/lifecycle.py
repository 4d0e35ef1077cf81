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

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple

from buntsession.codec import MAX_RECORD_SIZE, Meta, decode_record
from buntsession.errors import StoreError
from buntsession.merge import Update
from buntsession.session import Pending, Session, fingerprint, new_token, store_key, thaw
from buntsession.stores.base import SessionStore, Store
from buntsession.stores.plain import session_store

__all__ = ["BROWSER_SESSION_KEEP", "CookieChange", "Lifecycle"]

logger = logging.getLogger("buntsession")

BROWSER_SESSION_KEEP = 14 * 24 * 3600
"""How long the server keeps a session whose cookie ends with the browser session (max_age=None)."""


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
    items: tuple[tuple[str, Any, bytes | None], ...]
    """(key, value, None) for an immutable value, (key, None, fingerprint) for a list or dict."""
    pristine: dict[str, bytes]

    def thaw(self) -> dict[str, Any]:
        return {key: value if blob is None else thaw(blob) for key, value, blob in self.items}


def _decoded(record: bytes, meta: Meta, values: dict[str, Any]) -> _Decoded:
    """The cache entry of `record`, which holds `values`: datetimes as decoding gives them back (a fixed
    UTC offset, fold 0), so a load served from the cache equals one served from the store."""
    items: list[tuple[str, Any, bytes | None]] = []
    pristine: dict[str, bytes] = {}
    for name, value in values.items():
        kind = type(value)
        if kind is list or kind is dict:
            blob = fingerprint(value)
            if blob is None:
                return _Decoded(b"", meta, (), {})  # not JSON-like: keep nothing (never equals a record)
            items.append((name, None, blob))
            pristine[name] = blob
        elif kind is datetime:
            items.append((name, datetime.fromisoformat(value.isoformat()), None))
        else:
            items.append((name, value, None))
    return _Decoded(record, meta, tuple(items), pristine)


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
        self._decoded: dict[str, _Decoded] = {}

    async def load(self, token: str | None) -> Session:
        """The live session stored under `token`, or a fresh empty one. Never adopts a client's token: one
        that finds nothing (unknown, expired, ended, undecodable) gives a session without a token."""
        if token is None:
            return Session()
        key = store_key(token)
        found = await self.store.find_with_expiry(key)
        if found is None:
            return Session()
        record, expires = found
        known = self._decoded.get(key)
        if known is not None and known.record == record:  # the same object, mostly: no bytes compared
            meta, values = known.meta, known.thaw()
        else:
            try:
                meta, values = decode_record(record)
            except ValueError:
                logger.warning("a stored session could not be decoded (tampered with?); starting a fresh one")
                return Session()
            known = _decoded(record, meta, values)
            self._keep(key, known)
        now = self.clock()
        if meta.end <= now or expires <= now:
            return Session()  # ended (the store's clock may lag ours): never served
        if self.idle_timeout is not None:
            deadline = min(meta.end, now + self.idle_timeout)
            if deadline - expires >= self.idle_timeout / 10:  # move it, but not on every request
                try:
                    if await self.store.touch(key, deadline):
                        expires = deadline
                except StoreError:
                    logger.warning("could not move the idle deadline of a session", exc_info=True)
        return Session.restore(token, record, meta, values, expires, known.pristine)

    async def commit(self, session: Session, ok: bool, resend: bool = False) -> CookieChange | None:
        """Store what the request did to `session`; return the cookie to send, or None.

        `ok` is False for a response of 500 or more: then nothing is written but a destroy(). `resend`
        asks for the cookie of a stored session even when nothing else would send it (to re-sign it with
        the current key). Raises StoreError when the store fails or the session cannot be stored.
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
                await self.end(pending.dead_tokens)
            if not ok or not pending.data:
                return EXPIRE_COOKIE
            return await self._create(session, pending)  # given data again after destroy(): a new session
        if not ok:
            return None
        if pending.dead_tokens:
            return await self._renew(session, pending)
        if pending.meta is None:
            return await self._create(session, pending) if pending.data else None
        return await self._update(session, pending, resend)

    async def _create(self, session: Session, pending: Pending, data: dict[str, Any] | None = None,
                      token: str | None = None) -> CookieChange:
        """Store a new session under its token (a new one when it has none)."""
        now = self.clock()
        new = token or pending.token or new_token()
        keep = self.max_age if self.max_age is not None else BROWSER_SESSION_KEEP
        meta = Meta(now, now + keep, pending.remember)
        if keep > 0:  # else a session that has already ended: a cookie that says so, nothing stored
            expires = self._expiry(meta, now)
            key = store_key(new)
            update = Update(pending.data if data is None else data, meta, expires, create=True)
            await self._write(key, update)
            session.stored(new, meta, expires)
        return CookieChange(new, meta)

    async def _update(self, session: Session, pending: Pending, resend: bool) -> CookieChange | None:
        """Merge the request's changes into the stored session."""
        token, meta = pending.token, pending.meta
        assert token is not None and meta is not None
        if pending.remember_changed:
            meta = Meta(meta.created, meta.end, pending.remember)
        expires = self._expiry(meta, self.clock())
        if not (pending.put or pending.removed or pending.cleared or pending.remember_changed):
            return CookieChange(token, meta) if resend else None  # nothing changed: only a re-signed cookie
        update = Update(pending.data, meta, expires, base=pending.base, put=pending.put, removed=pending.removed,
                        cleared=pending.cleared, meta_changed=pending.remember_changed)
        if not await self._write(store_key(token), update):
            logger.warning("changes to a session that was destroyed or renewed meanwhile were dropped")
            return None
        session.stored(token, meta, expires)
        return CookieChange(token, meta) if resend or pending.remember_changed or pending.cleared else None

    async def _renew(self, session: Session, pending: Pending) -> CookieChange | None:
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
        found = await self.store.find_with_expiry(old_key) if await self._write(old_key, update) else None
        if found is None:
            logger.warning("a session that was destroyed or renewed meanwhile was not renewed; its changes were "
                           "dropped")
            return None
        try:
            values = decode_record(found[0])[1]
        except ValueError:
            values = {}
        change = None
        if values:
            change = await self._create(session, pending, values, pending.token)
            if await self.store.find_with_expiry(old_key) is None:  # ended while we copied it: so is the copy
                await self.end((pending.token,))
                logger.warning("a session that was destroyed meanwhile was not renewed")
                return None
        await self.end((old,))
        return change if change is not None else EXPIRE_COOKIE

    async def end(self, tokens: tuple[str, ...]) -> None:
        """Delete the sessions of `tokens` and make that durable: a logout must survive a power cut."""
        for token in tokens:
            key = store_key(token)
            self._decoded.pop(key, None)
            await self.store.delete(key)
        await self.store.sync()

    async def _write(self, key: str, update: Update) -> bool:
        """Merge `update` into the store; on success, keep what was written for the next load of it."""
        record = self._encode(update)
        if len(record) > MAX_RECORD_SIZE:
            raise StoreError(f"a session of {len(record):,} bytes is over the limit of {MAX_RECORD_SIZE:,} bytes; "
                             "nothing was stored")
        # Taken before the store is awaited: other tasks may change the lists and dicts meanwhile.
        known = _decoded(record, update.meta, update.data)
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
