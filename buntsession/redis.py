"""`RedisStore`: sessions on a Redis server, for apps served from several hosts (`buntsession[redis]`).

    import redis.asyncio
    from buntsession.redis import RedisStore

    store = RedisStore(redis.asyncio.Redis(host="127.0.0.1"), prefix="session:")

Each session is one hash: `m:c`, `m:e` and `m:r` hold its creation time, absolute end and remember-me choice,
`m:u`, `m:a` and `m:l` the user it is bound to, the User-Agent that logged in and when it was last active
(only for a session bound to a user), and `d:<key>` the encoded value of each of its keys. A user's sessions
are indexed in a hash of their own, `<prefix>user:<SHA-256 of the user id>` (field: a session's store key,
value: when it was added), which expires with the last session it may hold; each call on it names that one
key, so on Redis Cluster every step stays within one hash slot. A merge runs as one Lua script that sets and
deletes fields and sets the expiry (PEXPIREAT, so the absolute end is kept to the millisecond) without ever
parsing a value; a commit for a session that is gone does nothing. The store works whether or not the client
decodes responses, never closes the client it was given, and runs on asyncio (redis.asyncio does not run on
trio). Every call gives up after `timeout` seconds with `StoreError`, so a slow or stopped server turns into a
503 rather than a hung request; the client reconnects by itself later.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import redis.asyncio
import redis.exceptions

from buntsession.codec import Meta, decode_record, decode_value, encode_record, encode_value
from buntsession.errors import StoreError
from buntsession.merge import Update
from buntsession.users import UserSessions, index_key

__all__ = ["RedisStore"]

logger = logging.getLogger("buntsession")

_T = TypeVar("_T")

# KEYS[1]: the session hash. ARGV: create, cleared, expiry (ms), number of put pairs, number of removed keys,
# has meta, then [created, end, remember, user, agent, last active] when it has meta ("" for none), then the
# put pairs, then the removed fields.
_MERGE = """
local key = KEYS[1]
if ARGV[1] == "1" then
  redis.call("DEL", key)
elseif redis.call("EXISTS", key) == 0 then
  return 0
end
local i = 7
if ARGV[6] == "1" then
  redis.call("HSET", key, "m:c", ARGV[i], "m:e", ARGV[i + 1], "m:r", ARGV[i + 2])
  for j, field in ipairs({"m:u", "m:a", "m:l"}) do
    local value = ARGV[i + 2 + j]
    if value == "" then redis.call("HDEL", key, field) else redis.call("HSET", key, field, value) end
  end
  i = i + 6
end
if ARGV[2] == "1" then
  for _, field in ipairs(redis.call("HKEYS", key)) do
    if string.sub(field, 1, 2) == "d:" then redis.call("HDEL", key, field) end
  end
end
for j = 1, tonumber(ARGV[4]) do
  redis.call("HSET", key, ARGV[i], ARGV[i + 1])
  i = i + 2
end
for j = 1, tonumber(ARGV[5]) do
  redis.call("HDEL", key, ARGV[i])
  i = i + 1
