"""Any three-call `Store` as a `SessionStore`: the one place where a plain store and a rich one differ."""

from __future__ import annotations

import math

from buntsession.merge import Update, apply_update
from buntsession.stores.base import SessionStore, Store

__all__ = ["PlainStore", "session_store"]


def session_store(store: Store) -> SessionStore:
    """`store` itself when it offers the calls of `SessionStore`, else `PlainStore(store)`."""
    return store if isinstance(store, SessionStore) else PlainStore(store)


class PlainStore:
    """A `SessionStore` over a store with only `find`, `commit` and `delete`.

    A merge reads, changes and writes: not atomic, so overlapping requests on one session may lose each
    other's keys. The store's own expiry is not known (the session's end, kept in its record, still
    holds), so an idle timeout cannot be kept: `touch` is refused.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    async def find(self, key: str) -> bytes | None:
        return await self.store.find(key)

    async def find_with_expiry(self, key: str) -> tuple[bytes, float] | None:
        data = await self.store.find(key)
        return None if data is None else (data, math.inf)

    async def commit(self, key: str, data: bytes, expires_at: float) -> None:
        await self.store.commit(key, data, expires_at)

    async def delete(self, key: str) -> None:
        await self.store.delete(key)

    async def merge(self, key: str, update: Update) -> bool:
        merged = apply_update(await self.store.find(key), update)
        if merged is None:
            return False
        await self.store.commit(key, merged, update.expires_at)
        return True

    async def touch(self, key: str, expires_at: float) -> bool:
        raise NotImplementedError("a plain store cannot move an idle deadline")

    async def sync(self) -> None:
        """A plain store's writes are as durable as it makes them."""
