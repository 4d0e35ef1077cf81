"""Simulated power cuts: what fsync made durable survives; during a shrink the file is whole, old or new."""

from __future__ import annotations

import os
import random
from pathlib import Path

import anyio
import pytest
from child_db import expected_state, operation
from helpers import read_state
from powerloss import PowerLossOps, image
from starlette.testclient import TestClient

from buntsession import DB, BuntStore
from buntsession.session import store_key


async def workload(db: DB, counter: list[int], count: int, shrink_at: int | None = None) -> None:
    for n in range(count):
        op, key, value = operation(n)
        if op == "set":
            await db.set(key, value, ttl=3600 if n % 2 else None)
        else:
            await db.delete(key)
        counter[0] += 1
        if n == shrink_at:
            await db.shrink()


def check_moments(ops: PowerLossOps, tmp_path: Path, *, rule: str, tries: int = 3) -> int:
    """Build crash images at every noted moment and check what reopening them gives."""
    rng = random.Random(7)
    checked = 0
    for index, moment in enumerate(ops.moments):
        for attempt in range(tries):
            target = tmp_path / f"crash-{index}-{attempt}"
            target.mkdir()
            image(moment, rng, str(target), flushed_dir=attempt % 2 == 1, garbage=attempt == 2)
            path = str(target / "d.db")
            if not os.path.exists(path):
                assert moment.synced_acked == 0, f"the file vanished at {moment.label}"
                continue
            state = read_state(path)
            floor = moment.acked if rule == "always" else moment.synced_acked
            assert any(state == expected_state(m) for m in range(floor, moment.acked + 2)), (
                f"{moment.label} #{index}: state is not a prefix of at least {floor} operations")
            assert not os.path.exists(path + ".rewrite")
            checked += 1
    return checked


@pytest.mark.parametrize("sync", ["always", "everysec"])
def test_a_power_cut_loses_nothing_fsynced(tmp_path: Path, sync: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    counter = [0]
    ops = PowerLossOps(str(work), lambda: counter[0])
    db = DB(str(work / "d.db"), sync=sync)  # type: ignore[arg-type]
    db._fileops = ops

    async def main() -> None:
        async with db:
            await workload(db, counter, 40)
            if sync == "everysec":
                await db.sync()  # a background pass would do the same within a second
                await workload(db, counter, 0)

    anyio.run(main)
    assert check_moments(ops, tmp_path, rule=sync) > 100


def test_a_power_cut_during_a_shrink_leaves_the_whole_old_or_new_file(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    counter = [0]
    ops = PowerLossOps(str(work), lambda: counter[0])
    db = DB(str(work / "d.db"), sync="always", autoshrink=False)
    db._fileops = ops
    anyio.run(lambda: _run(db, counter))
    labels = {m.label for m in ops.moments}
    assert {"rename", "dirsync"} <= labels
    assert check_moments(ops, tmp_path, rule="always") > 100


async def _run(db: DB, counter: list[int]) -> None:
    async with db:
        await workload(db, counter, 60, shrink_at=30)


def test_a_logged_out_or_renewed_session_never_comes_back(tmp_path: Path) -> None:
    from session_app import make_app

    work = tmp_path / "work"
    work.mkdir()
    ops = PowerLossOps(str(work), lambda: 0)
    db = DB(str(work / "d.db"))  # everysec: only logout and renew are fsynced before the response
    db._fileops = ops
    client = TestClient(make_app(BuntStore(db)))
    client.get("/put?a=1")
    first = client.cookies["session"]
    client.post("/login")  # renew: the first token dies
    second = client.cookies["session"]
    client.post("/logout")  # destroy: the second dies
    after_logout = ops.moments[-1]
    rng = random.Random(1)
    for attempt in range(6):
        target = tmp_path / f"crash-{attempt}"
        target.mkdir()
        image(after_logout, rng, str(target), flushed_dir=bool(attempt % 2), garbage=attempt > 3)

        async def find(path: str = str(target / "d.db")) -> list[bytes | None]:
            async with DB(path) as reopened:
                store = BuntStore(reopened)
                return [await store.find(store_key(token)) for token in (first, second)]

        assert anyio.run(find) == [None, None]
