"""The session lifecycle on its own, without ASGI: load, commit, the cookie it asks for, what it writes."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import FakeClock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buntsession import DB, BuntStore, MemoryStore, Session
from buntsession.lifecycle import EXPIRE_COOKIE, Lifecycle
from buntsession.session import store_key


class CountingStore(MemoryStore):
    """A MemoryStore that counts the writes it is asked for."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.merges = 0

    async def merge(self, key: str, update: Any) -> bool:
        self.merges += 1
        return await super().merge(key, update)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> CountingStore:
    return CountingStore(clock)


def lifecycle(store: Any, clock: FakeClock, **options: Any) -> Lifecycle:
    life = Lifecycle(store, options.pop("max_age", 3600), **options)
    life.clock = clock
    return life


async def start(life: Lifecycle, data: dict[str, Any]) -> str:
    """Store a new session holding `data`; its token."""
    session = await life.load(None)
    session.update(data)
    change = await life.commit(session, ok=True)
    assert change is not None and change.token is not None and change.meta is not None
    assert session.token == change.token
    return change.token


@pytest.mark.anyio
async def test_a_new_session_is_stored_once_and_sends_its_cookie(store: CountingStore, clock: FakeClock) -> None:
    life = lifecycle(store, clock)
    assert await life.commit(await life.load(None), ok=True) is None  # nothing changed: nothing at all
    empty = await life.load(None)
    empty.mark_modified()
    assert await life.commit(empty, ok=True) is None  # an empty new session is never stored
    token = await start(life, {"a": 1})
    assert store.merges == 1
    loaded = await life.load(token)
    assert dict(loaded) == {"a": 1} and loaded.token == token
    assert loaded.expires_at is not None and loaded.expires_at.timestamp() == pytest.approx(clock.now + 3600)


@pytest.mark.anyio
async def test_a_write_keeps_the_token_and_sends_no_cookie(store: CountingStore, clock: FakeClock) -> None:
    life = lifecycle(store, clock)
    token = await start(life, {"a": 1})
    session = await life.load(token)
    session["b"] = 2
    assert await life.commit(session, ok=True) is None
    assert dict(await life.load(token)) == {"a": 1, "b": 2}
    resigned = await life.load(token)
    change = await life.commit(resigned, ok=True, resend=True)  # a cookie signed with an older key
    assert change is not None and change.token == token
    assert store.merges == 2  # re-sending the cookie wrote nothing


@pytest.mark.anyio
@pytest.mark.parametrize("read", [
    lambda s: s["cart"], lambda s: s.get("cart"), lambda s: s.get_object("cart"), lambda s: s.setdefault("cart"),
    lambda s: next(iter(s.values())), lambda s: dict(s.items())["cart"], lambda s: dict(s)["cart"],
    lambda s: {**s}["cart"], lambda s: s.copy()["cart"], lambda s: (s | {})["cart"],
])
async def test_lists_and_dicts_changed_in_place_are_written_and_merely_read_ones_are_not(
    store: CountingStore, clock: FakeClock, read: Callable[[Session], Any]
) -> None:
    life = lifecycle(store, clock)
    token = await start(life, {"cart": [{"sku": "a", "qty": 1}], "user": "ada"})
    for _ in range(2):  # the second load comes from the decoded-record cache
        session = await life.load(token)
        read(session)
        json.dumps(session)
        assert await life.commit(session, ok=True) is None
    assert store.merges == 1
    session = await life.load(token)
    read(session)[0]["qty"] = True  # a change of type alone counts: 1 == True in Python, not here
    await life.commit(session, ok=True)
    assert store.merges == 2
    assert dict(await lifecycle(store, clock).load(token)) == {"cart": [{"sku": "a", "qty": True}], "user": "ada"}


@pytest.mark.anyio
async def test_a_value_changed_in_place_into_something_unkeepable_is_a_store_error(
    store: CountingStore, clock: FakeClock
) -> None:
    from buntsession import StoreError

    life = lifecycle(store, clock)
    token = await start(life, {"cart": []})
    session = await life.load(token)
    session["cart"].append({1, 2})
    with pytest.raises(StoreError, match="changed in place"):
        await life.commit(session, ok=True)
    assert dict(await life.load(token)) == {"cart": []}


@pytest.mark.anyio
async def test_the_decoded_cache_never_serves_a_record_the_store_no_longer_holds(tmp_path: Path) -> None:
    db = DB(str(tmp_path / "s.db"))
    async with db:
        first, second = Lifecycle(BuntStore(db), 3600), Lifecycle(BuntStore(db), 3600)
        token = await start(first, {"cart": [1]})
        seen = await first.load(token)  # cached in `first`
        seen["cart"].append(99)  # changed in place but never committed: the cache must not keep it
        other = await second.load(token)  # another middleware (or process) writes the session
        other["cart"] = [2]
        await second.commit(other, ok=True)
        assert dict(await first.load(token)) == {"cart": [2]}
        again = await first.load(token)
        assert dict(again) == {"cart": [2]}
        again["cart"].append(3)
        await first.commit(again, ok=True)
        assert dict(await second.load(token)) == {"cart": [2, 3]}


