"""The checks of the arguments a DB is given: the errors the contract names, with short messages (an error
never spells out a number of 400 digits). The hot paths check the common types inline and call these for
anything else."""

from __future__ import annotations

import math

from buntsession.engine import format as fmt

__all__ = ["check_key", "key_bytes", "require_int", "seconds", "show", "unix_time", "value_bytes"]

_MAX_KEY = fmt.MAX_KEY_SIZE


def check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"keys are str, not {type(key).__name__}")
    if not key:
        raise ValueError("keys must not be empty")


def key_bytes(key: object) -> bytes:
    """`key` encoded for a record. TypeError or ValueError, naming the fault, for a key that is not a
    non-empty str of valid Unicode within the size limit."""
    if type(key) is str:  # the common case first: every write pays for this call
        try:
            kb = key.encode()
        except UnicodeEncodeError:
            pass
        else:
            if 0 < len(kb) <= _MAX_KEY:
                return kb
    check_key(key)
    assert isinstance(key, str)
    try:
        kb = key.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"key {show(key)} is not valid Unicode") from exc
    if len(kb) > fmt.MAX_KEY_SIZE:
        raise ValueError(f"key of {len(kb)} bytes is over the limit of {fmt.MAX_KEY_SIZE}")
    return kb


def value_bytes(value: object) -> bytes:
    """`value` as bytes: anything with the buffer protocol (bytes, bytearray, memoryview, array.array...),
    its raw bytes in memory order. TypeError for anything else (a str included); ValueError over the cap."""
    if type(value) is bytes:
        data = value
    else:
        try:
            view = memoryview(value)  # type: ignore[arg-type]  # any buffer: checked by the call
        except TypeError:
            raise TypeError(f"values are bytes-like, not {type(value).__name__}") from None
        with view:
            if view.nbytes > fmt.MAX_VALUE_SIZE:
                raise ValueError(f"value of {view.nbytes} bytes is over the limit of {fmt.MAX_VALUE_SIZE}")
            data = view.tobytes()
    if len(data) > fmt.MAX_VALUE_SIZE:
        raise ValueError(f"value of {len(data)} bytes is over the limit of {fmt.MAX_VALUE_SIZE}")
    return data


def show(value: object) -> str:
    """`repr(value)` cut short: an error message never spells out a number of 400 digits."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"{'-' if value < 0 else ''}an int of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"{name} {show(value)} is too large") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{name} must be positive and finite, not {show(value)}")
    return seconds


def unix_time(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expire_at must be a unix time in seconds, not {type(value).__name__}")
    try:
        at = float(value)
    except OverflowError:
        at = math.inf
    if not math.isfinite(at):
        raise ValueError(f"expire_at must be finite, not {show(value)}")
    return at


def require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, not {show(value)}")
