"""`PostgresStore`: sessions in a PostgreSQL table, for apps served from several hosts (`buntsession[postgres]`).

    import asyncpg
    from buntsession.postgres import PostgresStore

    store = PostgresStore(lambda: asyncpg.create_pool("postgresql://app@db/app"))  # a pool per event loop
    # or, inside a running event loop, over a pool of yours:
    store = PostgresStore(await asyncpg.create_pool(...), table="buntsession_sessions")

Each session is one row of one table (`DDL` below, created with its indexes on open when missing). Its
values are a `jsonb` object of the tagged per-key strings of `buntsession.codec.encode_value`, so every
type comes back exact (`2**70`, `0.1 + 0.2`, bytes, datetimes) and a merge never parses a value: it is one
UPDATE whose `jsonb` operators drop the request's removed keys and lay its changed ones over what is
stored, so overlapping requests on any number of hosts keep each other's keys. An UPDATE that finds no
live row changes nothing and the merge returns False: a destroyed or renewed session is never brought
back (only a new session, `create`, is inserted, or replaces what is stored under its key).

`expires_at` is an absolute time (`timestamptz`, indexed): reads never return a row past it, whatever the
cleanup has done; the idle deadline moves by an UPDATE of that column alone. Expired rows are deleted in
batches of at most `cleanup_batch` rows, by the calls themselves, at most once per `cleanup_interval`
seconds (sooner while a batch comes back full), with no thread and no task of their own; several hosts
share the work (`SKIP LOCKED`).

Every call gives up after `timeout` seconds (`anyio.fail_after`) and any driver or OS error becomes
`StoreError` (the middleware's 503); the pool reconnects by itself when the server is back. A pool given
to the store stays the caller's (never closed here) and, as asyncpg's pools are, belongs to the event loop
that made it: a store used from several event loops (Starlette's `TestClient` outside `with`) is given a
factory instead, and then makes, owns and closes one pool per loop. asyncpg runs on asyncio only.

The sessions of a user (`Session.login`) are found by the indexed `user_id` column, written with the row:
the column is the per-user index, so listing is one indexed SELECT and ending all of a user's sessions one
DELETE.
A session key (not a value) holding U+0000 cannot be kept (`jsonb` refuses it): its commit is a StoreError.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import anyio
import asyncpg  # type: ignore[import-untyped]

from buntsession.codec import Meta, decode_record, decode_value, encode_record, encode_value
from buntsession.errors import StoreError
from buntsession.merge import Update
from buntsession.users import UserSessions, check_user_id

__all__ = ["DDL", "PostgresStore", "ddl"]

logger = logging.getLogger("buntsession")

_MAX_IDENTIFIER = 63  # bytes: PostgreSQL's NAMEDATALEN - 1; longer names are cut, which could make two equal

DDL = """\
CREATE TABLE IF NOT EXISTS {table} (
    key         text PRIMARY KEY,              -- SHA-256 of the session token, hex
    created_at  double precision NOT NULL,     -- unix time the session was created (or renewed)
    ends_at     double precision NOT NULL,     -- unix time of its absolute end
    remember    boolean,                       -- remember-me choice; NULL: the middleware's default
    data        jsonb NOT NULL DEFAULT '{{}}',   -- {{key: tagged value}} (buntsession.codec.encode_value)
    expires_at  timestamptz NOT NULL,          -- when the row may be forgotten (end or idle deadline)
    user_id     text,                          -- the user it is bound to (Session.login); NULL: anonymous
    user_agent  text,                          -- the User-Agent of the request that logged in
    active_at   double precision               -- unix time it was last seen active (a user's session)
);
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS user_agent text;    -- tables made before these two columns
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS active_at double precision;
CREATE INDEX IF NOT EXISTS {expiry_index} ON {table} (expires_at);
CREATE INDEX IF NOT EXISTS {user_index} ON {table} (user_id) WHERE user_id IS NOT NULL;
"""
"""The schema, with `{table}`, `{expiry_index}` and `{user_index}` for quoted identifiers (see `ddl`)."""

PoolSource = Any
"""An `asyncpg.Pool`, or a callable taking no argument that returns an awaitable of one (asyncpg has no
type hints, so this is Any to the type checker)."""


def quote_identifier(name: str) -> str:
    """`name` as a quoted PostgreSQL identifier. ValueError for an empty name, a NUL, or one longer than
    PostgreSQL keeps (63 bytes of UTF-8)."""
    if type(name) is not str:
        raise TypeError(f"an identifier is a str, not {type(name).__name__}")
    if not name or "\x00" in name:
        raise ValueError(f"not a valid PostgreSQL identifier: {name!r}")
    if len(name.encode()) > _MAX_IDENTIFIER:
        raise ValueError(f"a PostgreSQL identifier has at most {_MAX_IDENTIFIER} bytes: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def _names(table: str, schema: str | None) -> tuple[str, str, str]:
    """The quoted table and index names. The index names are the table's plus a suffix, so they must fit too."""
    prefix = "" if schema is None else quote_identifier(schema) + "."
    quoted = quote_identifier(table)
    return (prefix + quoted, quote_identifier(table + "_expires_at"), quote_identifier(table + "_user_id"))


def ddl(table: str = "buntsession_sessions", schema: str | None = None) -> str:
    """The SQL that creates the table and its indexes (idempotent: `IF NOT EXISTS`), for migrations."""
    name, expiry_index, user_index = _names(table, schema)
    return DDL.format(table=name, expiry_index=expiry_index, user_index=user_index)


def _tagged(value: object) -> str:
    """The tagged string of a value. A str holding NUL goes as JSON text: `jsonb` cannot hold U+0000."""
    if type(value) is str and "\x00" in value:
        return "j" + json.dumps(value)
    return encode_value(value)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # another event loop (trio), or none
        return None


class PostgresStore(UserSessions):
    """A session store on PostgreSQL over asyncpg. See the module docstring.

    `pool` is an `asyncpg.Pool` (the caller's: used on the event loop that made it, never closed here) or
    a factory such as `lambda: asyncpg.create_pool(dsn)` (the store makes a pool per event loop on first
    use and closes it when the store closes). `table` and `schema` are identifiers, quoted here (any
    characters but NUL, 63 bytes at most with the index suffixes). ValueError or TypeError at once for a
    bad argument.
    """

    def __init__(
        self,
        pool: PoolSource,
        table: str = "buntsession_sessions",
        timeout: float = 2.0,
        *,
        schema: str | None = None,
        cleanup_interval: float = 60.0,
        cleanup_batch: int = 1000,
    ) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if not (cleanup_interval >= 0 and math.isfinite(cleanup_interval)):
            raise ValueError(f"cleanup_interval must be a number of seconds, not {cleanup_interval!r}")
        if type(cleanup_batch) is not int or cleanup_batch < 1:
            raise ValueError(f"cleanup_batch must be a positive int, not {cleanup_batch!r}")
        if not isinstance(pool, asyncpg.Pool) and not callable(pool):
            raise TypeError("pool must be an asyncpg.Pool or a callable that returns an awaitable of one")
        self.table = table
        self.schema = schema
        self.timeout = timeout
        self.cleanup_interval = cleanup_interval
        self.cleanup_batch = cleanup_batch
        self._source = pool
        self._own = not isinstance(pool, asyncpg.Pool)
        self._pool: Any = None if self._own else pool
        self._loop: object = None
        self._ready = False  # the table is known to exist
        self._next_cleanup = 0.0
        self._entered = 0
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
        name, _, _ = _names(table, schema)
        self._ddl = ddl(table, schema)
        self._find = (f"SELECT created_at, ends_at, remember, data::text, extract(epoch FROM expires_at)::float8, "
                      f"user_id, user_agent, active_at FROM {name} WHERE key = $1 AND expires_at > now()")
        self._create = (
            f"INSERT INTO {name} AS s (key, created_at, ends_at, remember, data, expires_at, user_id, user_agent, "
            f"active_at) VALUES ($1, $2, $3, $4, $5::text::jsonb, to_timestamp($6::float8), $7, $8, $9) "
            f"ON CONFLICT (key) DO UPDATE SET created_at = excluded.created_at, ends_at = excluded.ends_at, "
            f"remember = excluded.remember, data = excluded.data, expires_at = excluded.expires_at, "
            f"user_id = excluded.user_id, user_agent = excluded.user_agent, active_at = excluded.active_at")
        self._merge = (
            f"UPDATE {name} SET "
            f"data = (CASE WHEN $2::boolean THEN '{{}}'::jsonb ELSE data END - $3::text[]) || $4::text::jsonb, "
            f"expires_at = to_timestamp($5::float8), "
            f"created_at = CASE WHEN $6::boolean THEN $7::float8 ELSE created_at END, "
            f"ends_at = CASE WHEN $6::boolean THEN $8::float8 ELSE ends_at END, "
            f"remember = CASE WHEN $6::boolean THEN $9::boolean ELSE remember END, "
            f"user_id = CASE WHEN $6::boolean THEN $10::text ELSE user_id END, "
            f"user_agent = CASE WHEN $6::boolean THEN $11::text ELSE user_agent END, "
            f"active_at = CASE WHEN $6::boolean THEN $12::float8 ELSE active_at END "
            f"WHERE key = $1 AND expires_at > now() RETURNING true")
        self._user_sessions = (f"SELECT key, created_at, ends_at, remember, user_agent, active_at, "
                               f"extract(epoch FROM expires_at)::float8 FROM {name} "
                               f"WHERE user_id = $1 AND expires_at > now()")
        self._end_user = (f"DELETE FROM {name} WHERE user_id = $1 AND expires_at > now() "
                          f"AND key IS DISTINCT FROM $2::text")
        self._delete_keys = f"DELETE FROM {name} WHERE key = ANY($1::text[]) AND expires_at > now()"
        self._touch = (f"UPDATE {name} SET expires_at = to_timestamp($2::float8) "
                       f"WHERE key = $1 AND expires_at > now() RETURNING true")
        self._delete_one = f"DELETE FROM {name} WHERE key = $1"
        self._cleanup = (
            f"DELETE FROM {name} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {name} WHERE expires_at <= now() "
            f"LIMIT $1 FOR UPDATE SKIP LOCKED)) AND expires_at <= now()")

    def __repr__(self) -> str:
        return f"PostgresStore({self._source!r}, table={self.table!r})"

    # -- opening and closing ---------------------------------------------------------------------------------

    async def __aenter__(self) -> PostgresStore:
        """Make sure the table and its indexes exist (and, with a factory, make this loop's pool).
        StoreError when the server cannot be reached within the timeout: the app does not start."""
        self._entered += 1
        try:
            async with self._call():
                pass  # _call made the pool and the table
        except BaseException:
            self._entered -= 1
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        """On the last exit, close the pool this store made (never the caller's)."""
        self._entered = max(0, self._entered - 1)
        if self._entered == 0:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the pool this store made, if any (a pool given to it is left alone). The store may be
        used again afterwards: it then makes a new pool."""
        pool, loop, self._loop = self._pool, self._loop, None
        if not self._own or pool is None:
            return
        self._pool = None
        if loop is not _running_loop():  # made on another event loop: its connections can only be dropped
            try:
                pool.terminate()
            except RuntimeError:  # that loop is closed
                pass
            return
        try:
            with anyio.fail_after(self.timeout):
                await pool.close()
        except BaseException:
            pool.terminate()
            raise

    async def _current_pool(self) -> Any:
        loop = _running_loop()
        if loop is None:
            raise StoreError("PostgresStore runs on asyncio only (asyncpg does not run on trio)")
        if self._pool is not None and self._loop is loop:
            return self._pool
        if not self._own:
            pool_loop = getattr(self._pool, "_loop", loop)
            if pool_loop is not loop:
                raise StoreError("the asyncpg pool given to PostgresStore belongs to another event loop; give "
                                 "PostgresStore a factory (lambda: asyncpg.create_pool(...)) to use it from several")
            await self._pool  # initialises a pool made with `asyncpg.create_pool(...)` but not awaited yet
            self._loop = loop
            return self._pool
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        async with lock:  # the first calls on a new loop wait for one pool rather than each making one
            if self._pool is not None and self._loop is loop:
                return self._pool
            old, self._pool = self._pool, None
            if old is not None:  # made on an event loop that has gone (or another one): drop its connections
                try:
                    old.terminate()
                except RuntimeError:  # its loop is closed
                    pass
            pool = await self._source()
            self._pool, self._loop = pool, loop
            return pool

    @asynccontextmanager
    async def _call(self) -> AsyncIterator[Any]:
        """A connection for one call, within the timeout; the driver's errors become StoreError. The first
        call makes sure the table exists; one call per cleanup interval first deletes a batch of expired rows."""
        try:
            with anyio.fail_after(self.timeout):
                pool = await self._current_pool()
                async with pool.acquire() as conn:
                    if not self._ready:
                        await self._create_table(conn)
                    if time.monotonic() >= self._next_cleanup:
                        await self._delete_expired(conn)
                    yield conn
        except TimeoutError as exc:
            raise StoreError(f"PostgreSQL did not answer within {self.timeout} s") from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise StoreError(f"PostgreSQL failed: {exc}") from exc

    async def _create_table(self, conn: Any) -> None:
        # Several hosts may start at once: CREATE ... IF NOT EXISTS can still collide, so they take turns.
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"buntsession:{self.table}")
            await conn.execute(self._ddl)
        self._ready = True

    async def _delete_expired(self, conn: Any) -> None:
        self._next_cleanup = time.monotonic() + self.cleanup_interval
        status = await conn.execute(self._cleanup, self.cleanup_batch)
        if int(status.split()[-1]) >= self.cleanup_batch:
            self._next_cleanup = 0.0  # more to do: the next call deletes another batch

    async def delete_expired(self) -> int:
        """Delete one batch (at most `cleanup_batch`) of expired rows now; return how many went."""
        async with self._call() as conn:
            status = await conn.execute(self._cleanup, self.cleanup_batch)
        return int(status.split()[-1])

    # -- the store calls -------------------------------------------------------------------------------------

    async def find(self, key: str) -> bytes | None:
        found = await self.find_with_expiry(key)
        return None if found is None else found[0]

    async def find_with_expiry(self, key: str) -> tuple[bytes, float] | None:
        """The session's record (format 2, made by `codec.encode_record`) and its expiry as unix time; None
        when there is no live row, or one this store cannot read (logged)."""
        async with self._call() as conn:
            row = await conn.fetchrow(self._find, key)
        if row is None:
            return None
        created, end, remember, data, expires, user, agent, active = row
        try:
            stored = json.loads(data)
            if type(stored) is not dict or not all(type(v) is str for v in stored.values()):
                raise ValueError("not an object of tagged values")
            values = {name: decode_value(text) for name, text in stored.items()}
        except ValueError:
            logger.warning("a stored session could not be decoded (tampered with?); starting a fresh one")
            return None
        return encode_record(Meta(created, end, remember, user, agent, active), values), expires

    async def commit(self, key: str, data: bytes, expires_at: float) -> None:
        """Store the record `data` under `key`, replacing whatever is there. ValueError for a record that is
        not one."""
        meta, values = decode_record(data)
        await self.merge(key, Update(values, meta, expires_at, create=True))

    async def delete(self, key: str) -> None:
        async with self._call() as conn:
            await conn.execute(self._delete_one, key)

    async def merge(self, key: str, update: Update) -> bool:
        """Apply `update` in one statement. A new session (`update.create`) is inserted, or replaces the row
        under its key; otherwise only a live row is changed, and False (nothing written) when there is none."""
        changed = {name: _tagged(value) for name, value in update.changed().items()}
        values = json.dumps(changed, separators=(",", ":"))
        meta = update.meta
        async with self._call() as conn:
            if update.create:
                await conn.execute(self._create, key, meta.created, meta.end, meta.remember, values,
                                   update.expires_at, meta.user, meta.agent, meta.active)
                return True
            removed = [name for name in update.removed if name not in changed]
            done = await conn.fetchval(self._merge, key, update.cleared, removed, values, update.expires_at,
                                       update.meta_changed, meta.created, meta.end, meta.remember, meta.user,
                                       meta.agent, meta.active)
        return bool(done)

    async def touch(self, key: str, expires_at: float) -> bool:
        """Move only the expiry (the idle deadline) of a live row; False when there is none."""
        async with self._call() as conn:
            done = await conn.fetchval(self._touch, key, expires_at)
        return bool(done)

    async def sync(self) -> None:
        """Nothing to do: PostgreSQL has made a change durable when it acknowledges it (with its default
        `synchronous_commit = on`)."""

    # -- the sessions of a user: the user_id column is the index ----------------------------------------------

    async def bind_user(self, user_id: str, key: str, end: float) -> None:
        """Nothing to do: the row carries its user."""

    async def unbind_user(self, user_id: str, keys: Sequence[str]) -> None:
        """Nothing to do: a deleted row takes its user with it."""

    async def _live(self, user_id: str) -> list[tuple[str, Meta, float]]:
        """One indexed SELECT: the user's live rows (a row past its end by our clock is not live either)."""
        check_user_id(user_id)
        async with self._call() as conn:
            rows = await conn.fetch(self._user_sessions, user_id)
        now = self._now()
        return [(key, Meta(created, end, remember, user_id, agent, active), expires)
                for key, created, end, remember, agent, active, expires in rows if end > now]

    async def _delete(self, keys: list[str]) -> int:
        async with self._call() as conn:
            status = await conn.execute(self._delete_keys, keys)
        return int(status.split()[-1])

    async def end_user_sessions(self, user_id: str, keep: str | None = None) -> int:
        """End every live session of `user_id` but the one stored under `keep`, in one DELETE; how many."""
        check_user_id(user_id)
        async with self._call() as conn:
            status = await conn.execute(self._end_user, user_id, keep)
        return int(status.split()[-1])

    def _now(self) -> float:
        return time.time()
