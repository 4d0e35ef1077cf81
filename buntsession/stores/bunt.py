"""`BuntStore`: sessions in the embedded engine, one record per session under `prefix` + key."""

from __future__ import annotations

from types import TracebackType

from buntsession.engine import DB
from buntsession.merge import Update, apply_update

__all__ = ["BuntStore"]


class BuntStore:
    """A session store over a `DB`. Entering it (as the middleware does at lifespan startup) opens the DB
    once more and leaving closes that once: a DB the caller opened stays open (opening is counted)."""

    def __init__(self, db: DB, prefix: str = "session:") -> None:
        self.db = db
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"BuntStore({self.db!r}, prefix={self.prefix!r})"

    async def __aenter__(self) -> BuntStore:
        await self.db.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.db.close()

    async def find(self, key: str) -> bytes | None:
        return await self.db.get(self.prefix + key)

    async def find_with_expiry(self, key: str) -> tuple[bytes, float] | None:
        found = await self.db.get_with_expiry(self.prefix + key)
        if found is None or found[1] is None:
            return None  # every session this package writes expires: one that does not is not ours
        return found  # type: ignore[return-value]

    async def commit(self, key: str, data: bytes, expires_at: float) -> None:
        await self.db.set(self.prefix + key, data, expire_at=expires_at)

    async def delete(self, key: str) -> None:
        await self.db.delete(self.prefix + key)

    async def merge(self, key: str, update: Update) -> bool:
        expires_at = update.expires_at

        def change(stored: bytes | None) -> tuple[bytes, float] | None:
            merged = apply_update(stored, update)
            return None if merged is None else (merged, expires_at)

        return await self.db.update(self.prefix + key, change)

    async def touch(self, key: str, expires_at: float) -> bool:
        return await self.db.expire(self.prefix + key, None, expire_at=expires_at)

    async def sync(self) -> None:
        await self.db.sync()
