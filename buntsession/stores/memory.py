"""`MemoryStore`: sessions in a dict, with expiry. For tests and single-process development."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from buntsession.codec import Meta
from buntsession.merge import Update, apply_update
from buntsession.users import BIND_GRACE, UserSessions, found_meta

__all__ = ["MemoryStore"]

_SWEEP_EVERY = 1000


class MemoryStore(UserSessions):
    """Keeps sessions in memory until they expire; nothing survives the process.

    Expired entries are dropped when they are looked up, and all of them every 1,000 writes, so memory
    follows the live sessions. Every call completes without yielding, so each is atomic. The sessions of
    a user are indexed in a dict of their own (user id -> store key -> when added), which `len` does not
    count.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._entries: dict[str, tuple[bytes, float]] = {}
        self._users: dict[str, dict[str, float]] = {}
        self._clock = clock
        self._writes = 0

    def __len__(self) -> int:
        now = self._clock()
        return sum(1 for _, expires in self._entries.values() if expires > now)

    async def find(self, key: str) -> bytes | None:
        found = await self.find_with_expiry(key)
        return None if found is None else found[0]

    async def find_with_expiry(self, key: str) -> tuple[bytes, float] | None:
        entry = self._entries.get(key)
        if entry is not None and entry[1] <= self._clock():
            del self._entries[key]
            return None
        return entry

    async def commit(self, key: str, data: bytes, expires_at: float) -> None:
        self._write(key, data, expires_at)

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    async def merge(self, key: str, update: Update) -> bool:
        found = await self.find_with_expiry(key)
        merged = apply_update(None if found is None else found[0], update)
        if merged is None:
            return False
        self._write(key, merged, update.expires_at)
        return True

    async def touch(self, key: str, expires_at: float) -> bool:
        found = await self.find_with_expiry(key)
        if found is None:
            return False
        self._entries[key] = (found[0], expires_at)
        return True

    async def sync(self) -> None:
        """Nothing to make durable: a memory store keeps nothing across a restart."""

    def _write(self, key: str, data: bytes, expires_at: float) -> None:
        self._entries[key] = (bytes(data), expires_at)
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            now = self._clock()
            self._entries = {k: e for k, e in self._entries.items() if e[1] > now}
            for user_id, index in list(self._users.items()):  # entries of sessions that ended by themselves
                kept = {k: t for k, t in index.items() if k in self._entries or t + BIND_GRACE > now}
                if kept:
                    self._users[user_id] = kept
                else:
                    del self._users[user_id]

    # -- the sessions of a user (see buntsession.users) ------------------------------------------------------

    async def bind_user(self, user_id: str, key: str, end: float) -> None:
        self._users.setdefault(user_id, {})[key] = self._clock()

    async def unbind_user(self, user_id: str, keys: Sequence[str]) -> None:
        entries = self._users.get(user_id)
        if entries is not None:
            for key in keys:
                entries.pop(key, None)
            if not entries:
                del self._users[user_id]

    async def _index_entries(self, user_id: str) -> dict[str, float]:
        return dict(self._users.get(user_id, {}))

    async def _metas(self, keys: list[str]) -> list[tuple[Meta | None, float] | None]:
        return [found_meta(await self.find_with_expiry(key)) for key in keys]

    async def _delete(self, keys: list[str]) -> int:
        now = self._clock()
        return sum([(entry := self._entries.pop(key, None)) is not None and entry[1] > now for key in keys])

    def _now(self) -> float:
        return self._clock()
