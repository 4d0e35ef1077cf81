"""Random operation sequences against a plain dict model, across reopen and shrink."""

from __future__ import annotations

import tempfile
from typing import Any

import anyio
from helpers import FakeClock, contents
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buntsession import DB

keys = st.sampled_from(["a", "b", "c", "session:1", "session:2", "ключ", "\x00"])
ttls = st.one_of(st.none(), st.sampled_from([0.5, 1, 5, 30]))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), keys, st.binary(max_size=64), ttls),
        st.tuples(st.just("delete"), keys),
        st.tuples(st.just("expire"), keys, ttls),
        st.tuples(st.just("get"), keys),
        st.tuples(st.just("ttl"), keys),
        st.tuples(st.just("advance"), st.sampled_from([0.3, 1, 4, 10])),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("shrink")),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_db_matches_a_dict_model(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(check_against_model, f"{tmp}/model.db", ops)


async def check_against_model(path: str, ops: list[tuple[Any, ...]]) -> None:
    clock = FakeClock()
    model: dict[str, tuple[bytes, float | None]] = {}

    def live(key: str) -> tuple[bytes, float | None] | None:
        entry = model.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= clock.now:
            del model[key]
            return None
        return entry

    def model_state() -> dict[str, bytes]:
        return {key: entry[0] for key in list(model) if (entry := live(key)) is not None}

    def new_db() -> DB:
        db = DB(path, cleanup_interval=0.01)
        db._clock = clock
        return db

    db = new_db()
    await db.open()
    try:
        for op in ops:
            name = op[0]
            if name == "set":
                _, key, value, ttl = op
                await db.set(key, value, ttl=ttl)
                model[key] = (value, None if ttl is None else clock.now + ttl)
            elif name == "delete":
                assert await db.delete(op[1]) is (live(op[1]) is not None)
                model.pop(op[1], None)
            elif name == "expire":
                _, key, ttl = op
                entry = live(key)
                assert await db.expire(key, ttl) is (entry is not None)
                if entry is not None:
                    model[key] = (entry[0], None if ttl is None else clock.now + ttl)
            elif name == "get":
                entry = live(op[1])
                assert await db.get(op[1]) == (entry[0] if entry else None)
            elif name == "ttl":
                entry = live(op[1])
                expected = None if entry is None or entry[1] is None else entry[1] - clock.now
                got = await db.ttl(op[1])
                assert (got is None) == (expected is None) and (got is None or abs(got - expected) < 1e-6)
            elif name == "advance":
                clock.advance(op[1])
            elif name == "reopen":
                await db.close()
                db = new_db()
                await db.open()
            elif name == "shrink":
                await db.shrink()
            assert len(db) == len(model_state())
        assert await contents(db) == model_state()
    finally:
        await db.close()
    async with new_db() as reopened:
        assert await contents(reopened) == model_state()
