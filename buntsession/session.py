"""`Session`: the dict a request sees, with change tracking, typed helpers and its lifecycle.

Like Starlette's `Session`, a dict that records whether it was read (`accessed`) and changed (`modified`);
beyond it, it records which keys were assigned or removed, and which list or dict values it handed out
(those may be changed in place, so a commit compares them with what was loaded). Values are checked when
they are assigned: one the codec cannot keep with its exact type raises at once.

The middleware's lifecycle (`buntsession.lifecycle`) reads a session through three calls, and only these:
`Session.restore` builds one from its record, `pending()` hands over what a commit must do, and
`stored()` tells it the token and times it was stored under.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import marshal
import secrets
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from buntsession.codec import Meta, UnkeepableValue, check_key, check_value
from buntsession.errors import SessionTypeError
from buntsession.users import SessionInfo, check_user_id, session_id

if TYPE_CHECKING:
    from buntsession.users import UserSessions

__all__ = ["Pending", "Session", "Status", "fingerprint", "new_token", "store_key", "thaw"]

_T = TypeVar("_T")
_D = TypeVar("_D")
_MISSING: Any = object()


def new_token() -> str:
    """256 random bits from `secrets`, URL-safe: 43 characters of [A-Za-z0-9_-]."""
    return secrets.token_urlsafe(32)


@functools.lru_cache(maxsize=4096)  # the tokens of the requests coming in are the same, again and again
def store_key(token: str) -> str:
    """The store key of a token: its SHA-256, so a copy of the store hands out no live session."""
    return hashlib.sha256(token.encode()).hexdigest()


def fingerprint(value: Any) -> bytes | None:
    """Bytes that change whenever a JSON-like `value` changes, its types included (1, 1.0 and True differ):
    marshal's format 2, which has no back-references, so equal values give equal bytes. Kept in memory only,
    never stored or read from outside. None for a value marshal cannot take (it is not JSON-like)."""
    try:
        return marshal.dumps(value, 2)
    except ValueError:
        return None


def thaw(blob: bytes) -> Any:
    """A new copy of the value whose `fingerprint` is `blob`."""
    return marshal.loads(blob)


class Status(enum.StrEnum):
    """What a request did to its session, as Go's scs reports it. Compares equal to its string value."""

    UNMODIFIED = "unmodified"
    MODIFIED = "modified"
    DESTROYED = "destroyed"


class Pending(NamedTuple):
    """What a commit must do for one session: the session's one hand-over to the lifecycle."""

    token: str | None
    """The token the session goes out with (None: a new session that has none yet)."""
    meta: Meta | None
    """The stored session's metadata; None when it is not stored under `token` (new, renewed, destroyed)."""
    base: bytes | None
    """The record as loaded (None for a session not loaded, or destroyed); kept through renew_token()."""
    base_meta: Meta | None
    """The metadata as loaded, with `base`."""
    data: dict[str, Any]
    """Every key and value now, as a plain dict."""
    put: Set[str]
    """Keys assigned, and keys whose list or dict value was changed in place."""
    removed: Set[str]
    cleared: bool
    remember: bool | None
    remember_changed: bool
    destroyed: bool
    dead_tokens: tuple[str, ...]
    """Tokens of stored sessions that destroy() or renew_token() ended."""
    dead_user: str | None
    """The user the session of `dead_tokens` was bound to."""
    user: str | None
    """The user a new (or renewed) session is bound to; a stored one keeps it in `meta`."""
    agent: str | None
    """The User-Agent a renewed session keeps (login() takes the request's own)."""
    login: bool
    """Whether login() was called: the request's User-Agent goes into the new session."""
    key: str | None
    """The store key of `token`, when the session is stored under it."""
    blobs: dict[str, bytes]
    """The `fingerprint` of list and dict values in `data`, for the keys whose fingerprint is known (taken
    at this commit or at load); a key missing here has no known fingerprint, never a stale one."""


# -- the typed helpers' kinds: one generic mechanism serves the seven types ------------------------------------


