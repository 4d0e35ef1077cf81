"""The Session object on its own: dict behaviour, change tracking, typed helpers, the codec's exact types."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buntsession import Session, SessionTypeError, Status
from buntsession.codec import MAX_RECORD_SIZE, Meta, decode_record, decode_value, encode_record, encode_value
from buntsession.merge import Update, apply_update

KINDS: list[tuple[str, Any, Any, Any]] = [
    # (type name, a value of it, its default, a value of another type)
    ("string", "héllo", "", 5),
    ("int", 2**70, 0, True),
    ("float", -0.5, 0.0, "1.5"),
    ("bool", True, False, 1),
    ("bytes", b"\x00\xff", b"", "text"),
    ("time", datetime(2026, 11, 30, 12, 0, tzinfo=UTC), None, "2026-11-30"),
    ("object", {"cart": [1, 2.5, "x", None, True, {"n": []}]}, None, (1, 2)),
]


@pytest.mark.parametrize(("kind", "value", "default", "wrong"), KINDS)
def test_typed_helpers(kind: str, value: Any, default: Any, wrong: Any) -> None:
    session = Session()
    put, get, pop = (getattr(session, f"{verb}_{kind}") for verb in ("put", "get", "pop"))
    assert get("absent") == default
    assert pop("absent") == default
    assert get("absent", value) == value
    assert not session.modified
    with pytest.raises(TypeError):
        put("k", wrong)
    assert "k" not in session
    put("k", value)
    assert session.modified and session.status is Status.MODIFIED
    assert get("k") == value
    assert pop("k") == value
    assert "k" not in session


@pytest.mark.parametrize("kind", ["string", "int", "float", "bool", "bytes", "time"])
def test_typed_getter_on_another_type_raises(kind: str) -> None:
    session = Session()
    session["k"] = [1, 2] if kind != "time" else "not a time"
    with pytest.raises(SessionTypeError):
        getattr(session, f"get_{kind}")("k")
    with pytest.raises(TypeError):  # SessionTypeError is a TypeError too
        getattr(session, f"pop_{kind}")("k")
    assert "k" in session  # a failed pop removes nothing


def test_exact_types_are_kept_apart() -> None:
    session = Session()
    session.put_bool("flag", True)
    with pytest.raises(SessionTypeError):
        session.get_int("flag")  # a bool is not an int
    with pytest.raises(TypeError):
        session.put_int("n", True)
    session.put_float("f", 1)
    assert session.get_float("f") == 1.0 and type(session["f"]) is float
    session.put_int("i", 3)
    with pytest.raises(SessionTypeError):
        session.get_float("i")
    with pytest.raises(ValueError):
        session.put_float("nan", math.nan)
    with pytest.raises(TypeError):  # the same error: a value the codec cannot keep
        session["inf"] = math.inf
    assert session.get_object("i") == 3  # an int is JSON-like


@pytest.mark.parametrize("value", [(1, 2), {1, 2}, {1: "a"}, [b"bytes inside"], object(), frozenset(), 1j,
                                   [datetime.now()], {"x": (1,)}, float("inf")])
def test_values_the_codec_cannot_keep_are_refused_at_assignment(value: Any) -> None:
    session = Session()
    with pytest.raises((TypeError, ValueError)):
        session["k"] = value
    with pytest.raises((TypeError, ValueError)):
        session.update({"ok": 1, "k": value})
    assert dict(session) == {}  # all or nothing
    assert not session.modified


def test_dict_interface_tracks_changes_like_starlettes() -> None:
    session = Session()
    assert not session.accessed
    session.setdefault("a", 1)
    assert session.modified
    for change in (lambda s: s.pop("a"), lambda s: s.popitem(), lambda s: s.clear(),
                   lambda s: s.update(b=2), lambda s: s.__ior__({"c": 3}), lambda s: s.__delitem__("a")):
        fresh = Session()
        dict.__setitem__(fresh, "a", 1)
        change(fresh)
        assert fresh.modified, change
    untouched = Session()
    untouched.pop("missing", None)
    untouched.remove("missing")
    assert not untouched.modified
    json.dumps(session)  # still a plain dict to json


def test_reads_mark_the_session_accessed() -> None:
    for read in (lambda s: s.get("x"), lambda s: "x" in s, list, lambda s: s.get_int("x"),
                 Session.keys, lambda s: s.exists("x"), len):
        session = Session()
        read(session)
        assert session.accessed and not session.modified


def test_frozen_session_refuses_changes() -> None:
    session = Session(a=1)
    session.freeze("read-only here")
    for change in (lambda s: s.__setitem__("b", 1), lambda s: s.put_int("b", 1), lambda s: s.clear(),
                   lambda s: s.pop("a"), lambda s: s.destroy(), lambda s: s.renew_token(),
                   lambda s: s.remember_me(True), lambda s: s.popitem()):
        with pytest.raises(RuntimeError, match="read-only here"):
            change(session)
    assert dict(session) == {"a": 1}
    assert session.get("a") == 1


def test_lifecycle_metadata() -> None:
    session = Session()
    assert session.token is None and session.created_at is None and session.expires_at is None
    session.renew_token()
    assert session.token is not None and len(session.token) == 43
    session.destroy()
    assert session.token is None and session.status is Status.DESTROYED
    session.put_string("x", "after")
    assert session.status is Status.MODIFIED and session.status == "modified"


offsets = st.timedeltas(timedelta(hours=-23), timedelta(hours=23))
times = st.datetimes(timezones=st.one_of(st.none(), st.just(UTC), st.builds(timezone, offsets)))
text = st.text(st.characters(exclude_categories=["Cs"]))  # valid Unicode: no lone surrogates
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)
values = json_like | st.binary() | times


def keepable(value: Any) -> bool:
    """Whether a session keeps `value`: all of `values` but datetimes whose UTC offset has sub-second parts."""
    offset = value.utcoffset() if isinstance(value, datetime) else None
    return offset is None or not offset.microseconds


@given(values)
def test_every_value_comes_back_with_its_exact_type_or_is_refused_at_assignment(value: Any) -> None:
    session = Session()
    if not keepable(value):
        with pytest.raises(TypeError, match="sub-second"):
            session["k"] = value
        assert "k" not in session
        return
    session["k"] = value
    for back in (decode_value(encode_value(value)), decode_record(encode_record(Meta(1.0, 2.0), {"k": value}))[1]["k"]):
        assert back == value
        assert type(back) is type(value)
        if isinstance(value, datetime):
            assert back.utcoffset() == value.utcoffset()


@given(st.dictionaries(text, values.filter(keepable), max_size=6), st.dictionaries(text, values.filter(keepable),
                                                                                    max_size=3))
def test_record_round_trip_and_merge(data: dict[str, Any], mine: dict[str, Any]) -> None:
    meta = Meta(created=1.5, end=100.0, remember=True)
    record = encode_record(meta, data)
    assert decode_record(record) == (meta, data)
    # Unchanged since loaded: the request's view is written whole.
    theirs = {**data, **mine}
    update = Update(theirs, meta, 100.0, base=record, put=set(mine))
    assert apply_update(record, update) == encode_record(meta, theirs)
    # Written meanwhile by another request: only this request's keys go onto what is stored.
    other = encode_record(meta, {"other": 1})
    merged = apply_update(other, update)
    assert merged is not None
    assert decode_record(merged)[1] == {"other": 1, **mine}
    assert apply_update(None, update) is None  # gone sessions are never recreated


def test_a_record_of_format_one_is_still_read() -> None:
    when = datetime(2026, 11, 30, 9, 30, tzinfo=UTC)
    old = json.dumps({"v": 1, "c": 1.0, "e": 2.0, "r": None, "d": {
        "s": "shi", "n": "j2", "o": 'j{"a":[1]}', "b": "bAP8=", "t": "t" + when.isoformat()}}).encode()
    assert decode_record(old) == (Meta(1.0, 2.0), {"s": "hi", "n": 2, "o": {"a": [1]}, "b": b"\x00\xff", "t": when})


@pytest.mark.parametrize("bad", ["\ud800", "ok \udfff", ["\ud800"], {"k": "\ud800"}, {"\ud800": 1}])
def test_a_lone_surrogate_is_refused_at_assignment_at_any_depth(bad: Any) -> None:
    session = Session()
    for assign in (lambda: session.__setitem__("k", bad), lambda: session.update(k=bad),
                   lambda: session.put_object("k", bad) if not isinstance(bad, str) else session.put_string("k", bad)):
        with pytest.raises(TypeError, match="surrogate"):
            assign()
    with pytest.raises(TypeError, match="surrogate"):
        session["\ud800"] = 1
    assert dict(session) == {} and not session.modified


def test_a_datetime_whose_offset_has_sub_second_parts_is_refused() -> None:
    odd = datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=1, microseconds=5)))
    session = Session()
    with pytest.raises(TypeError, match="sub-second"):
        session.put_time("t", odd)
    seconds = datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=1, seconds=5)))
    session.put_time("t", seconds)  # whole seconds come back exactly
    assert decode_value(encode_value(seconds)).utcoffset() == timedelta(hours=1, seconds=5)


def test_an_int_with_more_digits_than_python_converts_is_refused_at_assignment() -> None:
    session = Session()
    with pytest.raises(ValueError, match="too many digits"):
        session.put_int("n", 10**5000)
    with pytest.raises(ValueError, match="too many digits"):
        session["l"] = [1, {"x": -(10**5000)}]
    session.put_int("n", 2**9999)  # large, but within the limit: kept
    assert decode_record(encode_record(Meta(1.0, 2.0), dict(session)))[1] == {"n": 2**9999}


def test_a_value_too_large_for_any_store_is_refused_at_assignment() -> None:
    session = Session()
    with pytest.raises(ValueError, match="size limit"):
        session.put_bytes("big", bytes(MAX_RECORD_SIZE // 4 * 3 + 1))
    with pytest.raises(ValueError, match="size limit"):
        session.put_string("big", "x" * (MAX_RECORD_SIZE + 1))
    assert "big" not in session


@pytest.mark.parametrize("garbage", [
    b"", b"not json", b"[]", b'{"v": 2}', b'{"v": 3, "c": 1, "e": 2, "r": null, "d": {}}',
    b'{"v":2,"c":1,"e":2,"r":null,"d":{"k":5},"t":{"k":"b"}}', b'{"v":2,"c":1,"e":2,"r":null,"d":{"k":1e999}}',
    b'{"v":1,"c":1,"e":2,"r":null,"d":{"k":5}}', b'{"v":1,"c":"x","e":2,"r":null,"d":{}}', b"\xff\xfe", b"[" * 100000,
])
def test_undecodable_records_raise_value_error(garbage: bytes) -> None:
    with pytest.raises(ValueError):
        decode_record(garbage)


@pytest.mark.parametrize("text", ["", "x1", "j[1,", "jNaN", "j1e999", "b!!!", "tnot-a-time"])
def test_undecodable_values_raise_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        decode_value(text)


class _Text(str):
    pass


UNKEEPABLE = [(1,), {1}, frozenset(), b"x", bytearray(b"x"), datetime(2026, 1, 1), math.nan, math.inf, -math.inf, 1j,
              object(), "\ud800", "ok \udfff", _Text("a str subclass"), {1: "a"}, {"\udfff": 1}, {_Text("k"): 1},
              10**5000]


_SIBLINGS = st.none() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text


@given(st.sampled_from(UNKEEPABLE),
       st.lists(st.tuples(st.sampled_from(["list", "dict"]), st.booleans(), _SIBLINGS), min_size=1, max_size=8))
def test_a_value_the_codec_cannot_keep_is_refused_at_any_depth(bad: Any, path: list[tuple[str, bool, Any]]) -> None:
    value = bad  # bytes and datetime may stand on their own, not inside a list or dict
    for container, first, sibling in path:  # wrap it, with a keepable sibling before or after it
        if container == "list":
            value = [value, sibling] if first else [sibling, value]
        else:
            value = {"bad": value, "ok": sibling} if first else {"ok": sibling, "bad": value}
    session = Session()
    with pytest.raises(TypeError):
        session["k"] = value
    assert "k" not in session


@pytest.mark.parametrize("container", [list, dict])
def test_values_nest_64_levels_deep_at_most(container: type) -> None:
    def nest(levels: int) -> Any:
        value: Any = 1
        for _ in range(levels):
            value = [value] if container is list else {"k": value}
        return value

    session = Session()
    session["ok"] = nest(64)
    with pytest.raises(TypeError, match="64 levels"):
        session["deep"] = nest(65)
