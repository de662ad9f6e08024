"""Redis Sentinel with real processes: a primary, a replica and three sentinels. The primary
is killed under steady Check load: every answer during the failover is the right decision
or 503 authz_unavailable, never an allow the state forbids; a key blocked before the kill
is still blocked after the promotion; the sidecar serves again, writes go to the new
primary and revocations reach the cache through it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness import Proc, Sidecar, free_port, start_sidecar, wait_until
from tests.test_redis_connection import ROOT, admin, checked, metric_value

MASTER = "mymaster"


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10).stdout.strip()


def redis_proc(workdir: Path, name: str, *args: str) -> Proc:
    data = workdir / f"sentinel-test-{name}-{free_port()}"
    data.mkdir()
    return Proc(name, [shutil.which("redis-server") or "redis-server", *args, "--dir", str(data)],
                data / "redis.log").start()


class Cell:
    def __init__(self, workdir: Path) -> None:
        self.primary_port, self.replica_port = free_port(), free_port()
        common = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
        self.primary = redis_proc(workdir, "primary", "--port", str(self.primary_port), *common)
        self.replica = redis_proc(workdir, "replica", "--port", str(self.replica_port), *common,
                                  "--replicaof", "127.0.0.1", str(self.primary_port))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels = []
        for port in self.sentinel_ports:
            conf = workdir / f"sentinel-{port}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} 1000\n"
                            f"sentinel failover-timeout {MASTER} 10000\n")
            self.sentinels.append(redis_proc(workdir, "sentinel", str(conf), "--sentinel"))

    def primary_now(self) -> int | None:
        answer = cli(self.sentinel_ports[0], "SENTINEL", "get-master-addr-by-name", MASTER).split()
        return int(answer[1]) if len(answer) == 2 else None

    def ready(self) -> bool:
        """The replica in sync, and every sentinel knowing it and the two others. A sentinel
        learns of replicas from the primary's INFO (every 10 s): one elected leader after the
        primary is gone without having learned of the replica aborts every failover
        ("-failover-abort-no-good-slave"), as seen once in a loaded CI run."""
        if "master_link_status:up" not in cli(self.replica_port, "INFO", "replication"):
            return False
        return all(str(self.replica_port) in cli(port, "SENTINEL", "replicas", MASTER)
                   and cli(port, "SENTINEL", "sentinels", MASTER).count("127.0.0.1") >= 2
                   for port in self.sentinel_ports)

    def stop(self) -> None:
        for proc in (*self.sentinels, self.replica, self.primary):
            proc.stop()


@pytest.fixture()
def cell(workdir: Path) -> Iterator[Cell]:
    found = Cell(workdir)
    try:
        wait_until(lambda: found.primary_now() == found.primary_port and found.ready(), timeout=60,
                   what="the sentinels agreeing on the primary and its replica")
        yield found
    finally:
        found.stop()


def sentinel_sidecar(workdir: Path, config_path: Path, found: Cell, extra: dict[str, str] | None = None) -> Sidecar:
    env = {"EXTAUTHZ_REDIS_MODE": "sentinel", "EXTAUTHZ_REDIS_URL": "redis://primary-from-sentinels/0",
           "EXTAUTHZ_REDIS_SENTINELS": ",".join(f"127.0.0.1:{p}" for p in found.sentinel_ports), **(extra or {})}
    return start_sidecar(workdir, config_path, env["EXTAUTHZ_REDIS_URL"], env)


@pytest.mark.parametrize("cache", ["on", "off"])
def test_a_failover_allows_nothing_the_state_forbids(workdir: Path, config_path: Path, cell: Cell, cache: str) -> None:
    # Cache off: every check reads Redis through the failover, where a read that cannot
    # be trusted must be a 503, never "no such key" (401) for a key the replica holds.
    side = sentinel_sidecar(workdir, config_path, cell, {"EXTAUTHZ_CACHE_MAX_ENTRIES": "0"} if cache == "off" else {})
    try:
        wait_until(lambda: admin(side, "/health/readiness", method="GET").status == 200, what="readiness")
        ready = admin(side, "/health/readiness", method="GET").json()
        assert ready["redis_mode"] == "sentinel" and MASTER in ready["redis_endpoint"]
        assert ready["redis_primary"] == f"127.0.0.1:{cell.primary_port}"
        allowed = admin(side, "/key/generate", {"models": ["gpt-4"]}).json()["key"]
        blocked = admin(side, "/key/generate", {"models": ["gpt-4"]}).json()["key"]
        assert admin(side, "/key/block", {"key": blocked}).status == 200
        assert checked(side, allowed) == (200, "ok") and checked(side, blocked) == (401, "key_blocked")
        # The writes reached the replica (what asynchronous replication can lose is what it has not).
        assert cli(cell.primary_port, "WAIT", "1", "5000") == "1"

        answers: dict[str, list[tuple[int, str]]] = {"allowed": [], "blocked": []}
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                for name, key in (("allowed", allowed), ("blocked", blocked)):
                    try:
                        answers[name].append(checked(side, key))
                    except Exception as e:  # noqa: BLE001 (a gRPC error is an answer too: recorded)
                        answers[name].append((0, type(e).__name__))
                time.sleep(0.005)

        if cache == "on":  # (the invalidation channel, which the metric is of, serves a cache)
            wait_until(lambda: f'address="127.0.0.1:{cell.primary_port}"}} 1.0' in metric_value(
                side, "extauthz_redis_primary"), what="the metric naming the primary")
        thread = threading.Thread(target=load)
        thread.start()
        try:
            time.sleep(0.5)
            os.kill(cell.primary.popen.pid, signal.SIGKILL)
            killed = time.monotonic()
            wait_until(lambda: cell.primary_now() == cell.replica_port, timeout=60, what="the promotion")
            promoted = time.monotonic()
            wait_until(lambda: answers["allowed"][-1] == (200, "ok") and admin(
                side, "/health/readiness", method="GET").status == 200, timeout=30, what="service again")
            back = time.monotonic()
        finally:
            stop.set()
            thread.join()
        assert set(answers["allowed"]) <= {(200, "ok"), (503, "authz_unavailable")}, set(answers["allowed"])
        assert set(answers["blocked"]) <= {(401, "key_blocked"), (503, "authz_unavailable")}, set(answers["blocked"])
        assert (401, "key_blocked") in answers["blocked"][-5:]
        print(f"promotion {promoted - killed:.1f} s after the kill; service {back - promoted:.1f} s after it")
        assert admin(side, "/health/readiness", method="GET").json()["redis_primary"] == \
            f"127.0.0.1:{cell.replica_port}"
        if cache == "on":  # The metric names the primary tracked now, and no longer the old one.
            wait_until(lambda: f'address="127.0.0.1:{cell.replica_port}"}} 1.0' in metric_value(
                side, "extauthz_redis_primary"), what="the metric naming the new primary")
            assert f'address="127.0.0.1:{cell.primary_port}"}} 0.0' in metric_value(side, "extauthz_redis_primary")
        # The new primary takes writes, and its changes reach the cache.
        assert admin(side, "/key/block", {"key": allowed}).status == 200
        wait_until(lambda: checked(side, allowed) == (401, "key_blocked"), what="a block after the failover")
        assert admin(side, "/key/generate", {}).status == 200
    finally:
        side.proc.stop()


def test_admin_writes_say_whether_a_replica_has_them(workdir: Path, config_path: Path, cell: Cell) -> None:
    """redis_wait_replicas: 1. Acknowledged, 200; the replica gone, the write is committed on
    the primary only and answered 202, with the count in a header."""
    env = {"EXTAUTHZ_REDIS_MODE": "sentinel", "EXTAUTHZ_REDIS_URL": "redis://primary-from-sentinels/0",
           "EXTAUTHZ_REDIS_SENTINELS": ",".join(f"127.0.0.1:{p}" for p in cell.sentinel_ports),
           "EXTAUTHZ_REDIS_WAIT_REPLICAS": "1", "EXTAUTHZ_REDIS_WAIT_TIMEOUT_MS": "300"}
    side = start_sidecar(workdir, config_path, env["EXTAUTHZ_REDIS_URL"], env)
    try:
        r = admin(side, "/key/generate", {"models": ["gpt-4"]})
        assert r.status == 200 and r.headers["x-extauthz-replicas-acknowledged"] == "1/1", r.text
        key = r.json()["key"]
        cell.replica.stop()
        r = admin(side, "/key/block", {"key": key})
        assert r.status == 202 and r.headers["x-extauthz-replicas-acknowledged"] == "0/1"
        assert r.json()["blocked"] is True
        assert checked(side, key) == (401, "key_blocked")          # committed on the primary
        assert "x-extauthz-replicas-acknowledged" not in admin(side, "/key/info?key=" + key, method="GET").headers
    finally:
        side.proc.stop()


def test_sentinel_settings_that_cannot_work_stop_the_start(config_path: Path) -> None:
    env = {"EXTAUTHZ_REDIS_MODE": "sentinel", "EXTAUTHZ_REDIS_URL": "redis://x/0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "extauthz", "check-config", "--config", str(config_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 1 and "redis_mode sentinel needs redis_sentinels" in out.stdout
    env = {**env, "EXTAUTHZ_REDIS_MODE": "standalone", "EXTAUTHZ_REDIS_SENTINELS": "127.0.0.1:26379"}
    out = subprocess.run([sys.executable, "-m", "extauthz", "check-config", "--config", str(config_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 1 and "redis_sentinels set, but redis_mode is not sentinel" in out.stdout
