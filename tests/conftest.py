from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# The helpers module sits beside the tests; child processes import it by path as well.
sys.path.insert(0, os.path.dirname(__file__))

from redis_cluster import RedisCluster  # beside this file: on the path from the line above


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


def postgres_bin() -> str | None:
    """The bin directory of the newest PostgreSQL that Debian's packages installed, or None."""
    versions = []
    for entry in Path("/usr/lib/postgresql").glob("*/bin/postgres"):
        version = entry.parent.parent.name
        if version.isdigit():
            versions.append((int(version), str(entry.parent)))
    return max(versions)[1] if versions else None


def _unprivileged_user() -> str | None:
    """Who runs the server: PostgreSQL refuses to run as root. None when the tests are not root."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("buntsession-test")
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                               "buntsession-test"], capture_output=True, check=False)
        if made.returncode != 0:
            return "nobody"
    return "buntsession-test"


class PostgresServer:
    """A PostgreSQL server of its own: initdb into a temporary directory, listening on a free loopback port
    (and a unix socket in that directory), trust authentication, fsync off. Run as an unprivileged user when
    the tests run as root."""

    def __init__(self, bindir: str) -> None:
        import tempfile

        from helpers import free_port

        self.bindir = bindir
        self.port = free_port()
        self.user = _unprivileged_user()
        # in /tmp (not TMPDIR, which may be private to root): the server's user must reach it
        self.workdir = tempfile.mkdtemp(prefix="buntsession-pg-", dir="/tmp" if self.user else None)
        self.datadir = os.path.join(self.workdir, "data")
        if self.user is not None:
            shutil.chown(self.workdir, self.user)
        self.process: subprocess.Popen[bytes] | None = None
        subprocess.run([os.path.join(bindir, "initdb"), "-D", self.datadir, "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync", "--no-instructions"], user=self.user, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.workdir)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [os.path.join(self.bindir, "postgres"), "-D", self.datadir, "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.workdir}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200"],
            user=self.user, cwd=self.workdir,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run([os.path.join(self.bindir, "pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                                    str(self.port)], check=False)
            if ready.returncode == 0:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("postgres did not start")

    def stop(self) -> None:
        """A fast shutdown (SIGINT): clients are disconnected at once."""
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=30)
            self.process = None

    def processes(self) -> list[int]:
        """The postmaster and its children (each backend is a session of its own: no process group has all)."""
        assert self.process is not None
        found = [self.process.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    found.append(int(entry.name))
        return found

    def signal_all(self, number: int) -> None:
        """Send a signal (SIGSTOP: a stalled server; SIGCONT) to the postmaster and every child."""
        for pid in self.processes():
            try:
                os.kill(pid, number)
            except ProcessLookupError:
                pass

    def psql(self, sql: str) -> str:
        done = subprocess.run([os.path.join(self.bindir, "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                               "postgres", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql],
                              capture_output=True, text=True, check=True)
        return done.stdout.strip()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = postgres_bin()
    if bindir is None:
        reason = "PostgreSQL is not installed (Debian: apt-get install postgresql); .ci/run installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    server = PostgresServer(bindir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the test item, so fixtures can tell a failed test (screenshots)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
