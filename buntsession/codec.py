"""How sessions are kept in a store: exact types, JSON text, no pickle. Pure functions.

Each value is encoded on its own into a short tagged string, so a store can merge one request's changes
into a stored session without decoding the other values:

    "s" + text                  str
    "j" + JSON                  int, float, bool, None, and JSON-like lists and dicts (str keys)
    "b" + base64                bytes
    "t" + ISO 8601              datetime (an aware one keeps its UTC offset, a naive one stays naive)

A record is the JSON object {"v": 1, "c": created, "e": end, "r": remember, "d": {key: encoded value}}:
created and end are unix times (the end is the absolute end of the session's life), remember is the
remember-me choice (true, false, or null for the middleware's default).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["Meta", "Update", "apply_update", "decode_record", "decode_value", "encode_record", "encode_value"]

RECORD_VERSION = 1
_MAX_DEPTH = 64


class UnkeepableFloat(TypeError, ValueError):
    """A NaN or an infinity: a float the codec cannot keep. Both a TypeError (a value the codec cannot
    keep) and a ValueError (a float of the wrong value), so either `except` catches it."""


def encode_value(value: object) -> str:
    """Encode `value` keeping its exact type. TypeError for a value that cannot be kept exactly (a tuple,
    a set, a str subclass, a dict with non-str keys, a NaN, ...)."""
    if isinstance(value, str) and type(value) is str:
        return "s" + value
    if isinstance(value, bytes) and type(value) is bytes:
        return "b" + base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime) and type(value) is datetime:
        return "t" + value.isoformat()
    check_json_like(value)
    return "j" + _ENCODER.encode(value)


def check_json_like(value: object, depth: int = 0) -> None:
    """Raise unless `value` is JSON-like: dict with str keys, list, str, int, finite float, bool, None."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise UnkeepableFloat(f"a session cannot keep the float {value!r}")
        return
    if depth >= _MAX_DEPTH:
        raise TypeError(f"a session value may nest {_MAX_DEPTH} levels deep at most")
    if kind is list:
        for item in value:  # type: ignore[attr-defined]
            check_json_like(item, depth + 1)
        return
    if kind is dict:
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                raise TypeError(f"dict keys in a session value must be str, not {type(key).__name__}")
            check_json_like(item, depth + 1)
        return
    where = "" if depth == 0 else " inside a list or dict (bytes and datetime may only stand on their own)"
    raise TypeError(f"a session cannot keep a {kind.__name__} with its exact type{where}")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("non-finite float")
    return number


def _no_constant(text: str) -> None:
    raise ValueError(f"{text} is not allowed")


# Built once: json.dumps and json.loads with options build a new encoder or decoder on every call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)


def decode_value(text: str) -> Any:
    """Decode what encode_value made. ValueError for anything else."""
    tag, body = text[:1], text[1:]
    if tag == "s":
        return body
    if tag == "j":
        return _DECODER.decode(body)
    if tag == "b":
        try:
            return base64.b64decode(body, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"bad base64: {exc}") from None
    if tag == "t":
        return datetime.fromisoformat(body)
    raise ValueError(f"unknown value tag {tag!r}")


@dataclass(frozen=True, slots=True)
class Meta:
    """What a session knows about itself, beside its keys."""

    created: float
    """Unix time of creation (restarted by renew_token)."""
    end: float
    """Unix time of the absolute end of its life."""
    remember: bool | None = None
    """remember_me's choice; None leaves it to the middleware's max_age."""


def encode_record(meta: Meta, values: Mapping[str, str]) -> bytes:
    record = {"v": RECORD_VERSION, "c": meta.created, "e": meta.end, "r": meta.remember, "d": values}
    return _ENCODER.encode(record).encode()


def decode_record(data: bytes) -> tuple[Meta, dict[str, str]]:
    """The metadata and the still-encoded values of a stored session. ValueError if it is not one."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(record, dict) or record.get("v") != RECORD_VERSION:
        raise ValueError("not a session record of a known version")
    created, end, remember, values = record.get("c"), record.get("e"), record.get("r"), record.get("d")
    times = [float(t) for t in (created, end) if isinstance(t, int | float) and math.isfinite(t)]
    if len(times) != 2 or remember not in (None, True, False) or not isinstance(values, dict):
        raise ValueError("bad fields in a session record")
    if not all(type(v) is str for v in values.values()):
        raise ValueError("bad values in a session record")
    return Meta(times[0], times[1], remember), values


@dataclass(frozen=True, slots=True)
class Update:
    """One request's changes to a session, for a store to apply atomically onto what it holds."""

    put: Mapping[str, str]
    """Keys set, with their encoded values."""
    removed: frozenset[str] = frozenset()
    cleared: bool = False
    """Drop every stored key before applying `put`."""
    meta: Meta | None = None
    """New metadata, or None to keep what is stored."""
    expires_at: float = 0.0
    """When the store may forget the session (unix time): the earlier of its end and its idle deadline."""
    create: bool = False
    """True for a new session; False applies only onto a session that still exists (a destroyed or
    renewed session is never brought back)."""
    base: tuple[bytes, Meta, Mapping[str, str]] | None = None
    """The record as the request loaded it, decoded: when the store still holds those very bytes, the
    merge need not decode them again."""


def apply_update(stored: bytes | None, update: Update) -> bytes | None:
    """The record after `update`, or None when it must not be written (the session is gone).

    Raises ValueError when the stored record cannot be read.
    """
    values: dict[str, str]
    if update.create:
        if update.meta is None:
            raise ValueError("a new session needs its metadata")
        meta, values = update.meta, {}
    elif stored is None:
        return None
    else:
        if update.base is not None and stored == update.base[0]:
            meta, values = update.base[1], dict(update.base[2])
        else:
            meta, values = decode_record(stored)
        if update.cleared:
            values = {}
        if update.meta is not None:
            meta = update.meta
    values.update(update.put)
    for key in update.removed:
        values.pop(key, None)
    return encode_record(meta, values)
