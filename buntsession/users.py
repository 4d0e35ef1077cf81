"""Sessions of a user: `SessionInfo`, the public id of a session, and the per-user index the stores keep.

A session bound to a user (`Session.login`) carries the user in its record's metadata. Each store also
keeps, per user, an index of the store keys of that user's sessions, so that listing and ending them read
only that user's entries, never every session. The index is a hint that listings check, never the
truth: every entry is checked against the session's own record (live, bound to that user), so an entry
left behind by a crash or by a session's expiry shows nothing, and is dropped by the next listing. The
order of writes keeps the one thing a check cannot repair, a live session missing from the index, from
happening: an entry is added before its session's record is written and removed only after the record
was deleted (durably), and an entry whose record is not there yet is dropped only when it is older than
`BIND_GRACE`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from buntsession.codec import Meta, decode_meta

__all__ = ["BIND_GRACE", "SessionInfo", "UserSessions", "check_user_id", "index_key", "live_meta", "newest_first",
           "session_id"]

BIND_GRACE = 60.0
"""Seconds an index entry whose session record is missing is kept (a login writes the entry first, then
the record): only older entries are dropped by a listing."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One live session of a user, as `user_sessions()` lists it."""

    id: str
    """A public handle (32 hex characters): a one-way hash of the store key, which reveals neither the
    token nor the store key and cannot be turned into either. Pass it to `end_user_session`."""
    created_at: datetime
    """When the session was created (at login: login renews the token)."""
    last_active: datetime
    """When the session last served a request, to within `Lifecycle.activity_interval` (5 minutes)."""
    expires_at: datetime
    """When it ends unless used again: the earlier of its absolute end and its idle deadline."""
    current: bool
    """Whether it is the session of the request that asked (always False from a store)."""
    user_agent: str | None
    """The User-Agent header of the request that logged in; None when it sent none."""


def session_id(key: str) -> str:
    """The public id of the session stored under `key` (a SHA-256 of the token): a SHA-256 of it with a
    purpose prefix, cut to 128 bits."""
    return hashlib.sha256(b"buntsession.session-id\0" + key.encode()).hexdigest()[:32]


def index_key(user_id: str) -> str:
    """The key, below a store's prefix, of `user_id`'s index: a hash, so any user id makes a short key and
    no user id is spelled out in key listings."""
    return "user:" + hashlib.sha256(user_id.encode()).hexdigest()


def live_meta(record: bytes, expires: float, user_id: str, now: float) -> Meta | None:
    """The metadata of `record` when it is a live session bound to `user_id`; None otherwise (ended,
    expired, of another user, anonymous, or not a session record)."""
    try:
        meta = decode_meta(record)
    except ValueError:
        return None
    if meta.user != user_id or meta.end <= now or expires <= now:
        return None
    return meta


def found_meta(found: tuple[bytes, float] | None) -> tuple[Meta | None, float] | None:
    """What `UserSessions._metas` reports for one key, from the store's (record, expiry): None when nothing
    is stored, (None, expiry) for a record that is not a session's."""
    if found is None:
        return None
    try:
        return decode_meta(found[0]), found[1]
    except ValueError:
        return None, found[1]


def info(key: str, meta: Meta, expires: float, current: str | None) -> SessionInfo:
    """The `SessionInfo` of a live session; `current` is the store key of the asking request's session."""
    active = meta.active if meta.active is not None else meta.created
    return SessionInfo(session_id(key), datetime.fromtimestamp(meta.created, UTC),
                       datetime.fromtimestamp(active, UTC), datetime.fromtimestamp(expires, UTC),
                       key == current, meta.agent)


def newest_first(infos: list[SessionInfo]) -> list[SessionInfo]:
    """Sorted by last activity, the most recent first (then by creation, then id: a stable order)."""
    return sorted(infos, key=lambda i: (i.last_active, i.created_at, i.id), reverse=True)


# -- the index as one value (BuntStore): {"x": its expiry, "k": {store key: [when added, end], ...}} -------


