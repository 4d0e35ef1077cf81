"""How sessions are kept in a store: exact types, JSON text, no pickle. Pure functions.

A value a session may hold is JSON-like (dict with str keys, list, str, int, finite float, bool, None), or,
standing on its own under a key, `bytes` or a `datetime`. `check_value` is the one judge of that; the
session calls it when a value is assigned, so nothing reaches a commit that cannot be kept.

A stored session is one record, a JSON object (format 2), its members in this order::

    {"v": 2, "c": created, "e": end, "r": remember, "d": {key: value, ...}, "t": {key: "b" | "t", ...}}

created and end are unix times (the end is the absolute end of the session's life), remember is the
remember-me choice (true, false, or null for the middleware's default). A session bound to a user
(`Session.login`) has three more members between "r" and "d": ``"u": user id, "a": user agent or null,
"l": last active`` (unix time); records without them are anonymous sessions, as every record written
before them was. The values in "d" are plain JSON, so one `json.loads` gives the session back; "t",
present only when needed, names the keys whose value is
`bytes` (kept as base64) or a `datetime` (kept as ISO 8601, an aware one with its UTC offset). Records of
format 1 (each value a tagged string, below) are still read. The members before "d" depend on the
metadata alone, so a commit that keeps the metadata reuses them from the loaded record.

A value on its own, where a store keeps each key apart (Redis hash fields), is a tagged string::

    "s" + text    str           "b" + base64     bytes
    "j" + JSON    the rest      "t" + ISO 8601   datetime
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["MAX_RECORD_SIZE", "Meta", "UnkeepableValue", "check_value", "decode_meta", "decode_record",
           "decode_value", "encode_record", "encode_value"]

RECORD_VERSION = 2
MAX_RECORD_SIZE = 64 * 1024 * 1024
"""The largest session record a store is asked to keep (the embedded engine's cap on one value)."""
_MAX_DEPTH = 64


class UnkeepableValue(TypeError, ValueError):
    """A value the codec cannot keep with its exact type and value: a tuple, a set, a NaN, a str with a
    lone surrogate, a datetime whose UTC offset has sub-second parts, one too large to store. Both a
    TypeError (the contract's error for such a value) and a ValueError (a value of a kept type whose value
    cannot be kept), so either `except` catches it."""



def check_value(value: object) -> None:
    """Raise UnkeepableValue unless a session can keep `value` under a key and give it back exactly."""
    kind = type(value)
    if kind is str:
        _check_text(value)  # type: ignore[arg-type]
        if len(value) > MAX_RECORD_SIZE:  # type: ignore[arg-type]
            raise UnkeepableValue(f"a str of {len(value)} characters is over the session size limit")  # type: ignore[arg-type]
    elif kind is list or kind is dict:
        check_json_like(value)
    elif kind is bytes:
        if (len(value) + 2) // 3 * 4 > MAX_RECORD_SIZE:  # type: ignore[arg-type]
            raise UnkeepableValue(f"{len(value)} bytes are over the session size limit")  # type: ignore[arg-type]
    elif kind is datetime:
        offset = value.utcoffset()  # type: ignore[attr-defined]
        if offset is not None and offset.microseconds:
            raise UnkeepableValue(f"a datetime whose UTC offset has sub-second parts ({offset}) cannot be kept")
    else:
        _check_scalar(value, 0)


def check_json_like(value: object, depth: int = 0) -> None:
    """Raise UnkeepableValue unless `value` is JSON-like: dict with str keys, list, str, int, finite float,
    bool, None; strings valid Unicode (no lone surrogates)."""
    kind = type(value)
    if kind is list:
        items: Any = value
    elif kind is dict:
        for key in value:  # type: ignore[attr-defined]
            if type(key) is not str:
                raise UnkeepableValue(f"dict keys in a session value must be str, not {type(key).__name__}")
            if not key.isascii():
                _check_text(key)
        items = value.values()  # type: ignore[attr-defined]
    else:
        _check_scalar(value, depth)
        return
    if depth >= _MAX_DEPTH:
        raise UnkeepableValue(f"a session value may nest {_MAX_DEPTH} levels deep at most")
    # The common leaves are checked here, inline: a call per leaf would double the cost of a check,
    # which runs on every assignment of a list or dict.
    for item in items:
        kind = type(item)
        if kind is str:
            if not item.isascii():
                _check_text(item)
        elif kind is int:
            if item.bit_length() > _CHECKED_INT_BITS:
                _check_digits(item)
        elif kind is list or kind is dict:
            check_json_like(item, depth + 1)
        elif not (kind is bool or item is None or (kind is float and item - item == 0.0)):
            _check_scalar(item, depth + 1)  # raises: a non-finite float, or no JSON type at all


def _check_scalar(value: object, depth: int) -> None:
    """Raise UnkeepableValue unless `value` is a JSON scalar a session can keep."""
    kind = type(value)
    if kind is str:
        _check_text(value)  # type: ignore[arg-type]
    elif kind is int:
        if value.bit_length() > _CHECKED_INT_BITS:  # type: ignore[attr-defined]
            _check_digits(value)  # type: ignore[arg-type]
    elif kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise UnkeepableValue(f"a session cannot keep the float {value!r}")
    elif not (kind is bool or value is None):
        where = "" if depth == 0 else " inside a list or dict (bytes and datetime may only stand on their own)"
        raise UnkeepableValue(f"a session cannot keep a {kind.__name__} with its exact type{where}")


_CHECKED_INT_BITS = 2_000
"""Below this many bits an int has fewer digits (603) than the lowest limit Python allows on int-to-text
conversion (640, sys.set_int_max_str_digits)."""


def _check_digits(number: int) -> None:
    try:
        str(number)
    except ValueError:  # over sys.get_int_max_str_digits(): JSON could not write it, nor read it back
        raise UnkeepableValue(f"an int of {number.bit_length()} bits has too many digits to keep") from None


def check_key(key: object) -> None:
    """Raise TypeError unless `key` can name a session value: a str of valid Unicode."""
    if type(key) is not str:
        raise TypeError(f"session keys are str, not {type(key).__name__}")
    _check_text(key)


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise UnkeepableValue(f"a session cannot keep a str with a lone surrogate: {text[:40]!r}") from None


# Built once: json.dumps and json.loads with options build a new encoder or decoder on every call.
# ensure_ascii: a record is ASCII whatever it holds, so turning it into bytes can never fail.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_encode_json = _ENCODER.encode


class _Standalone(TypeError):
    """A bytes or datetime value met while encoding: the record needs its type tags. A TypeError, since
    met again on the tagged attempt it is one inside a list or dict, which no record can keep."""


def _refuse(value: object) -> object:
    if type(value) is bytes or type(value) is datetime:
        raise _Standalone
    raise TypeError(f"a session cannot keep a {type(value).__name__} with its exact type")


# The C encoder itself, called without JSONEncoder.encode's per-call set-up; the same output.
_c_encoder = getattr(json.encoder, "c_make_encoder", None)
if _c_encoder is not None:
    _encode_fast = _c_encoder(None, _refuse, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, False)

    def _encode_data(data: dict[str, Any]) -> str:
        return "".join(_encode_fast(data, 0))
else:  # pragma: no cover  (an interpreter without json's C accelerator)
    _encode_data = json.JSONEncoder(  # type: ignore[assignment]
        separators=(",", ":"), allow_nan=False, default=_refuse).encode


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("non-finite float")
    return number


def _no_constant(text: str) -> None:
    raise ValueError(f"{text} is not allowed")


_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)
_decode_json = _DECODER.decode
_scan: Any = _DECODER.scan_once  # type: ignore[attr-defined]  # the C scanner, without JSONDecoder.decode's whitespace handling around it