@dataclass(frozen=True, slots=True)
class _Kind(Generic[_T]):
    name: str
    holds: Callable[[object], bool]
    """Whether a stored value is of this kind (exact types: a bool is not an int)."""
    accept: Callable[[Any], _T]
    """The value a put stores; TypeError for another type. The session then checks it can be kept."""


def _exactly(cls: type) -> Callable[[object], bool]:
    return lambda value: type(value) is cls


def _only(cls: type[_T]) -> Callable[[Any], _T]:
    def accept(value: Any) -> _T:
        if type(value) is not cls:
            raise TypeError(f"expected {cls.__name__}, got {type(value).__name__}")
        return value

    return accept


def _accept_float(value: Any) -> float:
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            raise UnkeepableValue(f"the int {value.bit_length()} bits long is too large for a float") from None
    return _only(float)(value)


def _accept_bytes(value: Any) -> bytes:
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return _only(bytes)(value)


def _accept_time(value: Any) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"expected datetime, got {type(value).__name__}")
    # A subclass (pendulum, say) is kept as the plain datetime it equals.
    return value if type(value) is datetime else datetime.fromisoformat(value.isoformat())


_STANDALONE = (bytes, datetime)


def _holds_object(value: object) -> bool:
    # Every value in a session was checked when assigned or decoded: all but these two are JSON-like.
    return type(value) not in _STANDALONE


def _accept_object(value: Any) -> Any:
    if type(value) in _STANDALONE:
        raise TypeError(f"expected a JSON-like object, got {type(value).__name__}")
    return value


STRING = _Kind("str", _exactly(str), _only(str))
INT = _Kind("int", _exactly(int), _only(int))
FLOAT = _Kind("float", _exactly(float), _accept_float)
BOOL = _Kind("bool", _exactly(bool), _only(bool))
BYTES = _Kind("bytes", _exactly(bytes), _accept_bytes)
TIME = _Kind("datetime", _exactly(datetime), _accept_time)
OBJECT = _Kind("JSON-like object", _holds_object, _accept_object)


