"""The store contract: the three calls every store answers, and what the shipped stores offer beyond them."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from buntsession.merge import Update

__all__ = ["SessionStore", "Store"]


@runtime_checkable
class Store(Protocol):
    """Where sessions live. `key` is derived from the token (its SHA-256), never the token itself.

    `find` returns None for a missing or expired key; `delete` of a missing key does nothing; errors are
    raised only for system faults, as `StoreError`. A store may also be an async context manager, opened
    at lifespan startup and closed at shutdown; it never closes what it did not open.
    """

    async def find(self, key: str) -> bytes | None: ...

    async def commit(self, key: str, data: bytes, expires_at: float) -> None: ...

    async def delete(self, key: str) -> None: ...


@runtime_checkable
class SessionStore(Store, Protocol):
    """The calls the middleware uses. The shipped stores offer them; a plain `Store` gets them from an
    adapter (`buntsession.stores.plain`), which cannot merge atomically nor move an idle deadline.

    `find_with_expiry` gives the record and when the store will forget it. `merge` applies one request's
    changes onto the stored session atomically (concurrent requests keep each other's keys; see
    `buntsession.merge.apply_update`) and returns False, writing nothing, when a session it may not create
    is gone. `touch` moves only the expiry (the idle deadline). `sync` makes every change so far durable
    (a logout must survive a power cut).
    """

    async def find_with_expiry(self, key: str) -> tuple[bytes, float] | None: ...

    async def merge(self, key: str, update: Update) -> bool: ...

    async def touch(self, key: str, expires_at: float) -> bool: ...

    async def sync(self) -> None: ...
