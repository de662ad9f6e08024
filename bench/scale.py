"""Scale on the machine: ``python -m bench.scale [--keys 1000000] [--cluster]``.

Fills a redis-server of its own with N keys (and 1,000 teams) in the store's layout, then
reports: Redis memory per key (the record, its alias and its place in the listing sets);
the admin API's ``/key/list`` (first page, a page deep in the list, a filter by alias) and
``/key/info``; and cold lookups, a sidecar without a cache answering gRPC Checks one at a
time for random keys (each a Redis round trip or two). Every process is started here and
stopped by PID. Prints one table and writes ``bench/scale.json`` (``bench/scale-cluster.json``
with ``--cluster``: a Redis Cluster of three primaries instead, the sidecar in cluster mode).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import redis

from bench import population
from bench.population import raw_key
from bench.shape import MODEL_A, PREFIX
from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from tests.harness import MASTER_KEY, http, start_redis, start_sidecar
from tests.redis_cluster import Cluster

OUT = Path(__file__).parent / "scale.json"
OUT_CLUSTER = Path(__file__).parent / "scale-cluster.json"
CONFIG = Path(__file__).parent.parent / "examples" / "config.yaml"


def timed(url: str, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        r = http("GET", url, None, {"Authorization": f"Bearer {MASTER_KEY}"}, timeout=600)
        assert r.status == 200, r.text[:300]
        best = min(best, time.perf_counter() - started)
    return best * 1000


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--cluster", action="store_true", help="a Redis Cluster of three primaries")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="extauthz-scale-"))
    env = {"EXTAUTHZ_KEY_PREFIX": PREFIX, "EXTAUTHZ_CACHE_MAX_ENTRIES": "0", "EXTAUTHZ_METRICS_PORT": "0"}
    if args.cluster:
        cluster = Cluster(work).create(primaries=3, replicas=0)
        stop, url = cluster.stop, cluster.seed
        r: redis.Redis = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        env.update(EXTAUTHZ_REDIS_MODE="cluster", EXTAUTHZ_REDIS_CLUSTER_NODES=cluster.seeds())
    else:
        proc, port = start_redis(work)
        stop, url = proc.stop, f"redis://127.0.0.1:{port}/0"
        r = redis.Redis(port=port)
    results: dict[str, float] = {"keys": args.keys}
    try:
        before = used_memory(r)
        results["fill_s"] = population.populate(r, args.keys, "{" + PREFIX + "}" if args.cluster else PREFIX)
        after = used_memory(r)
        results["redis_bytes_per_key"] = (after - before) / args.keys
        results["redis_used_mb"] = after / 2**20
        config = work / "config.yaml"
        config.write_text(CONFIG.read_text())
        side = start_sidecar(work, config, url, env)
        try:
            admin = side.admin
            results["key_list_first_page_ms"] = timed(f"{admin}/key/list?page=1&size=100")
            results["key_list_deep_page_ms"] = timed(f"{admin}/key/list?page={args.keys // 200}&size=100")
            results["key_list_by_alias_ms"] = timed(f"{admin}/key/list?key_alias=bench-key-{args.keys // 2}")
            results["key_info_ms"] = timed(f"{admin}/key/info?key={raw_key(args.keys // 3)}")
            rng = random.Random(1)
            samples = sorted(checks(side.grpc_port, [raw_key(rng.randrange(args.keys)) for _ in range(args.lookups)]))
            results["cold_check_p50_ms"] = statistics.median(samples)
            results["cold_check_p99_ms"] = samples[int(len(samples) * 0.99) - 1]
            # A warm cache: a caller without limits costs no round trip; a key and a team with
            # rpm limits cost the admission script (one call, or in a cluster one per slot).
            team = http("POST", f"{admin}/team/new", {"rpm_limit": 10**9}, {"Authorization": f"Bearer {MASTER_KEY}"})
            limited = http("POST", f"{admin}/key/generate", {"team_id": team.json()["team_id"], "rpm_limit": 10**9},
                           {"Authorization": f"Bearer {MASTER_KEY}"}).json()["key"]
            free = http("POST", f"{admin}/key/generate", {}, {"Authorization": f"Bearer {MASTER_KEY}"}).json()["key"]
            warm = start_sidecar(work, config, url, {**env, "EXTAUTHZ_CACHE_MAX_ENTRIES": "100000"})
            try:
                for name, key in (("warm_check", free), ("warm_limited_check", limited)):
                    samples = sorted(checks(warm.grpc_port, [key] * args.lookups, allowed=True, model="gpt-4"))
                    results[f"{name}_p50_ms"] = statistics.median(samples)
                    results[f"{name}_p99_ms"] = samples[int(len(samples) * 0.99) - 1]
            finally:
                warm.proc.stop()
        finally:
            side.proc.stop()
    finally:
        stop()
    for name, value in results.items():
        print(f"{name:28} {value:12.2f}")
    (OUT_CLUSTER if args.cluster else OUT).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def checks(grpc_port: int, keys: list[str], allowed: bool = False, model: str = MODEL_A) -> list[float]:
    """Milliseconds per gRPC Check, one at a time, each for the next key of ``keys``
    (``allowed``: each must be allowed, or the figure would time a refusal)."""
    samples = []
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
        for i, key in enumerate(keys):
            request = population.check_request(key, model, f"s{i}")
            started = time.perf_counter()
            answer = check(request, timeout=10)
            samples.append((time.perf_counter() - started) * 1000)
            if allowed and answer.status.code != 0:
                raise RuntimeError(f"check {i} refused: {answer.denied_response.body!r}")
    return samples


def used_memory(r: redis.Redis) -> int:
    """Bytes in use, on every primary of a cluster."""
    if isinstance(r, redis.RedisCluster):
        return sum(info["used_memory"] for info in r.info("memory", target_nodes=r.PRIMARIES).values())
    return r.info("memory")["used_memory"]


if __name__ == "__main__":
    raise SystemExit(main())
