"""`Session`: the dict a request sees, with change tracking, typed helpers and its lifecycle.

Like Starlette's `Session`, a dict that records whether it was read (`accessed`) and changed (`modified`);
beyond it, it records which keys changed, so that a commit merges only those into the stored session.
Values are checked when they are assigned: one the codec cannot keep with its exact type raises at once.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from buntsession import codec
from buntsession.codec import Meta
from buntsession.errors import SessionTypeError

__all__ = ["Session", "Status", "new_token", "store_key"]

_T = TypeVar("_T")
_D = TypeVar("_D")
_MISSING: Any = object()


def new_token() -> str:
    """256 random bits from `secrets`, URL-safe: 43 characters of [A-Za-z0-9_-]."""
    return secrets.token_urlsafe(32)


def store_key(token: str) -> str:
    """The store key of a token: its SHA-256, so a copy of the store hands out no live session."""
    return hashlib.sha256(token.encode()).hexdigest()


class Status(enum.StrEnum):
    """What a request did to its session, as Go's scs reports it. Compares equal to its string value."""

    UNMODIFIED = "unmodified"
    MODIFIED = "modified"
    DESTROYED = "destroyed"


# -- the typed helpers' kinds: one generic mechanism serves the seven types ------------------------------------


@dataclass(frozen=True, slots=True)
class _Kind(Generic[_T]):
    name: str
    holds: Callable[[object], bool]
    """Whether a stored value is of this kind (exact types: a bool is not an int)."""
    accept: Callable[[Any], _T]
    """The value a put stores; TypeError for another type."""


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
        return float(value)
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


def _is_json_like(value: object) -> bool:
    try:
        codec.check_json_like(value)
    except (TypeError, ValueError):
        return False
    return True


def _accept_object(value: Any) -> Any:
    codec.check_json_like(value)
    return value


STRING = _Kind("str", _exactly(str), _only(str))
INT = _Kind("int", _exactly(int), _only(int))
FLOAT = _Kind("float", _exactly(float), _accept_float)
BOOL = _Kind("bool", _exactly(bool), _only(bool))
BYTES = _Kind("bytes", _exactly(bytes), _accept_bytes)
TIME = _Kind("datetime", _exactly(datetime), _accept_time)
OBJECT = _Kind("JSON-like object", _is_json_like, _accept_object)


