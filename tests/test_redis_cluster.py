"""Redis Cluster with real processes: three primaries with a replica each, two sidecar
replicas (and an Envoy where usage reports matter) in ``redis_mode: cluster``.

The keyspace puts every record, index and the audit trail in one slot and each caller's
counters in its scope's slot (records/keyspace.py); these tests check what that must
keep: admin writes and listings as in standalone, limits counted once across slots,
revocation on the other replica at once, a primary killed under load (the right answer
or 503, never an allow the state forbids), a new primary and a moved slot tracked.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from extauthz.records.keyspace import Keyspace
from extauthz.domain.budgets import SpendCounter
from extauthz.usage.counters import OVER, RateCounters, Settlement
from extauthz.domain.limits import scope
from tests.conftest import Gateway
from tests.harness import MASTER_KEY, http, start_sidecar, start_stack, wait_until
from tests.redis_cluster import Cluster, cli
from tests.test_budgets import call, spend_of
from tests.test_redis_connection import ROOT, metric_value
from tests.test_cache_invalidation import (REVOCATION_BOUND_MS, Replica, assert_enforced_in_time, measure,
                                          revocation_samples)
from tests.test_usage import wait_for

RECORDS = "{extauthz:}"


def cluster_env(cluster: Cluster) -> dict[str, str]:
    return {"EXTAUTHZ_REDIS_MODE": "cluster", "EXTAUTHZ_REDIS_CLUSTER_NODES": cluster.seeds()}


def readiness(replica: Replica) -> dict:
    return http("GET", replica.sidecar.admin + "/health/readiness").json()


def pair_on(workdir: Path, config_path: Path, cluster: Cluster) -> tuple[Replica, Replica]:
    a, b = (Replica(start_sidecar(workdir, config_path, cluster.seed, cluster_env(cluster))) for _ in range(2))
    for replica in (a, b):
        wait_until(lambda: readiness(replica)["redis_tracking"], what="tracking on every primary")
    return a, b


def stop_pair(pair: tuple[Replica, Replica]) -> None:
    for replica in pair:
        replica.channel.close()
        replica.sidecar.proc.stop()


def keys_on(port: int, pattern: str = "*") -> list[str]:
    return [k for k in cli(port, "--scan", "--pattern", pattern).splitlines() if k]


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[Cluster]:
    found = Cluster(workdir)
    try:
        yield found.create(primaries=3, replicas=1)
    finally:
        found.stop()


@pytest.fixture(scope="module")
def replicas(workdir: Path, config_path: Path, cluster: Cluster) -> Iterator[tuple[Replica, Replica]]:
    pair = pair_on(workdir, config_path, cluster)
    try:
        yield pair
    finally:
        stop_pair(pair)


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[redis.RedisCluster]:
    found = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    yield found
    found.close()


# -- the keyspace on a real cluster ---------------------------------------------------------

def test_records_share_one_slot_and_counters_spread_over_the_primaries(
        cluster: Cluster, replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    team = a.admin("/team/new", {"team_alias": "spread", "models": ["gpt-4"], "rpm_limit": 1000})["team_id"]
    keys = [a.admin("/key/generate", {"team_id": team, "rpm_limit": 100, "key_alias": f"spread-{i}"})
            for i in range(12)]
    for created in keys:
        assert b.check(created["key"]) == "allow"
    primaries = cluster.primaries()
    holding = {port: keys_on(port, RECORDS + "*") for port in primaries}
    (records_port,) = [port for port, found in holding.items() if found]  # one primary holds every record
    names = set(holding[records_port])
    assert {f"{RECORDS}key:{k['token']}" for k in keys} <= names
    assert {f"{RECORDS}team:{team}", f"{RECORDS}keys", f"{RECORDS}teams", f"{RECORDS}audit",
            f"{RECORDS}alias_of:spread-0", f"{RECORDS}team_keys:{team}"} <= names
    windows = {port: keys_on(port, "extauthz:rpm:{key:*") for port in primaries}
    assert sum(len(w) for w in windows.values()) == 12
    assert sum(1 for w in windows.values() if w) >= 2, windows  # 12 keys' windows, not on one primary
    # Admin reads as in standalone: listings, info with the counters of another slot, the trail.
    listed = http("GET", f"{a.sidecar.admin}/key/list?team_id={team}", None,
                  {"Authorization": f"Bearer {MASTER_KEY}"}).json()
    assert sorted(listed["keys"]) == sorted(k["token"] for k in keys) and listed["total_count"] == 12
    info = http("GET", f"{b.sidecar.admin}/key/info?key={keys[0]['key']}", None,
                {"Authorization": f"Bearer {MASTER_KEY}"}).json()["info"]
    assert info["rpm_used"] == 1 and info["key_alias"] == "spread-0"
    teams = http("GET", f"{b.sidecar.admin}/team/list", None, {"Authorization": f"Bearer {MASTER_KEY}"}).json()
    assert any(t["team_id"] == team and t["rpm_used"] == 12 for t in teams)
    trail = http("GET", f"{a.sidecar.admin}/audit?target={keys[3]['token']}", None,
                 {"Authorization": f"Bearer {MASTER_KEY}"}).json()
    assert [e["route"] for e in trail["entries"]] == ["/key/generate"]


def test_a_refusal_by_the_team_gives_back_what_the_key_took(
        cluster: Cluster, replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    for _ in range(20):  # a team whose counters live on another primary than the key's
        team = a.admin("/team/new", {"models": ["gpt-4"], "rpm_limit": 3})["team_id"]
        created = a.admin("/key/generate", {"team_id": team, "rpm_limit": 100})
        if cluster.owner(f"{{key:{created['token']}}}") != cluster.owner(f"{{team:{team}}}"):
            break
    else:
        pytest.fail("no key and team on two primaries in 20 tries")
    answers = [b.check(created["key"]) for _ in range(6)]
    assert answers == ["allow"] * 3 + ["rate_limit_exceeded"] * 3
    info = http("GET", f"{a.sidecar.admin}/key/info?key={created['key']}", None,
                {"Authorization": f"Bearer {MASTER_KEY}"}).json()["info"]
    assert info["rpm_used"] == 3  # the three refused took nothing from the key's window


def test_revocation_reaches_the_other_replica_at_once(
        replicas: tuple[Replica, Replica], client: redis.RedisCluster) -> None:
    def raw_block(created: dict) -> None:
        name = f"{RECORDS}key:{created['token']}"
        client.set(name, json.dumps({**json.loads(client.get(name)), "blocked": True}))

    assert_enforced_in_time(revocation_samples(*replicas, raw_block), "cluster")


def test_spend_is_settled_and_a_budget_enforced_through_envoy(
        workdir: Path, config_path: Path, upstream_port: int, cluster: Cluster) -> None:
    stack = start_stack(workdir, config_path, cluster.seed, cluster_env(cluster))
    try:
        gateway = Gateway(stack.envoy, upstream_port, stack.sidecar)
        team = gateway.new_team(models=["gpt-4"], max_budget=5)
        key = gateway.new_key(team_id=team, max_budget=0.1, key_alias="cluster-budgeted")
        assert call(gateway, key).status == 200
        wait_for(lambda: spend_of(gateway, key) == pytest.approx(0.06), "the first response's cost")
        assert call(gateway, key).status == 200  # 0.12 now: over
        wait_for(lambda: spend_of(gateway, key) == pytest.approx(0.12), "the second response's cost")
        wait_for(lambda: call(gateway, key, usage="0,0").status == 422, "the budget enforced")
        error = call(gateway, key).json()["error"]
        assert error["code"] == "budget_exceeded" and "Key='cluster-budgeted'" in error["message"]
        info = gateway.admin(f"/team/info?team_id={team}", method="GET").json()["team_info"]
        assert info["spend"] == pytest.approx(0.12)  # the team's counter, on its own slot, settled once each
    finally:
        stack.stop()


def test_an_acl_user_limited_to_the_prefixes_serves_and_invalidates(
        workdir: Path, config_path: Path, cluster: Cluster) -> None:
    """The ACL the README gives for a cluster: the counters' prefix and the records' tagged one."""
    password = "cluster-acl-pa55word"
    for node in cluster.nodes:
        assert cli(node.port, "ACL", "SETUSER", "extauthz-cluster", "on", f">{password}", "~extauthz:*",
                   "~{extauthz:}*", "&__redis__:invalidate", "+@all") == "OK"
    env = {**cluster_env(cluster), "EXTAUTHZ_REDIS_USERNAME": "extauthz-cluster", "EXTAUTHZ_REDIS_PASSWORD": password}
    pair = tuple(Replica(start_sidecar(workdir, config_path, cluster.seed, env)) for _ in range(2))
    try:
        a, b = pair
        for replica in pair:
            wait_until(lambda: readiness(replica)["redis_tracking"], what="tracking as the ACL user")
        team = a.admin("/team/new", {"models": ["gpt-4"], "rpm_limit": 100})["team_id"]
        key = a.admin("/key/generate", {"team_id": team, "rpm_limit": 100})
        assert b.check(key["key"]) == "allow"
        a.admin("/key/block", {"key": key["key"]})
        wait_until(lambda: b.check(key["key"]) == "key_blocked", timeout=REVOCATION_BOUND_MS / 1000)
        for replica in pair:
            assert password not in replica.sidecar.proc.log_text()
    finally:
        stop_pair(pair)  # type: ignore[arg-type]


def test_a_batch_of_reports_settles_each_once_whatever_its_slots(cluster: Cluster) -> None:
    """Reports without a scope (no usage, a JWT caller without a team) each get a mark of
    their own slot."""
    async def run() -> None:
        client = aioredis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        counters = RateCounters(client, Keyspace("extauthz:", cluster=True), 2.0)
        ks, ts = scope("key", "settle-test"), scope("team", "settle-team")
        spend = [SpendCounter(f"spend:{ks}", 0.1, None, None, None),
                 SpendCounter(f"spend:{ts}", 5.0, None, None, None)]
        batch = [Settlement("bare-1", 0, [], [], None), Settlement("bare-2", 0, [], [], None),
                 Settlement("priced", 10, [f"tpm:{ks}:1", f"tpm:{ts}:1"], [], 0.25, spend)]
        assert await counters.settle(batch) == [[], [], [OVER, 0]]
        assert await counters.settle(batch) == [None, None, None]  # Envoy resending the same reports
        assert float(await client.get(f"extauthz:spend:{{{ks}}}")) == pytest.approx(0.25)
        assert float(await client.get(f"extauthz:spend:{{{ts}}}")) == pytest.approx(0.25)
        assert int(await client.get(f"extauthz:tpm:{{{ts}}}:1")) == 10
        await client.aclose()
    asyncio.run(run())


def test_no_cluster_to_reach_is_a_503_not_an_error(workdir: Path, config_path: Path) -> None:
    env = {"EXTAUTHZ_REDIS_MODE": "cluster", "EXTAUTHZ_REDIS_CLUSTER_NODES": "127.0.0.1:2"}
    side = start_sidecar(workdir, config_path, "redis://127.0.0.1:1", env)
    try:
        assert Replica(side).check("sk-any-key") == "authz_unavailable"
        assert http("GET", side.admin + "/health/readiness").status == 503
        r = http("POST", side.admin + "/key/generate", {}, {"Authorization": f"Bearer {MASTER_KEY}"})
        assert r.status == 503 and r.json()["error"]["code"] == "store_unavailable"
        assert "Traceback" not in side.proc.log_text()
    finally:
        side.proc.stop()


# -- failover and topology changes -----------------------------------------------------------

class Load:
    """Checks sent without pause from a thread per (replica, key) until stopped; every
    answer with the time its check was sent (a check sent before a recovery may still
    answer 503 after it: it is the recovery's, not a flap after it)."""

    def __init__(self, pair: tuple[Replica, Replica], keys: dict[str, str]) -> None:
        self.answers: list[tuple[float, str, str]] = []   # (time, key name, answer)
        self.stopping = False
        self.threads = [threading.Thread(target=self.run, args=(r, name, key), daemon=True)
                        for r in pair for name, key in keys.items()]

    def run(self, replica: Replica, name: str, key: str) -> None:
        stub = Replica(replica.sidecar)  # a channel of its own
        while not self.stopping:
            sent = time.monotonic()
            try:
                answer = stub.check(key)
            except Exception as e:  # a gRPC error is an answer too: it must not happen
                answer = f"grpc error {type(e).__name__}"
            self.answers.append((sent, name, answer))
        stub.channel.close()

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping = True
        for t in self.threads:
            t.join(timeout=30)


def test_a_primary_killed_under_load_never_lets_a_blocked_key_through(
        workdir: Path, config_path: Path) -> None:
    cluster = Cluster(workdir).create(primaries=3, replicas=1)
    pair = pair_on(workdir, config_path, cluster)
    a, b = pair
    try:
        allowed = a.admin("/key/generate", {"models": ["gpt-4"]})
        blocked = a.admin("/key/generate", {"models": ["gpt-4"]})
        a.admin("/key/block", {"key": blocked["key"]})
        for replica in pair:
            wait_until(lambda: replica.check(blocked["key"]) == "key_blocked")
        records_primary = cluster.owner(RECORDS)
        for _ in range(40):  # a key with a limit whose window lives on the same primary: its checks need it
            limited = a.admin("/key/generate", {"models": ["gpt-4"], "rpm_limit": 10_000_000})
            if cluster.owner(f"{{key:{limited['token']}}}") == records_primary:
                break
        else:
            pytest.fail("no key's counters on the records' primary in 40 tries")
        with Load(pair, {"allowed": allowed["key"], "blocked": blocked["key"], "limited": limited["key"]}) as load:
            time.sleep(1.0)
            killed_at = time.monotonic()
            cluster.kill(records_primary)
            promotion = cluster.wait_promoted(records_primary)
            for replica in pair:
                wait_until(lambda: replica.check(limited["key"]) == "allow" and readiness(replica)["redis_tracking"]
                           and replica.check(blocked["key"]) == "key_blocked",
                           timeout=60, what="the replica serving from the new primary, tracking it")
            back = time.monotonic() - killed_at
            time.sleep(1.0)
        seen = {(name, answer) for _, name, answer in load.answers}
        assert seen <= {(name, answer) for name in ("allowed", "limited", "blocked")
                        for answer in ("key_blocked" if name == "blocked" else "allow", "authz_unavailable")}, seen
        assert {("blocked", "key_blocked"), ("allowed", "allow"), ("limited", "allow")} <= seen
        after = [answer for t, name, answer in load.answers if name == "blocked" and t > killed_at + back]
        assert after and set(after) == {"key_blocked"}
        unavailable = {name: sum(1 for _, n, x in load.answers if n == name and x == "authz_unavailable")
                       for name in ("allowed", "limited", "blocked")}
        last = max((t for t, _, x in load.answers if x == "authz_unavailable"), default=killed_at) - killed_at
        print(f"\ncluster failover: promoted {promotion:.1f} s after the kill, last 503 {last:.1f} s after it; both "
              f"replicas tracking {back:.1f} s after it; {len(load.answers)} answers, 503 by key: {unavailable}")
        # Writes go to the new primary, and its changes reach both caches.
        assert cluster.owner(RECORDS) != records_primary
        elapsed = measure(b, allowed["key"], lambda: a.admin("/key/block", {"key": allowed["key"]}), "key_blocked")
        assert elapsed <= REVOCATION_BOUND_MS
        assert a.check(allowed["key"]) == "key_blocked"
    finally:
        stop_pair(pair)
        cluster.stop()


def move_slot(cluster: Cluster, slot: int, source: int, target: int, meanwhile: Callable[[], object] = list) -> None:
    """Move one slot and its keys from primary ``source`` to ``target``, as redis-cli's reshard
    does (``meanwhile``: called while the slot is migrating)."""
    source_id, target_id = cli(source, "CLUSTER", "MYID"), cli(target, "CLUSTER", "MYID")
    assert cli(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id) == "OK"
    assert cli(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id) == "OK"
    meanwhile()
    while True:
        names = cli(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
        if not names:
            break
        assert cli(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *names) == "OK"
    for port in dict.fromkeys([target, source, *cluster.primaries()]):  # the new owner first, as redis-cli does
        assert cli(port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id) == "OK"


def test_a_new_primary_and_a_moved_records_slot_are_tracked(workdir: Path, config_path: Path) -> None:
    cluster = Cluster(workdir).create(primaries=3, replicas=0)
    pair = pair_on(workdir, config_path, cluster)
    a, b = pair
    try:
        key = a.admin("/key/generate", {"models": ["gpt-4"]})
        assert b.check(key["key"]) == "allow"
        ups = [readiness(r)["cache"]["times_trusted"] for r in pair]
        joined = cluster.start_node()
        assert cli(cluster.nodes[0].port, "CLUSTER", "MEET", "127.0.0.1", str(joined.port),
                   str(joined.bus)) == "OK"
        wait_until(lambda: joined.port in cluster.primaries() or "master" in cli(joined.port, "ROLE"),
                   what="the new node in the cluster")
        slot = int(cli(joined.port, "CLUSTER", "KEYSLOT", RECORDS))
        joined_id = cli(joined.port, "CLUSTER", "MYID")
        wait_until(lambda: len(cli(joined.port, "CLUSTER", "NODES").splitlines()) == 4 and cluster.healthy()
                   and all(joined_id in cli(port, "CLUSTER", "NODES") for port in cluster.primaries()),
                   what="the new node and the others knowing each other")
        def untrusted_while_migrating() -> None:
            # Writes to the slot land on either primary (ASK) for as long as it migrates: no
            # cache is trusted until it is over.
            for replica in pair:
                wait_until(lambda: not readiness(replica)["redis_tracking"], what="the cache distrusted")

        move_slot(cluster, slot, cluster.owner(RECORDS), joined.port, untrusted_while_migrating)
        wait_until(lambda: cluster.owner(RECORDS) == joined.port, what="the records' slot on the new primary")
        # Both replicas notice a fourth primary, track it, and trust their caches again.
        for n, replica in enumerate(pair):
            seen: list[dict] = []

            def tracking_all(replica: Replica = replica, n: int = n) -> bool:
                seen[:] = [readiness(replica)]
                return (seen[0]["redis_tracking"] and seen[0]["cache"]["times_trusted"] > ups[n]
                        and str(joined.port) in seen[0].get("redis_primary", ""))

            try:
                wait_until(tracking_all, timeout=30, what="tracking on the new primary")
            except AssertionError:
                raise AssertionError(f"tracking on the new primary {joined.port} not reached: {seen}") from None
        primary = f'extauthz_redis_primary{{address="127.0.0.1:{joined.port}"}} 1.0'
        wait_until(lambda: primary in metric_value(b.sidecar, "extauthz_redis_primary"), what="the metric")
        assert metric_value(b.sidecar, "extauthz_redis_primary").count(" 1.0") == 4
        assert b.check(key["key"]) == "allow"
        assert b.check(key["key"]) == "allow"  # cached again
        elapsed = measure(b, key["key"], lambda: a.admin("/key/block", {"key": key["key"]}), "key_blocked")
        assert elapsed <= REVOCATION_BOUND_MS
        assert keys_on(joined.port, f"{RECORDS}key:*")  # the write went to the slot's new primary
    finally:
        stop_pair(pair)
        cluster.stop()


def test_cluster_settings_that_cannot_work_stop_the_start(config_path: Path) -> None:
    for url, env, why in (
            ("unix:///tmp/redis.sock", {}, "redis:// or rediss://"),
            ("redis://127.0.0.1:7000/3", {}, "only database 0"),
            ("redis://127.0.0.1:7000/0", {"EXTAUTHZ_KEY_PREFIX": "{team}:"}, "holds a brace"),
            ("redis://127.0.0.1:7000/0", {"EXTAUTHZ_REDIS_CLUSTER_NODES": "127.0.0.1"}, "is not host:port (")):
        env = {"EXTAUTHZ_REDIS_URL": url, "EXTAUTHZ_REDIS_MODE": "cluster", "PATH": "/usr/bin:/bin", **env}
        checked = subprocess.run([sys.executable, "-m", "extauthz", "check-config", "--config", str(config_path)],
                                 capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert checked.returncode == 1 and "error: redis: " in checked.stdout and why in checked.stdout, checked
    env = {"EXTAUTHZ_REDIS_CLUSTER_NODES": "127.0.0.1:7001", "PATH": "/usr/bin:/bin"}
    checked = subprocess.run([sys.executable, "-m", "extauthz", "check-config", "--config", str(config_path)],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert checked.returncode == 1 and "redis_mode is not cluster" in checked.stdout


def test_a_connection_torn_down_mid_command_is_an_unavailable_store_not_an_error() -> None:
    """Seen in a failover run: redis-py's cluster client sends on a connection another
    coroutine has just torn down and raises AttributeError. The check must see Redis
    unavailable (503, or the cached decision within max_stale_s), not an internal error."""
    from extauthz.records.store import RedisReader, StoreUnavailable

    class TornDown:
        async def get(self, name: str) -> bytes:
            raise AttributeError("'NoneType' object has no attribute 'writelines'")

    reader = RedisReader("redis://127.0.0.1:1/0", 250)
    reader.redis = TornDown()  # type: ignore[assignment]
    with pytest.raises(StoreUnavailable):
        asyncio.run(reader.get("{extauthz:}key:x"))
