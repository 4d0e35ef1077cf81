from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# The helpers module sits beside the tests; child processes import it by path as well.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "data.db")


class RedisServer:
    """A redis-server on a free loopback port, with no persistence."""

    def __init__(self, workdir: str) -> None:
        from helpers import free_port

        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None


def _require_redis_server() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        reason = "redis-server is not installed (Debian: apt-get install redis-server); .ci/run installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


class RedisCluster:
    """Three redis-server masters in cluster mode on free loopback ports, no replicas, no persistence,
    joined by `redis-cli --cluster create`."""

    def __init__(self, workdir: str) -> None:
        self.ports = _cluster_ports(3)
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.processes = [self._node(port) for port in self.ports]
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ready()

    def _node(self, port: int) -> subprocess.Popen[bytes]:
        """Start (or start again, from its nodes.conf) the node on `port`, and wait until it answers."""
        node_dir = os.path.join(self.workdir, str(port))
        os.makedirs(node_dir, exist_ok=True)
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", node_dir, "--protected-mode", "no", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not _answers(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the redis cluster node on port {port} did not start")
            time.sleep(0.05)
        return process

    def wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [redis.Redis(port=port, socket_timeout=1).cluster("info") for port in self.ports]
            if all(state.get("cluster_state") == "ok" for state in states):
                return
            time.sleep(0.1)
        raise RuntimeError("the redis cluster did not become ready")

    def stop_node(self, index: int) -> None:
        self.processes[index].terminate()
        self.processes[index].wait(timeout=20)

    def start_node(self, index: int) -> None:
        self.processes[index] = self._node(self.ports[index])

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=20)
        self.processes = []


def _cluster_ports(count: int) -> list[int]:
    """Free loopback ports whose cluster bus ports (10000 higher) are free too: below the ephemeral range,
    since a bus port over 65535 keeps a node from starting."""
    import random
    import socket

    ports: list[int] = []
    rng = random.Random()
    while len(ports) < count:
        port = rng.randrange(20000, 30000)
        if port in ports:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        ports.append(port)
    return ports


def _answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.exceptions.ConnectionError:
        return False


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    _require_redis_server()
    cluster = RedisCluster(str(tmp_path_factory.mktemp("redis-cluster")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    _require_redis_server()
    server = RedisServer(str(tmp_path_factory.mktemp("redis")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the test item, so fixtures can tell a failed test (screenshots)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
