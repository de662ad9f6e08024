"""Scale on the machine: ``python -m bench.scale [--keys 1000000]``.

Fills a redis-server of its own with N keys (and 1,000 teams) in the store's layout, then
reports: Redis memory per key (the record, its alias and its place in the listing sets);
the admin API's ``/key/list`` (first page, a page deep in the list, a filter by alias) and
``/key/info``; and cold lookups, a sidecar without a cache answering gRPC Checks one at a
time for random keys (each a Redis round trip or two). Every process is started here and
stopped by PID. Prints one table and writes ``bench/scale.json``.
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

OUT = Path(__file__).parent / "scale.json"
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
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="extauthz-scale-"))
    proc, port = start_redis(work)
    results: dict[str, float] = {"keys": args.keys}
    try:
        r = redis.Redis(port=port)
        before = r.info("memory")["used_memory"]
        results["fill_s"] = population.populate(r, args.keys)
        after = r.info("memory")["used_memory"]
        results["redis_bytes_per_key"] = (after - before) / args.keys
        results["redis_used_mb"] = after / 2**20
        url = f"redis://127.0.0.1:{port}/0"
        config = work / "config.yaml"
        config.write_text(CONFIG.read_text())
        side = start_sidecar(work, config, url, {"EXTAUTHZ_KEY_PREFIX": PREFIX, "EXTAUTHZ_CACHE_MAX_ENTRIES": "0",
                                                 "EXTAUTHZ_METRICS_PORT": "0"})
        try:
            admin = side.admin
            results["key_list_first_page_ms"] = timed(f"{admin}/key/list?page=1&size=100")
            results["key_list_deep_page_ms"] = timed(f"{admin}/key/list?page={args.keys // 200}&size=100")
            results["key_list_by_alias_ms"] = timed(f"{admin}/key/list?key_alias=bench-key-{args.keys // 2}")
            results["key_info_ms"] = timed(f"{admin}/key/info?key={raw_key(args.keys // 3)}")
            with grpc.insecure_channel(f"127.0.0.1:{side.grpc_port}") as channel:
                check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
                samples = []
                rng = random.Random(1)
                for i in range(args.lookups):
                    request = population.check_request(raw_key(rng.randrange(args.keys)), MODEL_A, f"s{i}")
                    started = time.perf_counter()
                    check(request, timeout=10)
                    samples.append((time.perf_counter() - started) * 1000)
            samples.sort()
            results["cold_check_p50_ms"] = statistics.median(samples)
            results["cold_check_p99_ms"] = samples[int(len(samples) * 0.99) - 1]
        finally:
            side.proc.stop()
    finally:
        proc.stop()
    for name, value in results.items():
        print(f"{name:28} {value:12.2f}")
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