def _decode_whole(text: str) -> Any:
    """One JSON value that is the whole of `text`. ValueError otherwise."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        end = -1
    if end != len(text):
        return _decode_json(text)  # whitespace around it, or trailing data: let the full decoder judge
    return value


# -- one value on its own: a tagged string ---------------------------------------------------------------------


def encode_value(value: object) -> str:
    """The tagged string of a value `check_value` accepts. TypeError for anything else."""
    kind = type(value)
    if kind is str:
        return "s" + value  # type: ignore[operator]
    if kind is bytes:
        return "b" + base64.b64encode(value).decode("ascii")  # type: ignore[arg-type]
    if kind is datetime:
        return "t" + str(value.isoformat())  # type: ignore[attr-defined]
    check_json_like(value)
    return "j" + _encode_data(value)  # type: ignore[arg-type]


def decode_value(text: str) -> Any:
    """Decode what encode_value made. ValueError for anything else."""
    tag, body = text[:1], text[1:]
    if tag == "s":
        return body
    if tag == "j":
        return _decode_whole(body)
    if tag == "b":
        return _from_base64(body)
    if tag == "t":
        return datetime.fromisoformat(body)
    raise ValueError(f"unknown value tag {tag!r}")


def _from_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64: {exc}") from None


# -- a whole session: a record ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Meta:
    """What a session knows about itself, beside its keys."""

    created: float
    """Unix time of creation (restarted by renew_token)."""
    end: float
    """Unix time of the absolute end of its life."""
    remember: bool | None = None
    """remember_me's choice; None leaves it to the middleware's max_age."""
    user: str | None = None
    """The user the session is bound to (`Session.login`); None for an anonymous session."""
    agent: str | None = None
    """The User-Agent of the request that logged in (only with a user)."""
    active: float | None = None
    """Unix time the session was last seen active (only with a user; see `Lifecycle.activity_interval`)."""


def record_head(meta: Meta) -> bytes:
    """The start of every record of a session with `meta`: all of it up to the values."""
    remember = "null" if meta.remember is None else "true" if meta.remember else "false"
    if meta.user is None:
        return f'{{"v":{RECORD_VERSION},"c":{meta.created!r},"e":{meta.end!r},"r":{remember},"d":'.encode()
    agent = "null" if meta.agent is None else _encode_json(meta.agent)
    active = "null" if meta.active is None else repr(meta.active)
    return (f'{{"v":{RECORD_VERSION},"c":{meta.created!r},"e":{meta.end!r},"r":{remember},'
            f'"u":{_encode_json(meta.user)},"a":{agent},"l":{active},"d":').encode()


def reusable_head(record: bytes) -> bytes | None:
    """The head of a record of format 2, to reuse while the session's metadata stays the same."""
    if not record.startswith(b'{"v":2,'):
        return None
    at = record.find(b',"d":')
    return None if at < 0 else record[: at + 5]


