"""The local cache and its invalidation, with two sidecar replicas on one real Redis.

A change made through either replica's admin API, or written straight into Redis, must
be enforced by the other replica at once (target: 100 ms at p99), and cache hits must not touch Redis.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
import redis

from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from tests import harness
from tests.harness import MASTER_KEY, Sidecar, check_request, http, wait_until

# The target is 100 ms at p99 (measured here: a few ms, printed by the test); the bound
# asserted is wide enough for a loaded 2-core CI machine and still far below what a
# missed invalidation would cost (the negative TTL is 5 s, a cached record stays until evicted).
REVOCATION_TARGET_P99_MS = 100.0
REVOCATION_BOUND_MS = 1000.0


class Replica:
    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.channel = grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}")
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def check(self, key: str, model: str = "gpt-4") -> str:
        """'allow' or the deny code."""
        body = json.dumps({"model": model}).encode()
        resp = self.stub.Check(check_request({"authorization": f"Bearer {key}"}, body), timeout=5)
        if resp.status.code == 0:
            return "allow"
        return json.loads(resp.denied_response.body)["error"]["code"]

    def admin(self, path: str, body: object) -> dict:
        r = http("POST", self.sidecar.admin + path, body, {"Authorization": f"Bearer {MASTER_KEY}"})
        assert r.status == 200, r.text
        return r.json()

    def channel_ups(self) -> int:
        """Read from the process itself: a log tail can be pushed away by other lines."""
        return http("GET", self.sidecar.admin + "/health/readiness").json()["cache"]["times_trusted"]


@pytest.fixture(scope="module")
def replicas(workdir: Path, config_path: Path, redis_port: int) -> Iterator[tuple[Replica, Replica]]:
    url = f"redis://127.0.0.1:{redis_port}/0"
    a, b = harness.start_sidecar(workdir, config_path, url), harness.start_sidecar(workdir, config_path, url)
    pair = Replica(a), Replica(b)
    try:
        for replica in pair:
            wait_until(lambda: replica.channel_ups() >= 1)
        yield pair
    finally:
        for replica in pair:
            replica.channel.close()
            replica.sidecar.proc.stop()


@pytest.fixture(scope="module")
def raw_redis(redis_port: int) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_port)
    yield client
    client.close()


def get_calls(raw: redis.Redis) -> int:
    return raw.info("commandstats").get("cmdstat_get", {}).get("calls", 0)


def test_cache_hits_do_not_touch_redis(replicas: tuple[Replica, Replica], raw_redis: redis.Redis) -> None:
    a, b = replicas
    team = a.admin("/team/new", {"models": ["gpt-4"]})["team_id"]
    key = a.admin("/key/generate", {"team_id": team})["key"]
    before = get_calls(raw_redis)
    assert b.check(key) == "allow"
    assert get_calls(raw_redis) - before == 2  # cold: the key, then its team
    before = get_calls(raw_redis)
    for _ in range(200):
        assert b.check(key) == "allow"
    assert get_calls(raw_redis) == before


def test_unknown_keys_are_cached_briefly_and_creation_invalidates_them(
        replicas: tuple[Replica, Replica], raw_redis: redis.Redis) -> None:
    a, b = replicas
    unknown = "sk-not-yet-issued-0001"
    before = get_calls(raw_redis)
    for _ in range(200):
        assert b.check(unknown) == "invalid_api_key"
    assert get_calls(raw_redis) - before == 1
    a.admin("/key/generate", {"key": unknown, "models": ["gpt-4"]})
    wait_until(lambda: b.check(unknown) == "allow", timeout=REVOCATION_BOUND_MS / 1000)


def measure(b: Replica, key: str, change: Callable[[], object], expected: str) -> float:
    """Milliseconds from the change being acknowledged to replica b enforcing it."""
    change()
    done = time.perf_counter()
    while b.check(key) != expected:
        assert time.perf_counter() - done < 5, "never enforced"
    return (time.perf_counter() - done) * 1000


def revocation_samples(a: Replica, b: Replica, raw_block: Callable[[dict], object],
                       rounds: int = 20) -> dict[str, list[float]]:
    """Milliseconds until replica b enforces each kind of change made through replica a's
    admin API (or by ``raw_block``, straight into Redis), ``rounds`` times each."""
    samples: dict[str, list[float]] = {}

    def fresh_key(**fields: object) -> dict:
        created = a.admin("/key/generate", {"models": ["gpt-4"], **fields})
        for _ in range(2):
            assert b.check(created["key"]) == "allow"  # now cached on b
        return created

    for _ in range(rounds):
        k = fresh_key()
        samples.setdefault("/key/block", []).append(
            measure(b, k["key"], lambda: a.admin("/key/block", {"key": k["key"]}), "key_blocked"))
        k = fresh_key()
        samples.setdefault("/key/delete", []).append(
            measure(b, k["key"], lambda: a.admin("/key/delete", {"keys": [k["key"]]}), "invalid_api_key"))
        k = fresh_key()
        samples.setdefault("/key/update", []).append(
            measure(b, k["key"], lambda: a.admin("/key/update", {"key": k["key"], "models": ["gpt-4o"]}),
                    "model_not_allowed"))
        team = a.admin("/team/new", {"models": ["gpt-4"]})["team_id"]
        k = fresh_key(team_id=team)
        samples.setdefault("/team/update", []).append(
            measure(b, k["key"], lambda: a.admin("/team/update", {"team_id": team, "models": ["gpt-4o"]}),
                    "model_not_allowed"))
        k = fresh_key()
        samples.setdefault("redis SET", []).append(measure(b, k["key"], lambda: raw_block(k), "key_blocked"))
    return samples


def assert_enforced_in_time(samples: dict[str, list[float]], where: str) -> None:
    every = sorted(ms for values in samples.values() for ms in values)
    p99 = every[int(len(every) * 0.99) - 1]
    report = {op: f"p50 {statistics.median(v):.2f} ms, max {max(v):.2f} ms" for op, v in samples.items()}
    print(f"\n{where}: revocation on the other replica, {len(every)} changes: p99 {p99:.2f} ms "
          f"(target {REVOCATION_TARGET_P99_MS:.0f} ms); {report}")
    assert p99 <= REVOCATION_BOUND_MS, report


def test_revocation_reaches_the_other_replica_at_once(
        replicas: tuple[Replica, Replica], raw_redis: redis.Redis) -> None:
    def raw_block(created: dict) -> None:
        redis_key = f"extauthz:key:{created['token']}"
        doc = json.loads(raw_redis.get(redis_key))
        raw_redis.set(redis_key, json.dumps({**doc, "blocked": True}))

    assert_enforced_in_time(revocation_samples(*replicas, raw_block), "standalone")


def test_lost_invalidation_channel_flushes_and_recovers(
        replicas: tuple[Replica, Replica], raw_redis: redis.Redis) -> None:
    a, b = replicas
    created = a.admin("/key/generate", {"models": ["gpt-4"]})
    assert b.check(created["key"]) == "allow"
    ups = b.channel_ups()
    # Cut every subscriber connection, the way a network blip or a Redis failover would.
    subprocess.run(["redis-cli", "-p", str(raw_redis.connection_pool.connection_kwargs["port"]),
                    "CLIENT", "KILL", "TYPE", "pubsub"], check=True, capture_output=True)
    redis_key = f"extauthz:key:{created['token']}"
    raw_redis.set(redis_key, json.dumps({**json.loads(raw_redis.get(redis_key)), "blocked": True}))
    # Whether or not b noticed yet, it must not answer from what it cached before the change.
    wait_until(lambda: b.check(created["key"]) == "key_blocked", timeout=2)
    wait_until(lambda: b.channel_ups() > ups)
    before = get_calls(raw_redis)
    for _ in range(50):
        assert b.check(created["key"]) == "key_blocked"
    assert get_calls(raw_redis) - before == 1  # cached again once the channel is back


def test_a_quiet_invalidation_channel_is_not_timed_out() -> None:
    """The subscriber may wait for minutes between messages; only the heartbeat on the
    tracking connection has a deadline (a read timeout here once flushed the cache every 5 s)."""
    from extauthz.records.cache import RecordCache
    from extauthz.records.invalidation import Invalidator

    invalidator = Invalidator("redis://127.0.0.1:1/0", ("p:",), RecordCache(10, 1.0), 0.25)
    assert invalidator.pool.make_connection().socket_timeout is None
