"""Several worker processes on one file (DB(shared=True)), each a real uvicorn: 30 s of mixed load with
rewrites forced, one worker SIGKILLed halfway. Every acknowledged write reads back through every other
worker, no live worker answers 5xx, and the file checks clean."""

from __future__ import annotations

import collections
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from helpers import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def start_worker(db_path: str, port: int | None = None, workers: int = 1) -> tuple[subprocess.Popen[bytes], int]:
    port = port or free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "worker_app:app", "--app-dir", str(HERE), "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--workers", str(workers)],
        env={**os.environ, "WORKER_DB": db_path}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/read", timeout=1)
            return server, port
        except httpx.TransportError:
            assert server.poll() is None, server.stdout.read() if server.stdout else b""
            time.sleep(0.1)
    server.kill()
    pytest.fail("a worker did not start")


def cookie_of(response: httpx.Response) -> str:
    match = re.search(r"session=([^;]+);", response.headers.get("set-cookie", ""))
    assert match, response.headers
    return match[1]


@pytest.mark.slow
def test_four_workers_share_one_file_under_load(tmp_path: Path) -> None:
    db_path = str(tmp_path / "shared.db")
    workers = [start_worker(db_path) for _ in range(4)]
    ports = [port for _, port in workers]
    dead: set[int] = set()
    expected: dict[str, int] = {}
    unanswered: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    counts = {"writes": 0, "cross_reads": 0}

    async def client_task(seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        mine: list[str] = []
        async with httpx.AsyncClient(timeout=10) as http:
            while time.monotonic() < deadline:
                live = [p for p in ports if p not in dead]
                port = rng.choice(live)
                url = f"http://127.0.0.1:{port}"
                op, cookie = "create", ""
                try:
                    if not mine or rng.random() < 0.1:
                        response = await http.get(url + "/incr")
                        if response.status_code == 200:
                            cookie = cookie_of(response)
                            mine.append(cookie)
                            expected[cookie] = 1
                    elif rng.random() < 0.5:
                        op, cookie = "incr", rng.choice(mine)
                        response = await http.get(url + "/incr", headers={"cookie": f"session={cookie}"})
                        if response.status_code == 200:
                            n = int(response.text)
                            # One more than acknowledged, plus any write the killed worker made but never
                            # answered: never fewer (a lost acknowledged write), never more.
                            if not expected[cookie] < n <= expected[cookie] + 1 + unanswered[cookie]:
                                errors.append(f"incr gave {n} through :{port}, acknowledged {expected[cookie]}")
                            expected[cookie], unanswered[cookie] = n, 0
                            counts["writes"] += 1
                    else:
                        op, cookie = "read", rng.choice(mine)
                        response = await http.get(url + "/read", headers={"cookie": f"session={cookie}"})
                        if response.status_code == 200 and not (
                            expected[cookie] <= int(response.text) <= expected[cookie] + unanswered[cookie]
                        ):
                            errors.append(f"read {response.text} through :{port}, expected {expected[cookie]}")
                        counts["cross_reads"] += 1
                    http.cookies.clear()  # each request carries exactly the session it means
                    if response.status_code >= 500:
                        errors.append(f"{response.status_code} from :{port}")
                except httpx.TransportError:
                    if port not in dead:
                        errors.append(f"transport error from live worker :{port}")
                    elif op == "incr":
                        unanswered[cookie] += 1  # the killed worker may have stored it before dying

    async def run() -> None:
        deadline = time.monotonic() + 30
        async with anyio.create_task_group() as tg:
            for seed in range(8):
                tg.start_soon(client_task, seed, deadline)
            await anyio.sleep(15)
            victim, port = workers[3]
            dead.add(port)
            victim.send_signal(signal.SIGKILL)  # in the middle of the run: the others go on

    try:
        anyio.run(run)
        assert errors == [], '\n'.join(errors)
        assert counts["writes"] > 500 and counts["cross_reads"] > 500
        with httpx.Client(timeout=10) as http:  # every session reads back right through every live worker
            for cookie, n in expected.items():
                for port in ports[:3]:
                    response = http.get(f"http://127.0.0.1:{port}/read", headers={"cookie": f"session={cookie}"})
                    assert n <= int(response.text) <= n + unanswered[cookie], (cookie, port)
    finally:
        for server, _ in workers:
            server.send_signal(signal.SIGINT)
        for server, _ in workers:
            server.wait(timeout=30)
    check = subprocess.run([sys.executable, "-m", "buntsession", "check", db_path], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    records = int(re.search(r"(\d+) records", check.stdout)[1])  # type: ignore[index]
    # Rewrites ran along the way: the file holds far fewer records than the writes made.
    assert len(expected) <= records < (counts["writes"] + len(expected)) / 2


def test_uvicorn_workers_share_the_file(tmp_path: Path) -> None:
    db_path = str(tmp_path / "shared.db")
    server, port = start_worker(db_path, workers=2)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            first = http.get("/incr")
            cookie = cookie_of(first)
            http.cookies.clear()
            for n in range(2, 40):  # requests land on either worker: each sees the other's writes
                assert http.get("/incr", headers={"cookie": f"session={cookie}"}).text == str(n)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