def encode_record(meta: Meta, data: dict[str, Any], head: bytes | None = None) -> bytes:
    """The record of a session holding `data` (values `check_value` accepted). A plain dict, not a
    Session: the encoder reads it directly rather than through the session's access tracking. `head`,
    when given, is `record_head(meta)` (or the head of a stored record with the same metadata).
    TypeError or ValueError for a value that cannot be kept (only possible for one changed in place)."""
    if head is None:
        head = record_head(meta)
    try:
        return head + _encode_data(data).encode("ascii") + b"}"
    except _Standalone:
        pass
    tags: dict[str, str] = {}
    plain = dict(data)
    for key, value in data.items():
        if type(value) is bytes:
            tags[key], plain[key] = "b", base64.b64encode(value).decode("ascii")
        elif type(value) is datetime:
            tags[key], plain[key] = "t", value.isoformat()
    return head + f'{_encode_data(plain)},"t":{_encode_data(tags)}}}'.encode("ascii")


def decode_record(data: bytes) -> tuple[Meta, dict[str, Any]]:
    """The metadata and the values of a stored session. ValueError if it is not one."""
    try:
        record = _decode_whole(data.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from None
    if type(record) is not dict:
        raise ValueError("not a session record")
    version, created, end, remember, values = (record.get("v"), record.get("c"), record.get("e"), record.get("r"),
                                                record.get("d"))
    if type(created) is int:
        created = float(created)
    if type(end) is int:
        end = float(end)
    if type(created) is not float or type(end) is not float or remember not in (None, True, False) \
            or type(values) is not dict:
        raise ValueError("bad fields in a session record")
    user = _user_fields(record)
    if version == RECORD_VERSION:
        tags = record.get("t")
        if tags is not None:
            _untag(values, tags)
    elif version == 1:
        if not all(type(v) is str for v in values.values()):
            raise ValueError("bad values in a session record")
        values = {key: decode_value(text) for key, text in values.items()}
    else:
        raise ValueError("not a session record of a known version")
    return Meta(created, end, remember, *user), values


def _user_fields(record: dict[str, Any]) -> tuple[str | None, str | None, float | None]:
    """The user, agent and last-active members of a decoded record (all None when it has no user)."""
    user = record.get("u")
    if user is None:
        return None, None, None
    agent, active = record.get("a"), record.get("l")
    if type(active) is int:
        active = float(active)
    if type(user) is not str or not (agent is None or type(agent) is str) \
            or not (active is None or type(active) is float):
        raise ValueError("bad user fields in a session record")
    return user, agent, active


def decode_meta(data: bytes) -> Meta:
    """The metadata of a stored session, parsing only the members before its values when it is of format
    2 (a listing of a user's sessions reads no session data). ValueError if it is not a session record."""
    head = reusable_head(data)
    if head is None:
        return decode_record(data)[0]
    try:
        record = _decode_whole(head[:-5].decode("utf-8") + "}")
    except (UnicodeDecodeError, ValueError):
        return decode_record(data)[0]
    created, end, remember = record.get("c"), record.get("e"), record.get("r")
    if type(created) is int:
        created = float(created)
    if type(end) is int:
        end = float(end)
    if type(created) is not float or type(end) is not float or remember not in (None, True, False):
        raise ValueError("bad fields in a session record")
    return Meta(created, end, remember, *_user_fields(record))


def _untag(values: dict[str, Any], tags: object) -> None:
    if type(tags) is not dict:
        raise ValueError("bad type tags in a session record")
    for key, tag in tags.items():
        text = values.get(key)
        if type(text) is not str:
            raise ValueError(f"a tagged value in a session record is not text: {key!r}")
        if tag == "b":
            values[key] = _from_base64(text)
        elif tag == "t":
            values[key] = datetime.fromisoformat(text)
        else:
            raise ValueError(f"unknown type tag {tag!r} in a session record")