class Session(dict[str, Any]):
    """The session of one request. Read it like a dict; every change is tracked and committed just before
    the response starts. A change after that raises RuntimeError, as does any change to the read-only
    session of a WebSocket connection."""

    accessed: bool = False
    modified: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._token: str | None = None
        self._meta: Meta | None = None  # None until the session is stored
        self._expires: float | None = None  # when the store will forget it (earlier of end and idle)
        self._remember: bool | None = None
        self._remember_changed = False
        self._loaded: dict[str, str] = {}  # encoded values as loaded, to find in-place changes
        self._put: dict[str, str | None] = {}  # keys set, encoded (None: a list or dict, encoded at commit)
        self._removed: set[str] = set()
        self._cleared = False
        self._renewed = False
        self._destroyed = False
        self._dead_tokens: list[str] = []  # stored sessions that destroy() or renew_token() ended
        self._frozen: str | None = None
        self._base: tuple[bytes, Meta, dict[str, str]] | None = None  # the record as loaded

    @classmethod
    def _from_store(cls, token: str, record: bytes, expires: float | None) -> Session:
        """A session loaded from its record. ValueError when the record or a value cannot be decoded."""
        meta, encoded = codec.decode_record(record)
        session = cls({key: codec.decode_value(text) for key, text in encoded.items()})
        session._token, session._meta = token, meta
        session._expires = expires if expires is not None else meta.end
        session._remember, session._loaded = meta.remember, encoded
        session._base = (record, meta, encoded)
        return session

    # -- change tracking (Starlette's names) ----------------------------------------------------------------

    def mark_accessed(self) -> None:
        self.accessed = True

    def mark_modified(self) -> None:
        self._check_mutable()
        self.accessed = True
        self.modified = True

    def _check_mutable(self) -> None:
        if self._frozen is not None:
            raise RuntimeError(self._frozen)

    def _freeze(self, reason: str) -> None:
        self._frozen = reason

    def _set(self, key: str, value: Any) -> None:
        if type(key) is not str:
            raise TypeError(f"session keys are str, not {type(key).__name__}")
        encoded = codec.encode_value(value)  # raises now, not at commit, for a value that cannot be kept
        self.mark_modified()
        super().__setitem__(key, value)
        self._put[key] = None if type(value) in (list, dict) else encoded  # those may change in place
        self._removed.discard(key)

    def _forget(self, key: str) -> None:
        self._put.pop(key, None)
        self._removed.add(key)

    # -- dict interface ------------------------------------------------------------------------------------

    def __setitem__(self, key: str, value: Any) -> None:
        self._set(key, value)

    def __delitem__(self, key: str) -> None:
        self.mark_modified()
        super().__delitem__(key)
        self._forget(key)

    def __getitem__(self, key: str) -> Any:
        self.accessed = True
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.accessed = True
        return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        self.accessed = True
        return super().__iter__()

    def __len__(self) -> int:
        self.accessed = True
        return super().__len__()

    def get(self, key: str, default: Any = None) -> Any:
        self.accessed = True
        return super().get(key, default)

    def keys(self) -> Any:
        self.accessed = True
        return super().keys()

    def values(self) -> Any:
        self.accessed = True
        return super().values()

    def items(self) -> Any:
        self.accessed = True
        return super().items()

    def clear(self) -> None:
        self.mark_modified()
        super().clear()
        self._cleared = True
        self._put.clear()
        self._removed.clear()
        self._loaded = {}

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        self.accessed = True
        if not super().__contains__(key):
            if default is _MISSING:
                raise KeyError(key)
            return default
        self.mark_modified()
        value = super().pop(key)
        self._forget(key)
        return value

    def popitem(self) -> tuple[str, Any]:
        self._check_mutable()
        key, value = super().popitem()
        self.mark_modified()
        self._forget(key)
        return key, value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if not super().__contains__(key):
            self._set(key, default)
        self.accessed = True
        return super().__getitem__(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        items = dict(*args, **kwargs)
        for key, value in items.items():  # all or nothing: check every item before changing any
            if type(key) is not str:
                raise TypeError(f"session keys are str, not {type(key).__name__}")
            codec.encode_value(value)
        for key, value in items.items():
            self._set(key, value)
        if not items:
            self.mark_modified()

    def __ior__(self, other: Any) -> Session:  # type: ignore[override,misc]
        self.update(other)
        return self

    # -- typed helpers --------------------------------------------------------------------------------------

    def _put_kind(self, kind: _Kind[_T], key: str, value: Any) -> None:
        self[key] = kind.accept(value)

    def _get_kind(self, kind: _Kind[_T], key: str, default: _D) -> _T | _D:
        self.accessed = True
        if not super().__contains__(key):
            return default
        value = super().__getitem__(key)
        if not kind.holds(value):
            raise SessionTypeError(f"session key {key!r} holds a {type(value).__name__}, not a {kind.name}")
        return value  # type: ignore[no-any-return]

    def _pop_kind(self, kind: _Kind[_T], key: str, default: _D) -> _T | _D:
        value = self._get_kind(kind, key, default)
        if super().__contains__(key):
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
        """Give the session a new token now, keeping its data; the old token is dead once the response
        starts. The absolute lifetime starts again. Call it at login and at any change of privilege."""
        self.mark_modified()
        if self._meta is not None and self._token is not None:
            self._dead_tokens.append(self._token)
        self._token = new_token()
        self._meta = self._expires = None
        self._renewed = True

    def destroy(self) -> None:
        """End the session: its record is deleted (even if the request then fails) and its cookie expired.
        Puts after it start a new session with a new token."""
        self.mark_modified()
        if self._meta is not None and self._token is not None:
            self._dead_tokens.append(self._token)
        super().clear()
        self._token = self._meta = self._expires = None
        self._remember, self._remember_changed = None, False
        self._loaded, self._put, self._removed = {}, {}, set()
        self._cleared = self._renewed = False
        self._destroyed = True

    # -- what a commit needs --------------------------------------------------------------------------------

    def _changes(self) -> tuple[dict[str, str], frozenset[str]]:
        """The keys to write (encoded) and the keys to remove. A list or dict value changed in place since
        it was loaded counts as written: such changes are found by encoding it again."""
        get = super().__getitem__
        put = {key: text if text is not None else codec.encode_value(get(key)) for key, text in self._put.items()}
        for key, text in self._loaded.items():
            if key not in put and super().__contains__(key) and type(get(key)) in (list, dict):
                now = codec.encode_value(get(key))
                if now != text:
                    put[key] = now
        return put, frozenset(self._removed)

    def _encoded(self) -> dict[str, str]:
        """Every key, encoded: the whole session, for a new record."""
        return {key: codec.encode_value(value) for key, value in super().items()}
