"""A Redis Cluster of three masters on loopback, for the tests and the stores benchmark: started from Debian's
redis-server and joined by `redis-cli --cluster create`; nodes can be stopped and started again."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time

import redis


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
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.exceptions.ConnectionError:
        return False
