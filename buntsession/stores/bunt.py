"""`BuntStore`: sessions in the embedded engine, one record per session under `prefix` + key.

The sessions of a user are indexed under `prefix` + "user:" + SHA-256 of the user id: one small record
(JSON: its expiry and, per session, its store key, when it was added and its end; entries past their
end are dropped whenever the record is written), changed atomically with
`DB.update`, expiring with the last session it may hold. Imported Starlette cookies leave their markers
under `prefix` + "import:" + a hash of the cookie.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType

from buntsession.codec import Meta
from buntsession.engine import DB
from buntsession.merge import Update
from buntsession.users import UserSessions, decode_index, encode_index, found_meta, index_key

__all__ = ["BuntStore"]


class BuntStore(UserSessions):
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
        return await self.db.update(self.prefix + key, update.planned)

    async def touch(self, key: str, expires_at: float) -> bool:
        return await self.db.expire(self.prefix + key, None, expire_at=expires_at)

    async def sync(self) -> None:
        await self.db.sync()

    # -- the sessions of a user (see buntsession.users) ------------------------------------------------------

    async def bind_user(self, user_id: str, key: str, end: float) -> None:
        now = self._now()

        def add(stored: bytes | None) -> tuple[bytes, float]:
            expiry, entries = decode_index(stored)
            entries[key] = (now, end)
            expiry = max(expiry, end)
            return encode_index(expiry, entries, now), expiry

        await self.db.update(self.prefix + index_key(user_id), add)

    async def unbind_user(self, user_id: str, keys: Sequence[str]) -> None:
        now = self._now()

        def drop(stored: bytes | None) -> tuple[bytes, float] | None:
            expiry, entries = decode_index(stored)
            if not any(key in entries for key in keys):
                return None
            for key in keys:
                entries.pop(key, None)
            return encode_index(expiry, entries, now), expiry  # an empty index expires when it would have

        await self.db.update(self.prefix + index_key(user_id), drop)

    async def _index_entries(self, user_id: str) -> dict[str, float]:
        _, entries = decode_index(await self.db.get(self.prefix + index_key(user_id)))
        return {key: added for key, (added, _) in entries.items()}

    async def _metas(self, keys: list[str]) -> list[tuple[Meta | None, float] | None]:
        metas: list[tuple[Meta | None, float] | None] = []
        for key in keys:
            found = await self.db.get_with_expiry(self.prefix + key)
            if found is not None and found[1] is None:
                metas.append((None, 0.0))  # a key without expiry is no session of ours
            else:
                metas.append(found_meta(found))  # type: ignore[arg-type]
        return metas

    async def _delete(self, keys: list[str]) -> int:
        return sum([await self.db.delete(self.prefix + key) for key in keys])

    def _now(self) -> float:
        return time.time()
