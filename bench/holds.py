"""What a hold costs a check, on the warm path: a caller with budgets (its key's and its
team's; the call's estimate held in Redis, in one admission script round trip) against a
caller with rate limits only (the same round trip, the limited path before holds), and a
caller with neither (no round trip, for the ratio's sake).

Three keys of their own teams are written into Redis in the store's layout. The warm
sidecar answers ROUNDS rounds of CHECKS gRPC checks, one at a time, per key, the keys
taking turns; the sidecar's CPU time per check (/proc, every thread) and the latency of
each check are reported per key, with the ratio of the budgeted to the limited."""

from __future__ import annotations

import json
import secrets
import statistics
import time
from typing import Any

import redis

from bench.grpc_load import check_stub
from bench.measure import cpu_seconds, percentile
from bench.population import check_request
from bench.shape import MODEL_A, PREFIX
from extauthz.domain.record import new_key_doc, new_team_doc

ROUNDS = 5
CHECKS = 400
BIG = 10**9  # a limit no bench reaches
CALLERS = {
    "free": {},
    "limited": {"rpm_limit": BIG},
    "budgeted": {"max_budget": 1e9},
}


def _caller(r: redis.Redis, fields: dict[str, Any]) -> str:
    raw = "sk-holds-" + secrets.token_hex(8)
    team_id = "holds-" + secrets.token_hex(4)
    r.set(f"{PREFIX}team:{team_id}", json.dumps(new_team_doc(team_id, models=[MODEL_A], **fields)))
    doc = new_key_doc(raw, models=[MODEL_A], team_id=team_id, **fields)
    r.set(f"{PREFIX}key:{doc['token']}", json.dumps(doc))
    return raw


def holds(r: redis.Redis, port: int, pid: int) -> dict[str, Any]:
    keys = {name: _caller(r, fields) for name, fields in CALLERS.items()}
    channel, call = check_stub(port)
    cpu: dict[str, float] = dict.fromkeys(keys, 0.0)
    times: dict[str, list[float]] = {name: [] for name in keys}
    try:
        for name, raw in keys.items():  # each cached, and allowed
            answer = call(check_request(raw, MODEL_A, "holds-warm"), timeout=5)
            if answer.status.code != 0:
                raise RuntimeError(f"the {name} caller was refused: {answer.denied_response.body!r}")
        for rnd in range(ROUNDS):
            order = list(keys)[rnd % len(keys):] + list(keys)[:rnd % len(keys)]
            for name in order:
                requests = [check_request(keys[name], MODEL_A, f"holds-{rnd}-{i}") for i in range(CHECKS)]
                before = cpu_seconds(pid)
                for request in requests:
                    started = time.perf_counter()
                    call(request, timeout=5)
                    times[name].append((time.perf_counter() - started) * 1000)
                cpu[name] += cpu_seconds(pid) - before
    finally:
        channel.close()
    out: dict[str, Any] = {}
    for name in keys:
        samples = sorted(times[name])
        out[name] = {"cpu_us_per_check": round(cpu[name] / len(samples) * 1e6, 1),
                     "p50_ms": round(statistics.median(samples), 3), "p99_ms": round(percentile(samples, 99), 3)}
    out["budgeted_cpu_x_limited"] = round(out["budgeted"]["cpu_us_per_check"] / out["limited"]["cpu_us_per_check"], 3)
    out["checks"] = ROUNDS * CHECKS
    return out
