"""A real local Redis Cluster for tests: N primaries (plus replicas), started on free ports, torn down after.

Each node gets its own free client port and its own free cluster-bus port (`--cluster-port`: the default
port + 10000 can be taken, or beyond 65535). A binary without cluster support fails the test with a clear
message; it never skips.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.support import free_port

#: Sharded pub/sub (SSUBSCRIBE/SPUBLISH) and --cluster-port appeared in Redis 7.0.
MIN_VERSION = (7, 0)


class ClusterUnavailable(RuntimeError):
    """This machine cannot run a local Redis Cluster (binary missing, too old, or cluster mode refused)."""


def check_binaries() -> None:
    """Raise ClusterUnavailable with a line saying what to install, when redis-server/redis-cli cannot do this."""
    for exe in ("redis-server", "redis-cli"):
        if shutil.which(exe) is None:
            raise ClusterUnavailable(f"{exe} not found on PATH: install Redis >= 7.0 (apt-get install redis-server)")
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout
    try:
        ver = out.split("v=", 1)[1].split()[0]
        major, minor = (int(x) for x in ver.split(".")[:2])
    except (IndexError, ValueError):
        raise ClusterUnavailable(f"cannot tell the version of redis-server from {out!r}") from None
    if (major, minor) < MIN_VERSION:
        raise ClusterUnavailable(f"redis-server {ver} lacks sharded pub/sub: the cluster tests need Redis >= 7.0")


@dataclass
class Node:
    port: int
    bus_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1)


class LocalCluster:
    """`primaries` masters, each with `replicas` replicas; `url` names one node, as REDIS_URL does."""

    def __init__(self, tmp: Path, primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 1000) -> None:
        self.tmp = tmp
        self.n_primaries = primaries
        self.n_replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes = [Node(free_port(), free_port()) for _ in range(primaries * (1 + replicas))]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> None:
        check_binaries()
        for node in self.nodes:
            d = self.tmp / f"node-{node.port}"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / "redis.log", "wb") as log:  # the child keeps its own copy of the descriptor
                node.proc = subprocess.Popen(
                    ["redis-server", "--port", str(node.port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-port", str(node.bus_port), "--cluster-config-file", f"nodes-{node.port}.conf",
                     "--cluster-node-timeout", str(self.node_timeout_ms), "--save", "", "--appendonly", "no",
                     "--dir", str(d)],
                    stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            self._wait_ping(node, deadline)
        res = subprocess.run(
            ["redis-cli", "--cluster", "create", *[n.addr for n in self.nodes],
             "--cluster-replicas", str(self.n_replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout, check=False)
        if res.returncode != 0:
            self.stop()
            raise ClusterUnavailable(f"redis-cli --cluster create failed: {(res.stdout + res.stderr)[-600:]}")
        self.wait_ok(deadline - time.monotonic())
        if self.n_replicas:
            self._wait_replicas_synced(deadline)

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()

    def _wait_ping(self, node: Node, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not node.alive:
                log = (self.tmp / f"node-{node.port}" / "redis.log").read_text(errors="replace")[-600:]
                raise ClusterUnavailable(f"redis-server refused to start in cluster mode: {log}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", node.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise ClusterUnavailable(f"redis-server on port {node.port} did not answer")

    # -- state ------------------------------------------------------------------------------------------------
    def live_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def _info(self, node: Node, section: str) -> dict[str, str]:
        c = node.client()
        try:
            raw = c.execute_command("CLUSTER INFO") if section == "cluster" else c.execute_command("INFO", section)  # type: ignore[no-untyped-call]
        finally:
            c.close()
        if isinstance(raw, dict):  # redis-py parses both replies into dicts of typed values
            return {str(k): str(v) for k, v in raw.items()}
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def primary_ports(self) -> list[int]:
        """Ports of the live primaries, as the cluster itself sees them."""
        out = []
        for node in self.live_nodes():
            with contextlib.suppress(redis.RedisError):
                if self._info(node, "replication").get("role") == "master":
                    out.append(node.port)
        return out

    def owner_of(self, key: str) -> Node:
        """The live node that serves `key`'s slot now (asked of every live node until one answers)."""
        last: Exception | None = None
        for node in self.live_nodes():
            c = node.client()
            try:
                slot = int(c.execute_command("CLUSTER KEYSLOT", key))  # type: ignore[no-untyped-call]
                for start, end, primary, *_ in c.execute_command("CLUSTER SLOTS"):  # type: ignore[no-untyped-call]
                    if start <= slot <= end:
                        port = int(primary[1])
                        return next(n for n in self.nodes if n.port == port)
            except (redis.RedisError, StopIteration) as exc:
                last = exc
            finally:
                c.close()
        raise RuntimeError(f"no live node knows the owner of {key!r}: {last}")

    def wait_ok(self, timeout: float = 15.0) -> None:
        """Until every live node reports `cluster_state:ok` and agrees on who serves each slot."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                states = [self._info(n, "cluster") for n in self.live_nodes()]
                if all(s.get("cluster_state") == "ok" and s.get("cluster_slots_ok") == "16384" for s in states):
                    views = set()
                    for n in self.live_nodes():
                        c = n.client()
                        try:
                            views.add(tuple(sorted((int(s), int(e), int(p[1]))
                                                   for s, e, p, *_ in c.execute_command("CLUSTER SLOTS"))))  # type: ignore[no-untyped-call]
                        finally:
                            c.close()
                    if len(views) == 1:
                        return
                    last = f"nodes disagree on the slot map: {views}"
                else:
                    last = str([s.get("cluster_state") for s in states])
            except redis.RedisError as exc:
                last = str(exc)
            time.sleep(0.05)
        raise RuntimeError(f"cluster not ok after {timeout:.0f} s: {last}")

    def _wait_replicas_synced(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            infos = [self._info(n, "replication") for n in self.nodes]
            replicas = [i for i in infos if i.get("role") == "slave"]
            if len(replicas) == self.n_primaries * self.n_replicas and \
                    all(i.get("master_link_status") == "up" for i in replicas):
                return
            time.sleep(0.05)
        raise RuntimeError("replicas did not sync with their primaries")

    def flushall(self) -> None:
        for port in self.primary_ports():
            c = next(n for n in self.nodes if n.port == port).client()
            try:
                c.flushall()
            finally:
                c.close()

    def kill(self, node: Node) -> None:
        """SIGKILL: no goodbye to the cluster bus, as a crashed host would do."""
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()

    def wait_failover(self, old: Node, key: str, timeout: float = 20.0) -> Node:
        """Until a live replica has taken over `key`'s slot from the dead `old` primary, and the cluster is ok."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                owner = self.owner_of(key)
                if owner is not old and owner.alive:
                    self.wait_ok(max(0.1, deadline - time.monotonic()))
                    return owner
            time.sleep(0.05)
        raise RuntimeError(f"no failover of {old.addr} within {timeout:.0f} s")
