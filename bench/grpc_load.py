"""Load straight at the gRPC port: verification, h2load rounds, the 100,000-key memory pass."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import grpc
import redis

from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2
from tests.harness import http, tcp_open
from bench.shape import BENCH, CACHE_SAMPLE, CHECK_PATH, H2_STREAMS, MODEL_A, N_KEYS, REPS, ROUND_S, WARMUP_S
from bench.population import Probe, allowed, check_request, raw_key, team_number
from bench.measure import Window, calibrate, percentile, redis_gets, rotated

# == gRPC: verification, h2load, the 100,000-key pass =============================================

def check_stub(port: int) -> tuple[grpc.Channel, Callable]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(CHECK_PATH, request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
                               response_deserializer=external_auth_pb2.CheckResponse.FromString)
    return channel, call


def grpc_ready(port: int) -> bool:
    if not tcp_open(port):
        return False
    channel, call = check_stub(port)
    try:
        call(check_request("sk-bench-ready", MODEL_A, "1"), timeout=1)
        return True
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def verify(port: int, probes: Iterable[Probe], decisions: bool) -> int:
    """Ask once per probe; the answer must be the expected one (or OK, for the floor)."""
    channel, call = check_stub(port)
    count = 0
    try:
        for p in probes:
            resp = call(p.request(), timeout=5)
            want = p.allowed if decisions else True
            if (resp.status.code == 0) != want:
                raise RuntimeError(f"{p.label} ({p.key}, {p.model}): expected {'allow' if want else 'deny'}, "
                                   f"got status {resp.status.code} {resp.status.message!r}")
            count += 1
    finally:
        channel.close()
    return count


H2_SUMMARY = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                        r"(\d+) errored, (\d+) timeout")
H2_COUNTERS = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")


def h2load_round(port: int, files: list[Path], seconds: float, logdir: Path, tag: str) -> tuple[list[int], dict]:
    """One h2load process per body file, all at once; the per-request durations (µs) of
    the successful requests, and the counters h2load printed, summed."""
    procs: list[tuple[subprocess.Popen, Path, Path]] = []
    try:
        for i, body in enumerate(files):
            log, out = logdir / f"{tag}-{i}.tsv", logdir / f"{tag}-{i}.out"
            with open(out, "wb") as out_f:
                p = subprocess.Popen(
                    ["h2load", "-D", f"{seconds:g}", "-c", "1", "-t", "1", "-m", str(H2_STREAMS), "-d", str(body),
                     "-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", str(log),
                     f"http://127.0.0.1:{port}{CHECK_PATH}"], stdout=out_f, stderr=subprocess.STDOUT)
            procs.append((p, log, out))
        for p, _, _ in procs:
            p.wait(timeout=seconds + 30)
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    durations: list[int] = []
    totals = dict.fromkeys(H2_COUNTERS, 0)
    for p, log, out in procs:
        text = out.read_text(errors="replace")
        m = H2_SUMMARY.search(text)
        if p.returncode != 0 or m is None:
            raise RuntimeError(f"h2load failed (exit {p.returncode}):\n{text[-2000:]}")
        for k, v in zip(H2_COUNTERS, m.groups()):
            totals[k] += int(v)
        with open(log) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1] == "200":
                    durations.append(int(parts[2]))
        log.unlink()
    return durations, totals


def grpc_phase(servers: dict[str, tuple[int, int]], rounds: list[list[Path]], logdir: Path, r: redis.Redis,
               redis_pid: int, calibration: list[float]) -> dict[str, dict[str, Any]]:
    """``servers``: name -> (port, pid). REPS repetitions, one round per server each."""
    for name, (port, _) in servers.items():
        h2load_round(port, rounds[0], WARMUP_S, logdir, f"{name}-warmup")
    acc = {name: {"durations": [], "cpu": 0.0, "redis_cpu": 0.0, "gets": 0, "wall": 0.0,
                  "h2load": dict.fromkeys(H2_COUNTERS, 0), "cpu_per_rep": [], "rate_per_rep": []}
           for name in servers}
    for rep in range(REPS):
        calibration.append(calibrate())
        for name in rotated(list(servers), rep):
            port, pid = servers[name]
            with Window({"server": pid, "redis": redis_pid}, r) as w:
                durations, counters = h2load_round(port, rounds[rep % len(rounds)], ROUND_S, logdir, f"{name}-{rep}")
            if not durations or counters["failed"] or counters["errored"]:
                raise RuntimeError(f"{name}: {len(durations)} checks, h2load counters {counters}")
            a = acc[name]
            a["durations"] += durations
            a["cpu"] += w.cpu["server"]
            a["redis_cpu"] += w.cpu["redis"]
            a["gets"] += w.gets
            a["wall"] += w.wall
            a["h2load"] = {k: a["h2load"][k] + v for k, v in counters.items()}
            a["cpu_per_rep"].append(round(w.cpu["server"] * 1e6 / len(durations), 1))
            a["rate_per_rep"].append(round(len(durations) / w.wall, 1))
    out = {}
    for name, a in acc.items():
        checks = len(a["durations"])
        a["durations"].sort()
        out[name] = {
            "checks_per_s": round(checks / a["wall"], 1),
            "p50_ms": round(percentile(a["durations"], 50) / 1000, 3),
            "p99_ms": round(percentile(a["durations"], 99) / 1000, 3),
            "cpu_us_per_check": round(a["cpu"] * 1e6 / checks, 1),
            "server_cpu_cores": round(a["cpu"] / a["wall"], 2),
            "redis_gets_per_check": round(a["gets"] / checks, 3),
            "redis_cpu_us_per_check": round(a["redis_cpu"] * 1e6 / checks, 1),
            "checks": checks,
            "seconds": round(a["wall"], 2),
            "cpu_us_per_check_per_rep": a["cpu_per_rep"],
            "checks_per_s_per_rep": a["rate_per_rep"],
            "h2load": a["h2load"],
        }
    return out


GRPC_UNAVAILABLE = 14


async def check_every_key(port: int, n_keys: int, concurrency: int) -> dict[str, Any]:
    """One check per key (bench-model), ``concurrency`` in flight; answers must match.
    A key answered "unavailable" (Redis slower than the sidecar's timeout) is asked again
    afterwards, at most three times, so that it too ends up cached."""
    counts = {"allowed": 0, "denied": 0, "wrong": 0, "unavailable": 0}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(CHECK_PATH, request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
                                   response_deserializer=external_auth_pb2.CheckResponse.FromString)

        async def worker(todo: Iterable[int], again: list[int]) -> None:
            for n in todo:
                resp = await call(check_request(raw_key(n), MODEL_A, str(n)), timeout=10)
                if resp.status.code == GRPC_UNAVAILABLE:
                    counts["unavailable"] += 1
                    again.append(n)
                    continue
                ok = resp.status.code == 0
                counts["allowed" if ok else "denied"] += 1
                counts["wrong"] += ok != allowed(n, MODEL_A)

        started = time.monotonic()
        todo: list[int] = list(range(n_keys))
        for attempt in range(4):
            if not todo:
                break
            again: list[int] = []
            shared = iter(todo)
            await asyncio.gather(*(worker(shared, again) for _ in range(concurrency if attempt == 0 else 1)))
            todo = again
        counts["still_unavailable"] = len(todo)
        counts["seconds"] = round(time.monotonic() - started, 1)
    return counts


def cache_stats(admin_port: int) -> dict[str, Any] | None:
    """The counters /health/readiness reports, when this sidecar reports any."""
    try:
        doc = http("GET", f"http://127.0.0.1:{admin_port}/health/readiness", timeout=5).json()
    except (OSError, ValueError):
        return None
    stats = {k: v for k, v in doc.items() if k not in ("status", "redis")} if isinstance(doc, dict) else {}
    return stats or None


def cache_hit_share(port: int, r: redis.Redis) -> float:
    """Check a spread-out sample of keys again: the share of their record lookups (the
    key, and the team for a team key) answered without a Redis GET."""
    sample = [Probe("sample", raw_key(n), n, MODEL_A) for n in range(7, N_KEYS, N_KEYS // CACHE_SAMPLE)]
    lookups = sum(1 + (team_number(p.n) is not None) for p in sample)
    before = redis_gets(r)
    verify(port, sample, decisions=True)
    return round(max(0.0, 1 - (redis_gets(r) - before) / lookups), 4)


def record_memory_estimate() -> dict[str, float]:
    """What a cache of every key and team costs, built directly from extauthz.domain.record in a
    fresh process: a cross-check for the RSS figure, and a figure when the cache does not hold."""
    code = (
        "import json, os\n"
        "from collections import OrderedDict\n"
        "from bench.population import key_doc, team_doc\nfrom bench.shape import N_KEYS, N_TEAMS, PREFIX\n"
        "from extauthz.domain.record import KeyRecord, TeamRecord\n"
        "rss = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) / 1024\n"
        "keys = [json.dumps(key_doc(n), separators=(',', ':')).encode() for n in range(N_KEYS)]\n"
        "teams = [json.dumps(team_doc(t), separators=(',', ':')).encode() for t in range(N_TEAMS)]\n"
        "before = rss()\n"
        "cache = OrderedDict()\n"
        "for raw in keys:\n"
        "    rec = KeyRecord.from_json(raw); cache[PREFIX + 'key:' + rec.token_hash] = rec\n"
        "for raw in teams:\n"
        "    rec = TeamRecord.from_json(raw); cache[PREFIX + 'team:' + rec.team_id] = rec\n"
        "print(json.dumps({'records': len(cache), 'mb': round(rss() - before, 1)}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=BENCH.parent)
    if done.returncode != 0:
        raise RuntimeError(f"record memory estimate failed:\n{done.stderr}")
    return json.loads(done.stdout)