def decode_index(value: bytes | None) -> tuple[float, dict[str, tuple[float, float]]]:
    """The expiry and entries (store key: when added, the session's end) of an index value; (0, {}) for
    none or one that cannot be read."""
    if value is None:
        return 0.0, {}
    try:
        index = json.loads(value)
        return float(index["x"]), {str(k): (float(v[0]), float(v[1])) for k, v in index["k"].items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return 0.0, {}


def encode_index(expiry: float, entries: dict[str, tuple[float, float]], now: float) -> bytes:
    """The index value `decode_index` reads back, without the entries of sessions past their end (so an
    index that is never listed does not grow with every login)."""
    kept = {key: entry for key, entry in entries.items() if entry[1] > now}
    return json.dumps({"x": expiry, "k": kept}, separators=(",", ":")).encode()


def check_user_id(user_id: object) -> str:
    """`user_id` when it is a non-empty str of valid Unicode; TypeError otherwise."""
    if type(user_id) is not str or not user_id:
        raise TypeError(f"a user id is a non-empty str, not {user_id!r}")
    try:
        user_id.encode()
    except UnicodeEncodeError:
        raise TypeError(f"a user id must be valid Unicode (no lone surrogates): {user_id[:40]!r}") from None
    return user_id


class UserSessions:
    """What a store offers for the sessions of a user, over a per-user index (see the module docstring).

    A store provides the primitives (`bind_user`, `unbind_user`, `_index_entries`, `_metas`, `_delete`, `sync`,
    `_now`); the listing and ending rules are here, the same for every store. Each call costs in
    proportion to the user's own index entries, whatever else the store holds.
    """

    async def bind_user(self, user_id: str, key: str, end: float) -> None:
        """Add the session stored (about to be stored) under `key`, ending at `end`, to `user_id`'s index.
        Called before the session's record is written."""
        raise NotImplementedError

    async def unbind_user(self, user_id: str, keys: Sequence[str]) -> None:
        """Drop `keys` from `user_id`'s index. Called after their records were deleted, durably."""
        raise NotImplementedError

    async def _index_entries(self, user_id: str) -> dict[str, float]:
        """`user_id`'s index: each store key and when its entry was added (unix time)."""
        raise NotImplementedError

    async def _metas(self, keys: list[str]) -> list[tuple[Meta | None, float] | None]:
        """For each key: None when nothing is stored under it; else its metadata (None when it is not a
        session record) and when the store forgets it."""
        raise NotImplementedError

    async def _delete(self, keys: list[str]) -> int:
        """Delete the records of `keys`; how many existed."""
        raise NotImplementedError

    async def sync(self) -> None:
        raise NotImplementedError

    def _now(self) -> float:
        raise NotImplementedError

    async def _live(self, user_id: str) -> list[tuple[str, Meta, float]]:
        """(key, metadata, expiry) of each live session of `user_id`; drops the index entries that point
        at nothing live (except young ones whose record may be on its way)."""
        check_user_id(user_id)
        entries = await self._index_entries(user_id)
        if not entries:
            return []
        keys = list(entries)
        now = self._now()
        live, dead = [], []
        for key, found in zip(keys, await self._metas(keys), strict=True):
            meta = None
            if found is not None and found[0] is not None:
                meta = found[0]
                if meta.user != user_id or meta.end <= now or found[1] <= now:
                    meta = None
            if meta is not None:
                live.append((key, meta, found[1]))  # type: ignore[index]
            elif found is not None or entries[key] + BIND_GRACE <= now:
                dead.append(key)
        if dead:
            await self.unbind_user(user_id, dead)
        return live

    async def user_sessions(self, user_id: str, current: str | None = None) -> list[SessionInfo]:
        """The live sessions bound to `user_id`, most recently active first; [] when it has none.
        `current` is the store key of a session to mark as `current`. TypeError for a user id that is not
        a non-empty str. Raises StoreError when the store fails (a closed DB, Redis unreachable)."""
        return newest_first([info(key, meta, expires, current) for key, meta, expires in await self._live(user_id)])

    async def end_user_session(self, user_id: str, public_id: str) -> bool:
        """End the session of `user_id` whose `SessionInfo.id` is `public_id`: its record is deleted,
        durably, then its index entry. False when no live session of that user has that id (another
        user's session is never ended). TypeError for a user id that is not a non-empty str."""
        for key, _, _ in await self._live(user_id):
            if session_id(key) == public_id:
                ended = await self._delete([key])
                await self.sync()
                await self.unbind_user(user_id, [key])
                return ended > 0
        return False

    async def end_user_sessions(self, user_id: str, keep: str | None = None) -> int:
        """End every live session of `user_id` but the one stored under `keep`; how many it ended. The
        records are deleted and made durable before the index entries go, so a crash in between leaves
        entries that point at nothing (listings skip and drop them), never a live session missing from
        the index. TypeError for a user id that is not a non-empty str."""
        keys = [key for key, _, _ in await self._live(user_id) if key != keep]
        if not keys:
            return 0
        ended = await self._delete(keys)
        await self.sync()
        await self.unbind_user(user_id, keys)
        return ended