end
redis.call("PEXPIREAT", key, ARGV[3])
return 1
"""

# KEYS[1]: a user's index. ARGV: the session's store key, when it was added (unix time), its end (ms).
_BIND = """
redis.call("HSET", KEYS[1], ARGV[1], ARGV[2])
if redis.call("PEXPIRETIME", KEYS[1]) < tonumber(ARGV[3]) then redis.call("PEXPIREAT", KEYS[1], ARGV[3]) end
return 1
"""

_REMEMBER = {None: "", True: "1", False: "0"}
_META_FIELDS = ("m:c", "m:e", "m:r", "m:u", "m:a", "m:l")


def _forget_connections(client: redis.asyncio.Redis | redis.asyncio.RedisCluster) -> None:
    """Drop the client's connections without closing them: they belong to an event loop that has ended,
    and the client opens new ones on the running loop as it needs them."""
    if isinstance(client, redis.asyncio.RedisCluster):
        # redis-py has no public reset for a cluster client: each node keeps its own connections.
        for node in client.get_nodes():
            node._connections.clear()
            node._free.clear()
    else:
        client.connection_pool.reset()  # type: ignore[no-untyped-call]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(unix_time: float) -> int:
    return math.ceil(unix_time * 1000)


class RedisStore(UserSessions):
    """A session store on Redis. See the module docstring."""

    def __init__(self, client: redis.asyncio.Redis | redis.asyncio.RedisCluster, prefix: str = "session:",
                 timeout: float = 2.0) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.client = client
        self.prefix = prefix
        self.timeout = timeout
        self._merge = client.register_script(_MERGE)
        self._bind = client.register_script(_BIND)
        self._loop: object = None

    def __repr__(self) -> str:
        return f"RedisStore({self.client!r}, prefix={self.prefix!r})"

    @asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """Bound the time of one call and turn the client's errors into StoreError."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Connections belong to the event loop that opened them (Starlette's TestClient runs each
            # request on a new loop): start afresh on a new one.
            if self._loop is not None:
                _forget_connections(self.client)
            self._loop = loop
        try:
            with anyio.fail_after(self.timeout):
                yield
        except TimeoutError as exc:
            raise StoreError(f"Redis did not answer within {self.timeout} s") from exc
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(f"Redis failed: {exc}") from exc

    async def _run(self, call: Awaitable[_T]) -> _T:
        async with self._call():
            return await call

    async def find(self, key: str) -> bytes | None:
        found = await self.find_with_expiry(key)
        return None if found is None else found[0]

    async def find_with_expiry(self, key: str) -> tuple[bytes, float] | None:
        # One round trip; no MULTI: a key that expires between the two reads shows as absent either way.
        async with self._call(), self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.prefix + key)
            pipe.pexpiretime(self.prefix + key)
            fields, expiry_ms = await pipe.execute()
        if not fields or expiry_ms < 0:
            return None
        meta, values = _from_hash(fields)
        if meta is None:
            logger.warning("a stored session could not be decoded (tampered with?); starting a fresh one")
            return None
        return encode_record(meta, values), expiry_ms / 1000

    async def commit(self, key: str, data: bytes, expires_at: float) -> None:
        meta, values = decode_record(data)
        await self.merge(key, Update(values, meta, expires_at, create=True))

    async def delete(self, key: str) -> None:
        await self._run(self.client.delete(self.prefix + key))

    async def merge(self, key: str, update: Update) -> bool:
        changed = update.changed()
        meta = update.meta if update.create or update.meta_changed else None
        removed = [name for name in update.removed if name not in changed]
        args: list[Any] = ["1" if update.create else "0", "1" if update.cleared else "0", _ms(update.expires_at),
                           len(changed), len(removed), "0" if meta is None else "1"]
        if meta is not None:
            args += [repr(meta.created), repr(meta.end), _REMEMBER[meta.remember], meta.user or "", meta.agent or "",
                     "" if meta.active is None else repr(meta.active)]
        for name, value in changed.items():
            args += ["d:" + name, encode_value(value)]
        args += ["d:" + name for name in removed]
        return bool(await self._run(self._merge(keys=[self.prefix + key], args=args)))

    async def touch(self, key: str, expires_at: float) -> bool:
        return bool(await self._run(self.client.pexpireat(self.prefix + key, _ms(expires_at))))

    async def sync(self) -> None:
        """Durability is the Redis server's (its appendfsync setting): nothing to do here."""

    # -- the sessions of a user (see buntsession.users) ------------------------------------------------------
    # Every script and command names one key, and pipelines are not transactions: on Redis Cluster each
    # step touches one hash slot (a user's index and each session may live on different nodes).

    async def bind_user(self, user_id: str, key: str, end: float) -> None:
        await self._run(self._bind(keys=[self.prefix + index_key(user_id)], args=[key, repr(self._now()), _ms(end)]))

    async def unbind_user(self, user_id: str, keys: Sequence[str]) -> None:
        if keys:
            await self._run(self.client.hdel(self.prefix + index_key(user_id), *keys))

    async def _index_entries(self, user_id: str) -> dict[str, float]:
        fields = await self._run(self.client.hgetall(self.prefix + index_key(user_id)))
        entries = {}
        for name, value in fields.items():
            try:
                entries[_text(name)] = float(_text(value))
            except (ValueError, UnicodeDecodeError):
                entries[_text(name)] = 0.0  # not ours: dropped by the listing when nothing lives under it
        return entries

    async def _metas(self, keys: list[str]) -> list[tuple[Meta | None, float] | None]:
        async with self._call(), self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(self.prefix + key, _META_FIELDS)
                pipe.pexpiretime(self.prefix + key)
            replies = await pipe.execute()
        metas: list[tuple[Meta | None, float] | None] = []
        for at in range(0, len(replies), 2):
            values, expiry_ms = replies[at], replies[at + 1]
            if expiry_ms == -2:
                metas.append(None)
                continue
            meta, _ = _from_hash({name: value for name, value in zip(_META_FIELDS, values, strict=True)
                                  if value is not None})
            metas.append((meta, expiry_ms / 1000 if expiry_ms >= 0 else 0.0))
        return metas

    async def _delete(self, keys: list[str]) -> int:
        async with self._call(), self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.delete(self.prefix + key)
            return sum(await pipe.execute())

    def _now(self) -> float:
        return time.time()


def _from_hash(fields: Mapping[Any, Any]) -> tuple[Meta | None, dict[str, Any]]:
    meta: dict[str, str] = {}
    values: dict[str, Any] = {}
    try:
        for name, value in fields.items():
            field, text = _text(name), _text(value)
            if field.startswith("d:"):
                values[field[2:]] = decode_value(text)
            elif field.startswith("m:"):
                meta[field[2:]] = text
        remember = {"": None, "1": True, "0": False}[meta["r"]]
        user, agent, active = meta.get("u"), meta.get("a"), meta.get("l")
        return Meta(float(meta["c"]), float(meta["e"]), remember, user, agent if user else None,
                    float(active) if user and active else None), values
    except (KeyError, ValueError, UnicodeDecodeError):
        return None, values  # not a session this store wrote (or tampered with): treated as absent