class Session(dict[str, Any]):
    """The session of one request. Read it like a dict; every change is tracked and committed just before
    the response starts. A change after that raises RuntimeError, as does any change to the read-only
    session of a WebSocket connection."""

    # Defaults on the class: a request that only reads its session sets none of them.
    accessed: bool = False
    modified: bool = False
    _token: str | None = None
    _meta: Meta | None = None  # None until the session is stored (and again after renew or destroy)
    _base: bytes | None = None  # the record as loaded (kept through renew_token, for its merge)
    _base_meta: Meta | None = None
    _key: str | None = None  # the store key of the token it was loaded with
    _assigned: dict[str, bytes | None] | None = None  # fingerprints of lists and dicts when assigned
    _expires: float | None = None  # when the store will forget it (the earlier of its end and idle deadline)
    _remember: bool | None = None
    _remember_changed: bool = False
    _put: set[str] | None = None
    _removed: set[str] | None = None
    _touched: set[str] | None = None  # keys whose list or dict value was handed out
    _touched_all: bool = False
    _pristine: Mapping[str, bytes] | None = None  # fingerprints of the lists and dicts as loaded
    _cleared: bool = False
    _destroyed: bool = False
    _dead_tokens: tuple[str, ...] = ()
    _frozen: str | None = None
    # The user binding while the session is not stored (after login, renew_token or destroy); a stored
    # session keeps it in its metadata.
    _user: str | None = None
    _agent: str | None = None
    _login: bool = False
    _dead_user: str | None = None
    _users: UserSessions | None = None  # the store's user calls, given by the lifecycle when it has them

    # -- what the lifecycle uses -----------------------------------------------------------------------------

    @classmethod
    def restore(cls, token: str, key: str, record: bytes, meta: Meta, values: dict[str, Any], expires: float,
                pristine: Mapping[str, bytes]) -> Session:
        """The session stored under `token` (at the store key `key`): `values` and `meta` decoded from
        `record`; `pristine` holds the `fingerprint` of each list or dict value, to tell at commit which
        were changed in place."""
        session = cls(values)
        session._token, session._key, session._meta = token, key, meta
        session._base, session._base_meta = record, meta
        session._expires, session._remember, session._pristine = expires, meta.remember, pristine
        return session

    def pending(self, always: bool = False) -> Pending | None:
        """What a commit must do; None, unless `always`, when the request changed nothing (lists and dicts
        it was handed are compared with what was loaded).

        Raises UnkeepableValue (a TypeError) when a list or dict was changed in place, after it was loaded
        or assigned, to hold what a session cannot keep: a tuple, a set, a datetime inside it, itself."""
        handed_out = self._touched is not None or self._touched_all
        if not (always or self.modified or handed_out):
            return None
        changed = self._changed_in_place() if handed_out else _NOTHING
        if not (always or self.modified or changed):
            return None  # only read: every list and dict handed out is as loaded
        data = dict(dict.items(self))  # not dict.copy: on a subclass it reads through __getitem__
        put = set(self._put) if self._put else set()
        pristine = self._pristine or {}
        blobs = {} if self._cleared or not pristine else \
            {key: blob for key, blob in pristine.items() if key not in put} if put else dict(pristine)
        if self._assigned:
            for key, blob in self._assigned.items():
                if key in put and key in data:
                    now = fingerprint(data[key])
                    if blob is None or now != blob:
                        check_value(data[key])  # assigned, then changed in place
                    if now is not None:
                        blobs[key] = now
        for key, now in changed.items():
            check_value(data[key])
            put.add(key)
            if now is not None:
                blobs[key] = now
            else:
                blobs.pop(key, None)
        removed: Set[str] = self._removed or frozenset()
        if not (always or put or removed or self._cleared or self._remember_changed or self._dead_tokens
                or self._login):
            return None
        return Pending(self._token, self._meta, self._base, self._base_meta, data, put, removed, self._cleared,
                       self._remember, self._remember_changed, self._destroyed, self._dead_tokens, self._dead_user,
                       self._user, self._agent, self._login, self._key, blobs)

    def _changed_in_place(self) -> Mapping[str, bytes | None]:
        """The keys whose list or dict value was handed out and now differs from what was loaded (assigned
        keys aside: `pending` checks those), with the value's `fingerprint` now."""
        assigned = self._put or ()
        pristine = self._pristine or {}
        keys = [key for key, value in dict.items(self) if type(value) in _MUTABLE] if self._touched_all \
            else self._touched or ()
        changed: dict[str, bytes | None] = {}
        for key in keys:
            if key not in assigned and dict.__contains__(self, key):
                now = fingerprint(dict.__getitem__(self, key))
                if now != pristine.get(key):
                    changed[key] = now
        return changed

    def stored(self, token: str, key: str, meta: Meta, expires: float) -> None:
        """Record that the commit stored the session under `token`, at the store key `key`."""
        self._token, self._key, self._meta, self._expires = token, key, meta, expires

    def freeze(self, reason: str) -> None:
        """Refuse every change from now on, with RuntimeError(reason)."""
        self._frozen = reason

    # -- change tracking (Starlette's names) ----------------------------------------------------------------

    def mark_accessed(self) -> None:
        self.accessed = True

    def mark_modified(self) -> None:
        if self._frozen is not None:
            raise RuntimeError(self._frozen)
        self.accessed = True
        self.modified = True

    def _assign(self, key: str, value: Any) -> None:
        check_key(key)
        check_value(value)  # raises now, not at commit, for a value that cannot be kept
        self.mark_modified()
        dict.__setitem__(self, key, value)
        if self._put is None:
            self._put = {key}
        else:
            self._put.add(key)
        if type(value) in _MUTABLE:  # it may be changed in place before the commit: checked again then
            if self._assigned is None:
                self._assigned = {}
            self._assigned[key] = fingerprint(value)
        if self._removed is not None:
            self._removed.discard(key)

    def _forget(self, key: str) -> None:
        if self._put is not None:
            self._put.discard(key)
        if self._removed is None:
            self._removed = set()
        self._removed.add(key)

    def _handed_out(self, key: str, value: Any) -> Any:
        """Note that `value`, about to be handed to the app, may be changed in place."""
        if type(value) in _MUTABLE:
            if self._touched is None:
                self._touched = set()
            self._touched.add(key)
        return value

    # -- dict interface ------------------------------------------------------------------------------------

    def __setitem__(self, key: str, value: Any) -> None:
        self._assign(key, value)

    def __delitem__(self, key: str) -> None:
        self.mark_modified()
        dict.__delitem__(self, key)
        self._forget(key)

    def __getitem__(self, key: str) -> Any:
        self.accessed = True
        value = dict.__getitem__(self, key)
        if type(value) in _MUTABLE:
            self._handed_out(key, value)
        return value

    def __contains__(self, key: object) -> bool:
        self.accessed = True
        return dict.__contains__(self, key)

    def __iter__(self) -> Iterator[str]:
        # Overridden (not only for `accessed`): with it, dict(session) and {**session} read the values
        # through __getitem__, so the values they hand out are tracked.
        self.accessed = True
        return dict.__iter__(self)

    def __len__(self) -> int:
        self.accessed = True
        return dict.__len__(self)

    def get(self, key: str, default: Any = None) -> Any:
        self.accessed = True
        value = dict.get(self, key, _MISSING)
        if value is _MISSING:
            return default
        if type(value) in _MUTABLE:
            self._handed_out(key, value)
        return value

    def keys(self) -> Any:
        self.accessed = True
        return dict.keys(self)

    def values(self) -> Any:
        self.accessed = True
        self._touched_all = True
        return dict.values(self)

    def items(self) -> Any:
        self.accessed = True
        self._touched_all = True
        return dict.items(self)

    def copy(self) -> dict[str, Any]:
        """A plain dict of the same keys and values (a shallow copy, as dict.copy gives)."""
        self.accessed = True
        self._touched_all = True
        return dict(dict.items(self))

    def __or__(self, other: Any) -> dict[str, Any]:  # type: ignore[override]
        self.accessed = True
        self._touched_all = True
        return dict.__or__(self, other)

    def __ror__(self, other: Any) -> dict[str, Any]:  # type: ignore[override]
        self.accessed = True
        self._touched_all = True
        return dict.__ror__(self, other)

    def clear(self) -> None:
        self.mark_modified()
        dict.clear(self)
        self._cleared = True
        self._put = self._removed = self._touched = self._assigned = None
        self._touched_all = False

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        self.accessed = True
        if not dict.__contains__(self, key):
            if default is _MISSING:
                raise KeyError(key)
            return default
        self.mark_modified()
        value = dict.pop(self, key)
        self._forget(key)
        return value

    def popitem(self) -> tuple[str, Any]:
        if self._frozen is not None:
            raise RuntimeError(self._frozen)
        key, value = dict.popitem(self)
        self.mark_modified()
        self._forget(key)
        return key, value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if not dict.__contains__(self, key):
            self._assign(key, default)
        self.accessed = True
        return self._handed_out(key, dict.__getitem__(self, key))

    def update(self, *args: Any, **kwargs: Any) -> None:
        items = dict(*args, **kwargs)
        for key, value in items.items():  # all or nothing: check every item before changing any
            check_key(key)
            check_value(value)
        for key, value in items.items():
            self._assign(key, value)
        if not items:
            self.mark_modified()

    def __ior__(self, other: Any) -> Session:  # type: ignore[override]
        self.update(other)
        return self

    # -- typed helpers --------------------------------------------------------------------------------------

    def _put_kind(self, kind: _Kind[_T], key: str, value: Any) -> None:
        self._assign(key, kind.accept(value))

    def _get_kind(self, kind: _Kind[_T], key: str, default: _D) -> _T | _D:
        self.accessed = True
        value = dict.get(self, key, _MISSING)
        if value is _MISSING:
            return default
        if not kind.holds(value):
            raise SessionTypeError(f"session key {key!r} holds a {type(value).__name__}, not a {kind.name}")
        if type(value) in _MUTABLE:
            self._handed_out(key, value)
        return value  # type: ignore[no-any-return]

    def _pop_kind(self, kind: _Kind[_T], key: str, default: _D) -> _T | _D:
        value = self._get_kind(kind, key, default)
        if dict.__contains__(self, key):
            del self[key]
        return value

    def put_string(self, key: str, value: str) -> None:
        self._put_kind(STRING, key, value)

    def get_string(self, key: str, default: str = "") -> str:
        return self._get_kind(STRING, key, default)

    def pop_string(self, key: str, default: str = "") -> str:
        return self._pop_kind(STRING, key, default)

    def put_int(self, key: str, value: int) -> None:
        self._put_kind(INT, key, value)

    def get_int(self, key: str, default: int = 0) -> int:
        return self._get_kind(INT, key, default)

    def pop_int(self, key: str, default: int = 0) -> int:
        return self._pop_kind(INT, key, default)

    def put_float(self, key: str, value: float) -> None:
        self._put_kind(FLOAT, key, value)

    def get_float(self, key: str, default: float = 0.0) -> float:
        return self._get_kind(FLOAT, key, default)

    def pop_float(self, key: str, default: float = 0.0) -> float:
        return self._pop_kind(FLOAT, key, default)

    def put_bool(self, key: str, value: bool) -> None:
        self._put_kind(BOOL, key, value)

    def get_bool(self, key: str, default: bool = False) -> bool:
        return self._get_kind(BOOL, key, default)

    def pop_bool(self, key: str, default: bool = False) -> bool:
        return self._pop_kind(BOOL, key, default)

    def put_bytes(self, key: str, value: bytes) -> None:
        self._put_kind(BYTES, key, value)

    def get_bytes(self, key: str, default: bytes = b"") -> bytes:
        return self._get_kind(BYTES, key, default)

    def pop_bytes(self, key: str, default: bytes = b"") -> bytes:
        return self._pop_kind(BYTES, key, default)

    def put_time(self, key: str, value: datetime) -> None:
        self._put_kind(TIME, key, value)

    def get_time(self, key: str, default: datetime | None = None) -> datetime | None:
        return self._get_kind(TIME, key, default)

    def pop_time(self, key: str, default: datetime | None = None) -> datetime | None:
        return self._pop_kind(TIME, key, default)

    def put_object(self, key: str, value: Any) -> None:
        self._put_kind(OBJECT, key, value)

    def get_object(self, key: str, default: Any = None) -> Any:
        return self._get_kind(OBJECT, key, default)

    def pop_object(self, key: str, default: Any = None) -> Any:
        return self._pop_kind(OBJECT, key, default)

    # -- scs's vocabulary -----------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return key in self

    def remove(self, key: str) -> None:
        """Remove `key`; nothing happens (and nothing is marked changed) when it is absent."""
        self.pop(key, None)

    @property
    def token(self) -> str | None:
        """The token the cookie carries: None until the session has one (it gets one when first stored,
        or at renew_token())."""
        return self._token

    @property
    def created_at(self) -> datetime | None:
        """When the session was created (restarted by renew_token); None for a session not yet stored."""
        return None if self._meta is None else datetime.fromtimestamp(self._meta.created, UTC)

    @property
    def expires_at(self) -> datetime | None:
        """When the session ends unless renewed: the earlier of its absolute end and its idle deadline.
        None for a session not yet stored."""
        return None if self._expires is None else datetime.fromtimestamp(self._expires, UTC)

    @property
    def status(self) -> Status:
        if self._destroyed and not self._put:
            return Status.DESTROYED
        return Status.MODIFIED if self.modified else Status.UNMODIFIED

    def remember_me(self, remember: bool = True) -> None:
        """True: a persistent cookie, kept until the session's end. False: a browser-session cookie, gone
        when the browser closes (the server keeps the session until its end all the same)."""
        self.mark_modified()
        self._remember = bool(remember)
        self._remember_changed = True

    def renew_token(self) -> None:
        """Give the session a new token now, keeping its data and its user (see `login`); the old token is
        dead once the response starts. The absolute lifetime starts again. Call it at any change of
        privilege (`login` calls it)."""
        self.mark_modified()
        if self._meta is not None:
            self._user, self._agent = self._meta.user, self._meta.agent
            if self._token is not None:
                self._dead_tokens += (self._token,)
                self._dead_user = self._meta.user
        self._token = new_token()
        self._meta = self._expires = self._key = None

    def destroy(self) -> None:
        """End the session: its record is deleted (even if the request then fails) and its cookie expired.
        Puts after it start a new session with a new token."""
        self.mark_modified()
        if self._meta is not None and self._token is not None:
            self._dead_tokens += (self._token,)
            self._dead_user = self._meta.user
        self._user = self._agent = None
        self._login = False
        dict.clear(self)
        self._token = self._meta = self._expires = self._base = self._base_meta = self._key = None
        self._remember, self._remember_changed = None, False
        self._put = self._removed = self._touched = self._assigned = None
        self._cleared = self._touched_all = False
        self._destroyed = True

    # -- the sessions of a user -----------------------------------------------------------------------------

    def login(self, user_id: str) -> None:
        """Bind the session to `user_id` at sign-in: a new token now, as `renew_token()` gives (a token
        planted before the login is worth nothing), and the session is listed among the user's sessions
        once stored, with the User-Agent of this request. The binding survives `renew_token()` and
        restarts; `destroy()` ends it; logging in as another user moves it. TypeError when `user_id` is not
        a non-empty str of valid Unicode."""
        check_user_id(user_id)
        self.renew_token()
        self._user, self._agent, self._login = user_id, None, True

    @property
    def user_id(self) -> str | None:
        """The user the session is bound to (`login`), or None for an anonymous session."""
        return self._meta.user if self._meta is not None else self._user

    def _current_key(self) -> str | None:
        """The store key of this session when it is stored under its token."""
        if self._meta is None or self._token is None:
            return None
        return self._key if self._key is not None else store_key(self._token)

    def _directory(self) -> UserSessions:
        if self._users is None:
            raise NotImplementedError("listing and ending a user's sessions needs a store that keeps a user index "
                                      "(BuntStore, MemoryStore, RedisStore, or a subclass of "
                                      "buntsession.users.UserSessions)")
        return self._users

    async def user_sessions(self) -> list[SessionInfo]:
        """The live sessions bound to this session's user, most recently active first, this one marked
        `current`; [] for an anonymous session. A session logged in by this very request is listed from
        the next request on (it is stored when the response starts). Raises StoreError when the store
        fails, NotImplementedError on a store without a user index."""
        user = self.user_id
        if user is None:
            return []
        return await self._directory().user_sessions(user, self._current_key())

    async def end_user_session(self, id: str) -> bool:
        """End the session of the same user whose `SessionInfo.id` is `id`, durably; True if it was live.
        False for an anonymous session, an unknown id, or another user's session. This session's own id
        destroys it (`destroy()`: its cookie is expired too)."""
        user = self.user_id
        if user is None or type(id) is not str:
            return False
        current = self._current_key()
        if current is not None and session_id(current) == id:
            self.destroy()
            return True
        return await self._directory().end_user_session(user, id)

    async def end_user_sessions(self, keep_current: bool = True) -> int:
        """End every session of this session's user but this one ("log out everywhere else"), or with
        `keep_current=False` every one including this (which is then destroyed as by `destroy()`).
        Returns how many stored sessions it ended; 0 for an anonymous session. Ending is durable, as
        `destroy()` is."""
        user = self.user_id
        if user is None:
            return 0
        current = self._current_key()
        ended = await self._directory().end_user_sessions(user, current if keep_current else None)
        if not keep_current:
            self.destroy()
        return ended


_MUTABLE = (list, dict)
_NOTHING: Mapping[str, bytes | None] = {}