@pytest.mark.anyio
async def test_renew_and_destroy(store: CountingStore, clock: FakeClock) -> None:
    life = lifecycle(store, clock)
    token = await start(life, {"a": 1})
    session = await life.load(token)
    session.renew_token()
    change = await life.commit(session, ok=True)
    assert change is not None and change.token not in (None, token)
    assert await store.find(store_key(token)) is None  # the old token is dead
    assert dict(await life.load(change.token)) == {"a": 1}
    assert change.token is not None
    doomed = await life.load(change.token)
    doomed.destroy()
    assert await life.commit(doomed, ok=False) is EXPIRE_COOKIE  # a destroy holds even on a 5xx
    assert dict(await life.load(change.token)) == {} and (await life.load(change.token)).token is None


@pytest.mark.anyio
async def test_changes_to_a_session_ended_meanwhile_are_dropped(store: CountingStore, clock: FakeClock) -> None:
    life = lifecycle(store, clock)
    token = await start(life, {"a": 1})
    slow = await life.load(token)
    ending = await life.load(token)
    ending.destroy()
    await life.commit(ending, ok=True)
    slow["b"] = 2
    assert await life.commit(slow, ok=True) is None
    assert await store.find(store_key(token)) is None


@pytest.mark.anyio
async def test_a_session_too_large_to_store_is_refused_and_the_old_one_kept(tmp_path: Path) -> None:
    from buntsession import StoreError
    from buntsession.codec import MAX_RECORD_SIZE

    async with DB(str(tmp_path / "s.db")) as db:
        life = Lifecycle(BuntStore(db), 3600)
        token = await start(life, {"a": 1})
        session = await life.load(token)
        half = MAX_RECORD_SIZE // 2
        session.put_bytes("x", bytes(half // 4 * 3))  # each value fits; together they do not
        session.put_bytes("y", bytes(half // 4 * 3))
        with pytest.raises(StoreError, match="over the limit"):
            await life.commit(session, ok=True)
        assert dict(await life.load(token)) == {"a": 1}
    async with DB(str(tmp_path / "s.db")) as reopened:  # and the file still opens
        assert len(reopened) == 1


# -- the decoded-record cache against a model ------------------------------------------------------------------

_KEYS = st.sampled_from(["cart", "prefs", "n", "tags"])
_LEAVES = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([1.0, 0.5, -0.0]) | st.text(max_size=3)
_VALUES = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=2), inner, max_size=3), max_leaves=6)
_STEPS = st.lists(st.one_of(
    st.tuples(st.just("assign"), _KEYS, _VALUES),
    st.tuples(st.just("assign, then change in place"), _KEYS, _VALUES),
    st.tuples(st.just("change in place"), _KEYS, _LEAVES),
    st.tuples(st.just("change through values()"), _LEAVES),
    st.tuples(st.just("delete"), _KEYS),
    st.tuples(st.just("clear")),
    st.tuples(st.just("read")),
), min_size=1, max_size=4)


def _change(value: Any, leaf: Any) -> None:
    if type(value) is list:
        value.append(leaf)
    elif type(value) is dict:
        value["added"] = leaf


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(_STEPS, min_size=1, max_size=6))
def test_the_decoded_record_cache_never_serves_what_the_store_does_not_hold(requests: list[list[Any]]) -> None:
    """Requests that assign, change in place (after loading, after assigning, through values()), delete
    and clear: after each, the session loaded through the cache equals a model, and equals the session a
    lifecycle without a cache decodes from the store."""

    async def main() -> None:
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        life, fresh_eyes = lifecycle(store, clock), lifecycle(store, clock)
        token = await start(life, {"n": 0})
        model: dict[str, Any] = {"n": 0}
        for steps in requests:
            session = await life.load(token)
            assert dict(session) == model
            for step in steps:
                if step[0] == "assign":
                    session[step[1]] = model[step[1]] = step[2]
                elif step[0] == "assign, then change in place":
                    value = copy.deepcopy(step[2])
                    session[step[1]] = value
                    _change(value, "later")
                    model[step[1]] = copy.deepcopy(value)
                elif step[0] == "change in place":
                    if step[1] in session:
                        _change(session[step[1]], step[2])
                        _change(model[step[1]], step[2])
                elif step[0] == "change through values()":
                    for value, expected in zip(session.values(), model.values(), strict=True):
                        _change(value, step[1])
                        _change(expected, step[1])
                elif step[0] == "delete":
                    session.pop(step[1], None)
                    model.pop(step[1], None)
                elif step[0] == "clear":
                    session.clear()
                    model.clear()
                else:
                    assert dict(session) == model
            session.freeze("committed")
            change = await life.commit(session, ok=True)
            assert change is None or change.token == token
            for reader in (life, fresh_eyes):
                again = await reader.load(token)
                assert again.token == token
                assert json.dumps(dict(again), sort_keys=True) == json.dumps(model, sort_keys=True)
                assert repr(dict(again)) == repr(model)  # types too: 1, 1.0 and True differ

    anyio.run(main)
