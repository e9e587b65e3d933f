"""Private Redis instances for tests: a three-master Redis Cluster (``redis-cli --cluster
create``) and a Sentinel-managed master with a replica and three Sentinels, each on free ports
in a test's temporary directory, stopped (whole process group) on exit."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.e2e.servers import free_port

# Short Sentinel timeouts, so that a failover takes about a second or two.
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 2000
SERVICE = "mg"


@dataclass
class Instance:
    """One ``redis-server`` process (a data node or a Sentinel)."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP until exit: the process hangs, its port still accepts connections."""
        os.killpg(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to hand anything over."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _wait(condition: object, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached after {timeout} s")
        time.sleep(0.05)


@contextmanager
def redis_server(directory: Path, *arguments: str, config: str = "") -> Iterator[Instance]:
    """``redis-server`` on a free port, persisting nothing, until exit; ``config``: its
    configuration file's lines (a Sentinel's ``sentinel monitor``..., with ``--sentinel`` among
    ``arguments``); ``directory`` holds its files."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config_file = directory / f"redis-{port}.conf"  # a Sentinel rewrites its configuration file
    config_file.write_text(config)
    process = subprocess.Popen(
        [
            "redis-server",
            str(config_file),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
            *arguments,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    instance = Instance(port, process)
    try:
        _wait(lambda: process.poll() is None and instance.client().ping(), f"redis on {port}")
        yield instance
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                instance.kill()


@contextmanager
def redis_cluster(directory: Path, masters: int = 3) -> Iterator[list[Instance]]:
    """A Redis Cluster of ``masters`` masters and no replicas, made by ``redis-cli --cluster
    create``; yields its nodes once every one says the cluster is ok."""
    with ExitStack() as stack:
        nodes = [
            stack.enter_context(
                redis_server(
                    directory / f"node{index}",
                    "--cluster-enabled",
                    "yes",
                    # The bus port, on a free port too (port + 10000 may not be).
                    "--cluster-port",
                    str(free_port()),
                    "--cluster-node-timeout",
                    "2000",
                )
            )
            for index in range(masters)
        ]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(node.address for node in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
        )
        for node in nodes:
            _wait(
                lambda node=node: (
                    node.client().cluster("info")["cluster_state"] == "ok"
                    and len(node.client().cluster("nodes")) == masters
                ),
                f"cluster state ok on {node.address}",
            )
        yield nodes


def cluster_url(nodes: list[Instance]) -> str:
    """The ``limits`` Cluster URL naming the nodes (two are enough to find the rest)."""
    return "redis+cluster://" + ",".join(node.address for node in nodes[:2])


@dataclass
class Sentinels:
    """A master, its replica and three Sentinels watching them as ``SERVICE``."""

    master: Instance
    replica: Instance
    sentinels: list[Instance]

    @property
    def url(self) -> str:
        """The ``limits`` Sentinel URL."""
        return "redis+sentinel://" + ",".join(s.address for s in self.sentinels) + "/" + SERVICE

    def master_port(self) -> int:
        """The master's port as the Sentinels report it."""
        _host, port = self.sentinels[0].client().sentinel_get_master_addr_by_name(SERVICE)
        return int(port)


@contextmanager
def redis_sentinels(directory: Path, failover_ready: bool = True) -> Iterator[Sentinels]:
    """A master and a replica, watched by three Sentinels (quorum 2) that call the master down
    after ``DOWN_AFTER_MS`` and promote the replica. ``failover_ready``: wait until each
    Sentinel knows its peers (a few seconds), without which they cannot fail over."""
    with ExitStack() as stack:
        master = stack.enter_context(redis_server(directory / "master"))
        replica = stack.enter_context(
            redis_server(directory / "replica", "--replicaof", "127.0.0.1", str(master.port))
        )
        _wait(
            lambda: replica.client().info("replication")["master_link_status"] == "up",
            "replica in sync",
        )
        sentinels = [
            stack.enter_context(
                redis_server(
                    directory / f"sentinel{index}",
                    "--sentinel",
                    config=(
                        f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 2\n"
                        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                        f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                    ),
                )
            )
            for index in range(3)
        ]
        group = Sentinels(master, replica, sentinels)
        # Every Sentinel knows the replica and the other Sentinels before a failover is tried.
        for sentinel in sentinels if failover_ready else []:
            _wait(
                lambda sentinel=sentinel: (
                    (state := sentinel.client().sentinel_master(SERVICE))["num-slaves"] >= 1
                    and state["num-other-sentinels"] >= 2
                ),
                f"sentinel {sentinel.address} sees the replica and its peers",
            )
        yield group
