"""How soon a budget crossing is enforced by a replica that did not settle it.

A key with a budget is checked once on two sidecars sharing Redis (both cache it, with
its spend). The settlement that takes its spend to the budget runs here, as a sidecar
runs it (usage/counters.py, record rewritten in place); the clock starts when it returns.
The other replica is then asked about the key in a loop until it refuses: the time that
took is what a crossing costs every replica (invalidation, re-read, refusal)."""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import time

import redis.asyncio as aioredis

from extauthz.records.record import hash_token, new_key_doc
from extauthz.usage.budgets import spend_counters, parse
from extauthz.records.keyspace import Keyspace
from extauthz.usage.counters import OVER, RateCounters, Settlement
from extauthz.usage.limits import scope
from bench.grpc_load import check_stub
from bench.population import check_request
from bench.shape import MODEL_A, PREFIX

CROSSINGS = 20


def crossing_ms(redis_port: int, settling_port: int, other_port: int) -> dict:
    """Milliseconds from each of CROSSINGS settlements to the other replica's refusal."""
    return asyncio.run(_crossings(redis_port, settling_port, other_port))


async def _crossings(redis_port: int, settling_port: int, other_port: int) -> dict:
    r = aioredis.Redis(port=redis_port)
    counters = RateCounters(r, Keyspace(PREFIX), 2.0)
    stubs = [check_stub(p) for p in (settling_port, other_port)]
    samples = []
    try:
        for _ in range(CROSSINGS):
            raw = "sk-crossing-" + secrets.token_hex(8)
            doc = new_key_doc(raw, models=[MODEL_A], max_budget=0.01, key_alias=None)
            await r.set(f"{PREFIX}key:{doc['token']}", json.dumps(doc))
            request = check_request(raw, MODEL_A, "crossing")
            for _, call in stubs:  # both replicas cache the key, with its spend (0)
                if call(request, timeout=5).status.code != 0:
                    raise RuntimeError("a key with its budget left was refused")
            (counter,) = spend_counters(scope("key", hash_token(raw)), parse(doc), MODEL_A, time.time())
            flags = await counters.settle([Settlement(secrets.token_hex(12), 0, [], [], 0.02,
                                                      [(counter, (f"{PREFIX}key:{doc['token']}",))])])
            settled = time.perf_counter()
            if flags != [[OVER]]:
                raise RuntimeError(f"the settlement did not cross the budget: {flags}")
            _, other = stubs[1]
            while other(request, timeout=5).status.code == 0:
                if time.perf_counter() - settled > 5:
                    raise RuntimeError("the other replica never refused the key")
                await asyncio.sleep(0.001)
            samples.append((time.perf_counter() - settled) * 1000)
    finally:
        for channel, _ in stubs:
            channel.close()
        await r.aclose()
    samples.sort()
    return {"crossings": CROSSINGS, "p50_ms": round(statistics.median(samples), 2),
            "max_ms": round(samples[-1], 2), "all_ms": [round(s, 2) for s in samples]}
