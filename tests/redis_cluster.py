"""A real Redis Cluster for the tests: redis-server processes with cluster mode on, joined
by ``redis-cli --cluster create``, three primaries and a replica each by default."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import Proc, _redis_ping, free_port, wait_until

NODE_TIMEOUT_MS = 1000  # how long a primary is unreachable before its replica is promoted


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=30).stdout.strip()


@dataclass
class Node:
    port: int
    bus: int  # the cluster bus port (CLUSTER MEET names it)
    proc: Proc


@dataclass
class Cluster:
    workdir: Path
    nodes: list[Node] = field(default_factory=list)

    def start_node(self, *extra: str) -> Node:
        """A cluster-enabled redis-server on a port picked here; a port taken meanwhile by
        another process makes it exit at once, and it is started again on another."""
        for _ in range(5):
            port, bus = free_port(), free_port()
            # A directory of its own: a port an earlier node of the session had leaves that
            # node's nodes.conf, which would make this one part of the old cluster.
            data = Path(tempfile.mkdtemp(prefix=f"cluster-node-{port}-", dir=self.workdir))
            proc = Proc("redis-server", [shutil.which("redis-server") or "redis-server", "--port", str(port),
                                         "--cluster-port", str(bus), "--bind", "127.0.0.1", "--dir", str(data),
                                         "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                         "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--save", "",
                                         "--appendonly", "no", *extra], data / "redis.log").start()
            try:
                proc.wait_ready(lambda: _redis_ping(port))
            except RuntimeError:
                if "Address already in use" in proc.log_text():
                    continue
                raise
            node = Node(port, bus, proc)
            self.nodes.append(node)
            return node
        raise RuntimeError("no free ports for a cluster node after 5 tries")

    def create(self, primaries: int = 3, replicas: int = 1) -> "Cluster":
        for _ in range(primaries * (1 + replicas)):
            self.start_node()
        made = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                               "--cluster-replicas", str(replicas), "--cluster-yes"],
                              capture_output=True, text=True, timeout=60)
        if made.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {made.stdout}\n{made.stderr}")
        wait_until(self.healthy, timeout=60, what="the cluster's slots covered and its replicas in sync")
        return self

    def healthy(self) -> bool:
        alive = [n for n in self.nodes if n.proc.popen is not None and n.proc.popen.poll() is None]
        if not all("cluster_state:ok" in cli(n.port, "CLUSTER", "INFO") for n in alive):
            return False
        return all("master_link_status:up" in info for info in (cli(n.port, "INFO", "replication") for n in alive)
                   if "role:slave" in info)

    @property
    def seed(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def seeds(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[1:])

    def primaries(self) -> list[int]:
        """The ports of the primaries, as a live node's slot map has them."""
        for node in self.nodes:
            if node.proc.popen is not None and node.proc.popen.poll() is None:
                found = set()
                for line in cli(node.port, "CLUSTER", "NODES").splitlines():
                    parts = line.split()
                    if "master" in parts[2] and "fail" not in parts[2] and len(parts) > 8:
                        found.add(int(parts[1].split("@")[0].rsplit(":", 1)[1]))
                return sorted(found)
        return []

    def owner(self, key: str) -> int:
        """The port of the primary that holds this key's slot now."""
        slot = int(cli(self.primaries()[0], "CLUSTER", "KEYSLOT", key))
        for node in self.nodes:
            if node.proc.popen is None or node.proc.popen.poll() is not None:
                continue
            for line in cli(node.port, "CLUSTER", "NODES").splitlines():
                parts = line.split()
                if "myself" in parts[2] and "master" in parts[2]:
                    for r in parts[8:]:
                        low, _, high = r.partition("-")
                        if r[0].isdigit() and int(low) <= slot <= int(high or low):
                            return node.port
        raise RuntimeError(f"no primary holds the slot of {key!r}")

    def node(self, port: int) -> Node:
        (found,) = [n for n in self.nodes if n.port == port]
        return found

    def kill(self, port: int) -> None:
        self.node(port).proc.popen.kill()  # type: ignore[union-attr]
        self.node(port).proc.popen.wait()  # type: ignore[union-attr]

    def wait_promoted(self, dead: int, timeout: float = 60) -> float:
        """Wait until another primary holds the dead primary's slots; the time it took."""
        start = time.monotonic()
        wait_until(lambda: dead not in self.primaries() and self.covered(), timeout=timeout,
                   what="a replica promoted in the dead primary's place")
        return time.monotonic() - start

    def covered(self) -> bool:
        alive = [n for n in self.nodes if n.proc.popen is not None and n.proc.popen.poll() is None]
        return all("cluster_state:ok" in cli(n.port, "CLUSTER", "INFO") for n in alive)

    def stop(self) -> None:
        for node in self.nodes:
            node.proc.stop()
