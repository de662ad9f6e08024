"""Benchmark the sidecar against a floor, on this machine, in one run: ``python -m bench.run``.

What runs (every process on 127.0.0.1, started here on free ports and stopped by PID):

- redis-server, filled with 100,000 keys and 1,000 teams in the store's layout;
- ``bench/noop_server.py``: the floor, the same gRPC stack answering OK after parsing the body;
- the sidecar (``python -m extauthz serve``, one process), once with its cache warm, once
  with no cache (``EXTAUTHZ_CACHE_MAX_ENTRIES=0``: every check reads Redis);
- Envoy (``--concurrency 1``), three of them, from the rendered bootstrap.

Measurements:

1. Direct gRPC load with h2load at the floor, the warm sidecar and the cold sidecar.
   h2load sends one body per process, so a round runs H2_PROCS h2load processes at once,
   each with its own CheckRequest (its own key): 9 allowed and 3 denied (model not
   allowed, unknown key, team without the model). Each of REPS repetitions runs one
   round per server, with new keys, the servers taking turns; a server's figures add up
   its rounds. checks/s over the rounds; p50/p99 from h2load's per-request logs; server
   CPU µs per check from /proc/<pid>/stat (utime+stime, all threads) over the same windows.
2. Resident memory (VmRSS) of the warm sidecar after a check for each of the 100,000 keys.
3. End to end with wrk (1 thread, ``bench/mix.lua``) through Envoy: ``envoy_direct`` (no
   authorization), ``envoy_noop`` (ext_authz to the floor) and ``envoy_sidecar`` (the full
   rendered config, warm sidecar), taking turns the same way. The upstream is a second
   listener of each Envoy answering a ``direct_response``: no Python process upstream.

Taking turns matters here: this machine's speed drifts (other load on the host), so a
ratio of two figures measured seconds apart is steadier than either figure. The run
times a fixed Python loop between repetitions and reports the spread.

Writes ``bench/results.json`` and prints one table. ``--strict`` exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import grpc
import redis
import yaml

from tests.harness import BIN, Proc, Sidecar, free_port, http, http_ok, start_redis, start_sidecar, tcp_open
from extauthz import config as config_module
from extauthz import providers
from extauthz.envoy.render import EXT_AUTHZ_FILTER, SPLICE_FILTER, render
from extauthz.proto.envoy.service.auth.v3 import external_auth_pb2
from extauthz.records.record import hash_token

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results.json"
MIX_LUA = BENCH / "mix.lua"
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"

# -- population -----------------------------------------------------------------------------
N_KEYS = 100_000
N_TEAMS = 1_000
MASTER_KEY = "sk-bench-master"
MODEL_A, MODEL_B, UNKNOWN_MODEL = "bench-model", "bench-model-b", "gpt-unknown"
GROUP = "bench-group"            # access group of bench-model only
FUTURE, PAST = "2099-01-01T00:00:00+00:00", "2020-01-01T00:00:00+00:00"
PREFIX = "extauthz:"

# -- load shape -----------------------------------------------------------------------------
H2_PROCS = 12          # h2load processes per round, one body (key) each
H2_STREAMS = 2         # concurrent streams per h2load process: 24 checks in flight
REPS = 4               # repetitions; each runs one round per server, with new keys
ROUND_S = 2.0          # seconds per round: 8 s per server
WARMUP_S = 1.0
WRK_CONNECTIONS = 32
WRK_REPS = 3
WRK_S = 3              # seconds per wrk run: 9 s per Envoy
WRK_WARMUP_S = 1
MEMORY_CONCURRENCY = 64
# The warm sidecar's cache must hold every key and team (101,000 records) for the memory
# figure and for mix.lua, which walks all 100,000 keys: the default (100,000) would not.
WARM_CACHE_ENTRIES = 200_000
# One process each, like the floor: per-check CPU compares like with like.
WARM_ENV = {"EXTAUTHZ_CACHE_MAX_ENTRIES": str(WARM_CACHE_ENTRIES), "EXTAUTHZ_WORKERS": "1"}
COLD_ENV = {"EXTAUTHZ_CACHE_MAX_ENTRIES": "0", "EXTAUTHZ_WORKERS": "1"}
CACHE_SAMPLE = 2_000

TARGETS = {"warm_cpu_x_floor_max": 1.15, "envoy_sidecar_rps_x_noop_min": 0.9, "rss_mb_max": 150.0}


# == population =================================================================================

def team_number(n: int) -> int | None:
    """Every fifth key belongs to a team; the teams' members are spread over all 1,000."""
    return (n // 5) % N_TEAMS if n % 5 == 4 else None


def key_models(n: int) -> list[str]:
    if team_number(n) is not None:
        return []                       # a team key: the team's list decides
    if n % 10 == 3:
        return [MODEL_B]                # restricted: bench-model is denied
    if n % 10 == 1:
        return [GROUP]                  # through the access group: bench-model only
    return [MODEL_A, MODEL_B]


def key_expires(n: int) -> str | None:
    if n % 1000 == 500:
        return PAST                     # expired
    return FUTURE if n % 3 == 0 else None


def key_blocked(n: int) -> bool:
    return n % 997 == 996


def team_models(t: int) -> list[str]:
    return [MODEL_B] if t % 10 == 7 else [MODEL_A, MODEL_B]


def team_blocked(t: int) -> bool:
    return t % 250 == 249


def admits(models: list[str], model: str) -> bool:
    if not models:
        return True
    return model in models or (GROUP in models and model == MODEL_A)


def allowed(n: int | None, model: str) -> bool:
    """What the sidecar must answer for key ``n`` (None: an unknown key) and ``model``."""
    if n is None or not 0 <= n < N_KEYS or key_blocked(n) or key_expires(n) == PAST:
        return False
    if model not in (MODEL_A, MODEL_B) or not admits(key_models(n), model):
        return False
    t = team_number(n)
    return t is None or (not team_blocked(t) and admits(team_models(t), model))


def raw_key(n: int) -> str:
    return f"sk-bench-{n}"


def key_doc(n: int) -> dict[str, Any]:
    key = raw_key(n)
    t = team_number(n)
    return {"token": hash_token(key), "key_name": f"sk-...{key[-4:]}", "key_alias": f"bench-key-{n}",
            "models": key_models(n), "team_id": None if t is None else f"bench-team-{t}",
            "expires": key_expires(n), "blocked": key_blocked(n), "metadata": {"bench": True},
            "created_at": "2025-01-01T00:00:00+00:00", "updated_at": "2025-01-01T00:00:00+00:00",
            "max_budget": None, "spend": 0.0}


def team_doc(t: int) -> dict[str, Any]:
    return {"team_id": f"bench-team-{t}", "team_alias": f"bench-team-alias-{t}", "models": team_models(t),
            "blocked": team_blocked(t), "metadata": {"bench": True},
            "created_at": "2025-01-01T00:00:00+00:00", "updated_at": "2025-01-01T00:00:00+00:00"}


def populate(r: redis.Redis) -> float:
    started = time.monotonic()
    dump = lambda doc: json.dumps(doc, separators=(",", ":"))  # noqa: E731
    pipe = r.pipeline(transaction=False)
    for t in range(N_TEAMS):
        doc = team_doc(t)
        pipe.set(f"{PREFIX}team:{doc['team_id']}", dump(doc))
        pipe.sadd(f"{PREFIX}teams", doc["team_id"])
    pipe.execute()
    for start in range(0, N_KEYS, 5000):
        for n in range(start, min(start + 5000, N_KEYS)):
            doc = key_doc(n)
            pipe.set(f"{PREFIX}key:{doc['token']}", dump(doc))
            pipe.set(f"{PREFIX}alias:{doc['key_alias']}", doc["token"])
            pipe.sadd(f"{PREFIX}keys", doc["token"])
            if doc["team_id"]:
                pipe.sadd(f"{PREFIX}team_keys:{doc['team_id']}", doc["token"])
        pipe.execute()
    got = r.dbsize()
    if got < N_KEYS + N_TEAMS:
        raise RuntimeError(f"redis holds {got} keys after populating")
    return time.monotonic() - started


# == requests ==================================================================================

def chat_body(model: str, tag: str) -> bytes:
    return json.dumps({"model": model, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": f"Write one sentence about benchmarks, request {tag}."}],
        "max_tokens": 64, "temperature": 0.2}, separators=(",", ":")).encode()


def check_request(key: str, model: str, tag: str) -> external_auth_pb2.CheckRequest:
    """A CheckRequest shaped like the one Envoy sends for POST /v1/chat/completions."""
    body = chat_body(model, tag)
    req = external_auth_pb2.CheckRequest()
    h = req.attributes.request.http
    h.id, h.method, h.path, h.host, h.scheme, h.protocol = tag, "POST", "/v1/chat/completions", \
        "127.0.0.1:4000", "http", "HTTP/1.1"
    h.size = len(body)
    h.raw_body = body
    h.headers.update({
        ":authority": "127.0.0.1:4000", ":method": "POST", ":path": "/v1/chat/completions", ":scheme": "http",
        "authorization": f"Bearer {key}", "content-type": "application/json", "content-length": str(len(body)),
        "user-agent": "bench/1.0", "accept": "*/*", "x-forwarded-proto": "http",
        "x-request-id": f"00000000-0000-4000-8000-{int(tag) % 10**12:012d}" if tag.isdigit() else tag,
        "x-envoy-auth-partial-body": "false",
    })
    return req


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


@dataclass(frozen=True)
class Probe:
    label: str
    key: str
    n: int | None
    model: str

    @property
    def allowed(self) -> bool:
        return allowed(self.n, self.model)

    def request(self) -> external_auth_pb2.CheckRequest:
        return check_request(self.key, self.model, str(self.n if self.n is not None else 0))


# One round's bodies: (label, predicate on the key number, model, expected allow).
PERSONAL_AB = lambda n: team_number(n) is None and key_models(n) == [MODEL_A, MODEL_B]  # noqa: E731
ROUND_PLAN: list[tuple[str, Callable[[int], bool] | None, str, bool]] = [
    *[("allow personal key", PERSONAL_AB, MODEL_A, True)] * 5,
    ("allow via access group", lambda n: key_models(n) == [GROUP], MODEL_A, True),
    ("allow team key", lambda n: team_number(n) is not None, MODEL_A, True),
    ("allow other model", PERSONAL_AB, MODEL_B, True),
    ("allow team key, other model", lambda n: team_number(n) is not None, MODEL_B, True),
    ("deny model not allowed", lambda n: key_models(n) == [MODEL_B], MODEL_A, False),
    ("deny unknown key", None, MODEL_A, False),
    ("deny team without the model", lambda n: team_number(n) is not None
     and team_models(team_number(n)) == [MODEL_B], MODEL_A, False),
]
assert len(ROUND_PLAN) == H2_PROCS


def h2_rounds(rounds: int) -> list[list[Probe]]:
    """Distinct keys for every body of every round, each with the outcome the plan wants."""
    used: set[int] = set()
    out = []
    for r in range(rounds):
        probes = []
        for j, (label, pred, model, want) in enumerate(ROUND_PLAN):
            if pred is None:
                probes.append(Probe(label, f"sk-bench-unknown-{r}-{j}", None, model))
                continue
            n = 1 + r * 24_989 + j * 1_999
            while n in used or not pred(n) or allowed(n, model) != want:
                n = (n + 1) % N_KEYS
            used.add(n)
            probes.append(Probe(label, raw_key(n), n, model))
        out.append(probes)
    return out


def lua_mix(count: int, start: int = 0, n_keys: int = N_KEYS) -> int:
    """How many of bench/mix.lua's requests start+1 .. start+count the sidecar must deny."""
    denied = 0
    for c in range(start + 1, start + count + 1):
        n = None if c % 20 == 0 else (c * 7919) % n_keys
        m = c % 20
        model = MODEL_B if m in (3, 7, 13) else UNKNOWN_MODEL if m == 11 else MODEL_A
        denied += not allowed(n, model)
    return denied


# == process measurements ===================================================================

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def redis_gets(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


@dataclass
class Window:
    """CPU seconds of the watched processes and Redis GET calls over one measurement."""

    pids: dict[str, int]
    redis_client: redis.Redis

    def __enter__(self) -> "Window":
        self.cpu0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self.gets0 = redis_gets(self.redis_client)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.t0
        self.cpu = {k: cpu_seconds(p) - self.cpu0[k] for k, p in self.pids.items()}
        self.gets = redis_gets(self.redis_client) - self.gets0


def calibrate() -> float:
    """Milliseconds of CPU for a fixed pure-Python loop: how fast the machine is right now."""
    started = time.process_time()
    total = 0
    for i in range(1_000_000):
        total += i
    return round((time.process_time() - started) * 1000, 1)


def rotated(names: list[str], rep: int) -> list[str]:
    """Who goes first changes each repetition, so no server always follows the same one."""
    k = rep % len(names)
    return names[k:] + names[:k]


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
    """What a cache of every key and team costs, built directly from extauthz.records.record in a
    fresh process: a cross-check for the RSS figure, and a figure when the cache does not hold."""
    code = (
        "import json, os\n"
        "from collections import OrderedDict\n"
        "from bench.run import N_KEYS, N_TEAMS, key_doc, team_doc, PREFIX\n"
        "from extauthz.records.record import KeyRecord, TeamRecord\n"
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


# == Envoy ======================================================================================

def bench_config(workdir: Path, upstream_port: int) -> Path:
    base = f"http://127.0.0.1:{upstream_port}/v1"
    doc = {
        "model_list": [
            {"model_name": MODEL_A, "litellm_params": {"model": f"openai/{MODEL_A}", "api_base": base,
                                                     "api_key": "sk-upstream-bench-a"},
             "model_info": {"access_groups": [GROUP]}},
            {"model_name": MODEL_B, "litellm_params": {"model": "openai/bench-model-b-provider", "api_base": base,
                                                     "api_key": "sk-upstream-bench-b"}},
        ],
        "general_settings": {"master_key": MASTER_KEY},
    }
    path = workdir / "bench-config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


UPSTREAM_BODY = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion", "model": "bench", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]},
    separators=(",", ":"))
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def upstream_listener(port: int) -> dict[str, Any]:
    """The upstream: a listener of the same Envoy answering 200 with a small JSON body."""
    hcm = {
        "@type": HCM,
        "stat_prefix": "bench_upstream",
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "route_config": {"name": "bench_upstream", "virtual_hosts": [{
            "name": "upstream", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_BODY}},
                        "response_headers_to_add": [{"header": {"key": "content-type",
                                                                "value": "application/json"}}]}]}]},
    }
    return {"name": "bench_upstream", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


def bootstrap(kind: str, cfg: config_module.Config, listen: int, envoy_admin: int, authz_port: int,
              admin_port: int, upstream_port: int) -> dict[str, Any]:
    """The rendered bootstrap plus the upstream listener, its cluster pointed at it.
    ``direct`` drops ext_authz and the splice filter; ``direct`` and ``noop`` route every request
    to the upstream cluster (the no-op server sets no routing header); ``sidecar`` is
    the rendered config as it is."""
    b = copy.deepcopy(render(cfg, listen_port=listen, authz_port=authz_port, admin_port=admin_port,
                             envoy_admin_port=envoy_admin))
    resources = b["static_resources"]
    listener = resources["listeners"][0]
    listener["address"]["socket_address"]["address"] = "127.0.0.1"
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    upstream_cluster = providers.upstream(cfg.deployments[0].api_base).cluster
    if kind == "direct":
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in (EXT_AUTHZ_FILTER, SPLICE_FILTER)]
    if kind in ("direct", "noop"):
        hcm["route_config"] = {"name": "bench_fixed", "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": upstream_cluster, "timeout": "60s"}}]}]}
    # Each Envoy answers as its own upstream; the cluster keeps the name the sidecar routes to.
    clusters = [c for c in resources["clusters"] if c["name"] == upstream_cluster]
    if len(clusters) != 1:
        raise RuntimeError(f"rendered bootstrap has no cluster {upstream_cluster}")
    for group in clusters[0]["load_assignment"]["endpoints"]:
        for endpoint in group["lb_endpoints"]:
            endpoint["endpoint"]["address"]["socket_address"].update(address="127.0.0.1", port_value=upstream_port)
    resources["listeners"].append(upstream_listener(upstream_port))
    return b


@dataclass
class EnvoyCase:
    name: str
    proc: Proc
    port: int
    authz_pid: int | None
    decisions: bool


def start_envoy(workdir: Path, name: str, boot: dict[str, Any], admin_port: int) -> Proc:
    path = workdir / f"envoy-{name}.yaml"
    path.write_text(yaml.safe_dump(boot, sort_keys=False))
    proc = Proc(f"envoy ({name})", [str(BIN / "envoy"), "-c", str(path), "--disable-hot-restart",
                                     "--concurrency", "1", "--log-level", "warn"], workdir / f"envoy-{name}.log")
    proc.start()
    proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin_port}/ready"))
    return proc


def verify_envoy(port: int, probes: list[Probe], decisions: bool) -> None:
    for p in probes:
        resp = http("POST", f"http://127.0.0.1:{port}/v1/chat/completions", raw=chat_body(p.model, "1"),
                    headers={"Authorization": f"Bearer {p.key}", "Content-Type": "application/json"})
        want = p.allowed if decisions else True
        ok = resp.status == 200 and "chatcmpl-bench" in resp.text
        if ok != want:
            raise RuntimeError(f"through Envoy, {p.label} ({p.key}, {p.model}): expected "
                               f"{'200 from the upstream' if want else 'a deny'}, got {resp.status} {resp.text[:300]}")


WRK_LATENCY = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk(port: int, seconds: int, start: int) -> dict[str, Any]:
    """wrk with mix.lua from request number ``start`` on."""
    args = ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--latency", "-s", str(MIX_LUA),
            f"http://127.0.0.1:{port}", "--", str(N_KEYS), str(start)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    out = done.stdout
    total = WRK_TOTAL.search(out)
    lat = {p: float(v) * UNITS_MS[u] for p, v, u in WRK_LATENCY.findall(out)}
    if done.returncode != 0 or total is None or "99" not in lat:
        raise RuntimeError(f"wrk failed (exit {done.returncode}):\n{out}\n{done.stderr}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock and sum(map(int, sock.groups())):
        raise RuntimeError(f"wrk socket errors:\n{out}")
    return {"requests": int(total.group(1)), "seconds": float(total.group(2)) * UNITS_MS[total.group(3)] / 1000,
            "p50_ms": lat["50"], "p99_ms": lat["99"], "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def envoy_phase(cases: list[EnvoyCase], r: redis.Redis, calibration: list[float]) -> dict[str, dict[str, Any]]:
    for case in cases:
        wrk(case.port, WRK_WARMUP_S, 0)
    acc: dict[str, dict[str, Any]] = {c.name: {"requests": 0, "seconds": 0.0, "non_2xx": 0, "denied_expected": 0,
                                               "envoy_cpu": 0.0, "authz_cpu": 0.0, "gets": 0, "p50": [], "p99": [],
                                               "rps": []} for c in cases}
    by_name = {c.name: c for c in cases}
    for rep in range(WRK_REPS):
        calibration.append(calibrate())
        start = 1_000_000 * (rep + 1)     # new keys each repetition (the counter picks the key)
        for name in rotated(list(by_name), rep):
            case = by_name[name]
            pids = {"envoy": case.proc.pid, **({"authz": case.authz_pid} if case.authz_pid else {})}
            with Window(pids, r) as w:
                res = wrk(case.port, WRK_S, start)
            a = acc[name]
            a["requests"] += res["requests"]
            a["seconds"] += res["seconds"]
            a["non_2xx"] += res["non_2xx"]
            a["denied_expected"] += lua_mix(res["requests"], start) if case.decisions else 0
            a["envoy_cpu"] += w.cpu["envoy"]
            a["authz_cpu"] += w.cpu.get("authz", 0.0)
            a["gets"] += w.gets
            a["p50"].append(res["p50_ms"])
            a["p99"].append(res["p99_ms"])
            a["rps"].append(round(res["requests"] / res["seconds"], 1))
    out = {}
    for case in cases:
        a = acc[case.name]
        n = a["requests"]
        out[case.name] = {
            "rps": round(n / a["seconds"], 1),
            "p50_ms": round(statistics.median(a["p50"]), 3),
            "p99_ms": round(statistics.median(a["p99"]), 3),
            "requests": n,
            "denied_share": round(a["non_2xx"] / n, 4),
            "expected_denied_share": round(a["denied_expected"] / n, 4),
            "envoy_cpu_us_per_request": round(a["envoy_cpu"] * 1e6 / n, 1),
            **({"authz_cpu_us_per_request": round(a["authz_cpu"] * 1e6 / n, 1)} if case.authz_pid else {}),
            "redis_gets_per_request": round(a["gets"] / n, 3),
            "rps_per_rep": a["rps"],
            "p99_ms_per_rep": a["p99"],
        }
    return out


# == the run ====================================================================================

def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def table(results: dict[str, Any]) -> str:
    floor, noop = results["floor"], results["envoy_noop"]
    rows = [("case", "rate/s", "x floor", "p50 ms", "p99 ms", "authz cpu µs/check", "x floor", "redis GET/check")]
    for name, label in (("floor", "gRPC no-op server (floor)"), ("warm", "gRPC sidecar, warm cache"),
                        ("cold", "gRPC sidecar, no cache")):
        m = results[name]
        rows.append((label, f"{m['checks_per_s']:.0f}", f"{ratio(m['checks_per_s'], floor['checks_per_s']):.2f}",
                     f"{m['p50_ms']:.2f}", f"{m['p99_ms']:.2f}", f"{m['cpu_us_per_check']:.0f}",
                     f"{ratio(m['cpu_us_per_check'], floor['cpu_us_per_check']):.2f}",
                     f"{m['redis_gets_per_check']:.2f}"))
    for name, label in (("envoy_direct", "Envoy, no ext_authz"), ("envoy_noop", "Envoy + no-op server (floor)"),
                        ("envoy_sidecar", "Envoy + sidecar, warm cache")):
        m = results[name]
        cpu = m.get("authz_cpu_us_per_request")
        rows.append((label, f"{m['rps']:.0f}", f"{ratio(m['rps'], noop['rps']):.2f}", f"{m['p50_ms']:.2f}",
                     f"{m['p99_ms']:.2f}", "-" if cpu is None else f"{cpu:.0f}",
                     "-" if cpu is None else f"{ratio(cpu, noop['authz_cpu_us_per_request']):.2f}",
                     f"{m['redis_gets_per_request']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(5, "-" * len(lines[0]))
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> dict[str, Any]:
    warm_x = ratio(results["warm"]["cpu_us_per_check"], results["floor"]["cpu_us_per_check"])
    rps_x = ratio(results["envoy_sidecar"]["rps"], results["envoy_noop"]["rps"])
    rss = results["sidecar_rss_mb_100k_keys"]
    hit_share = results["memory_pass"]["cache_hit_share_after"]
    out = {
        "warm_cpu_x_floor": {"value": warm_x, "limit": f"<= {TARGETS['warm_cpu_x_floor_max']}",
                             "pass": warm_x is not None and warm_x <= TARGETS["warm_cpu_x_floor_max"],
                             "per_rep": [ratio(w, f) for w, f in zip(results["warm"]["cpu_us_per_check_per_rep"],
                                                                      results["floor"]["cpu_us_per_check_per_rep"])]},
        "envoy_sidecar_rps_x_envoy_noop": {
            "value": rps_x, "limit": f">= {TARGETS['envoy_sidecar_rps_x_noop_min']}",
            "pass": rps_x is not None and rps_x >= TARGETS["envoy_sidecar_rps_x_noop_min"],
            "per_rep": [ratio(s, n) for s, n in zip(results["envoy_sidecar"]["rps_per_rep"],
                                                    results["envoy_noop"]["rps_per_rep"])]},
        "sidecar_rss_mb_100k_keys": {"value": rss, "limit": f"<= {TARGETS['rss_mb_max']}",
                                     "pass": hit_share >= 0.99 and rss <= TARGETS["rss_mb_max"]},
    }
    if hit_share < 0.99:
        out["sidecar_rss_mb_100k_keys"]["invalid"] = (
            f"the cache did not hold the keys: after the pass only {hit_share:.0%} of a sample of "
            f"{CACHE_SAMPLE} keys was answered without reading Redis; estimate with every key cached: "
            f"{results['sidecar_rss_mb_100k_keys_estimate']['mb']} MiB")
    return out


def warnings(results: dict[str, Any]) -> list[str]:
    out = []
    losses = results["warm_sidecar_invalidation_channel_losses"]
    for name, field in (("warm", "redis_gets_per_check"), ("envoy_sidecar", "redis_gets_per_request")):
        if results[name][field] > 0.05:
            out.append(f"{name}: the warm sidecar read Redis {results[name][field]:.2f} times per check: its cache "
                       f"was not holding (its invalidation channel was lost {losses['count']} times in "
                       f"{losses['uptime_s']:.0f} s; each loss empties the cache)")
    if results["memory_pass"]["unavailable"]:
        out.append(f"memory pass: {results['memory_pass']['unavailable']} checks were answered 'unavailable' "
                   f"(a Redis read slower than redis_timeout_ms, then the fail-fast window); asked again")
    if "invalid" in results["targets"]["sidecar_rss_mb_100k_keys"]:
        out.append("sidecar_rss_mb_100k_keys: " + results["targets"]["sidecar_rss_mb_100k_keys"]["invalid"])
    share = results["envoy_sidecar"]["denied_share"] - results["envoy_sidecar"]["expected_denied_share"]
    if abs(share) > 0.01:
        out.append(f"envoy_sidecar: denied share {results['envoy_sidecar']['denied_share']:.1%}, the population "
                   f"says {results['envoy_sidecar']['expected_denied_share']:.1%}")
    cal = results["machine_calibration_ms"]
    if cal["max"] > 1.3 * cal["min"]:
        out.append(f"the machine's speed varied during the run (a fixed loop took {cal['min']}-{cal['max']} ms): "
                   f"other load on the host; the ratios, measured in alternation, are steadier than the rates")
    return out


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    for tool in ("h2load", "wrk"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed: run scripts/ensure-bench-tools", file=sys.stderr)
            return 2
    # SIGTERM ends the run like an error does: the finally below stops every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    (BENCH / "raw").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=BENCH / "raw"))
    started = time.monotonic()
    procs: list[Proc] = []
    ok = False
    try:
        results = run(workdir, procs)
        results["run_seconds"] = round(time.monotonic() - started, 1)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print()
        print(table(results))
        print()
        print(f"sidecar RSS after a check for each of the {N_KEYS:,} keys: {results['sidecar_rss_mb_100k_keys']} MiB "
              f"(before: {results['sidecar_rss_mb_before_100k_keys']}; every key cached, estimated: "
              f"{results['sidecar_rss_mb_100k_keys_estimate']['mb']})")
        for name, t in results["targets"].items():
            print(f"target {name}: {t['value']} (limit {t['limit']}) {'PASS' if t['pass'] else 'MISS'}")
        for w in results["warnings"]:
            print(f"WARNING {w}")
        print(f"\n{results['note']}\nwrote {args.out} in {results['run_seconds']} s")
        ok = True
        return 1 if args.strict and not all(t["pass"] for t in results["targets"].values()) else 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: logs and configs in {workdir}", file=sys.stderr)


def run(workdir: Path, procs: list[Proc]) -> dict[str, Any]:
    def started(proc: Proc) -> Proc:
        procs.append(proc)
        return proc

    def sidecar(name: str, env: dict[str, str]) -> Sidecar:
        # Every listening port of its own, on loopback.
        side = start_sidecar(workdir, cfg_path, redis_url, {"EXTAUTHZ_METRICS_HOST": "127.0.0.1", **env})
        procs.append(side.proc)
        return side

    calibration = [calibrate()]
    results: dict[str, Any] = {"cpu_count": os.cpu_count()}

    step(f"redis-server, {N_KEYS:,} keys and {N_TEAMS:,} teams")
    redis_proc, redis_port = start_redis(workdir)
    started(redis_proc)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    r = redis.Redis(port=redis_port)
    populate_s = populate(r)

    cfg_path = bench_config(workdir, free_port())
    cfg = config_module.load(str(cfg_path))
    rounds = h2_rounds(REPS)
    files: list[list[Path]] = []
    for i, probes in enumerate(rounds):
        files.append([])
        for j, p in enumerate(probes):
            path = workdir / f"body-r{i}-{j}.bin"
            path.write_bytes(grpc_frame(p.request().SerializeToString()))
            files[-1].append(path)
    all_probes = [p for probes in rounds for p in probes]
    h2logs = workdir / "h2load"
    h2logs.mkdir()

    step("no-op server (floor); sidecar with a warm cache; sidecar without a cache")
    noop_port = free_port()
    noop = started(Proc("noop server", [sys.executable, "-m", "bench.noop_server", "--port", str(noop_port)],
                        workdir / "noop.log").start())
    noop.wait_ready(lambda: grpc_ready(noop_port))
    warm = sidecar("warm", WARM_ENV)
    warm_started = time.monotonic()
    # The cache serves only once Redis tracking is on (invalidation.py): wait for that client.
    warm.proc.wait_ready(lambda: any(int(c.get("redir", -1)) > 0 for c in r.client_list()))
    cold = sidecar("cold", COLD_ENV)
    verify(noop_port, all_probes, decisions=False)
    verify(cold.grpc_port, all_probes, decisions=True)
    verify(warm.grpc_port, all_probes, decisions=True)     # also the warm-up pass: every key once

    step(f"h2load: {REPS} x (floor, warm, cold), {ROUND_S:g} s each, {H2_PROCS} h2load x {H2_STREAMS} streams")
    servers = {"floor": (noop_port, noop.pid), "warm": (warm.grpc_port, warm.proc.pid),
               "cold": (cold.grpc_port, cold.proc.pid)}
    results.update(grpc_phase(servers, files, h2logs, r, redis_proc.pid, calibration))
    cold.proc.stop()

    step(f"sidecar memory: one check for each of the {N_KEYS:,} keys")
    rss_before = rss_mb(warm.proc.pid)
    every = asyncio.run(check_every_key(warm.grpc_port, N_KEYS, MEMORY_CONCURRENCY))
    if every["wrong"] or every["still_unavailable"]:
        raise RuntimeError(f"of the {N_KEYS} key checks, {every['wrong']} had the wrong answer and "
                           f"{every['still_unavailable']} stayed unavailable")
    results["sidecar_rss_mb_100k_keys"] = round(rss_mb(warm.proc.pid), 1)
    results["sidecar_rss_mb_before_100k_keys"] = round(rss_before, 1)
    every["cache_stats"] = cache_stats(warm.admin_port)
    # Does the figure show what it claims? A cache holding every key answers a sample of
    # them again without reading Redis.
    every["cache_hit_share_after"] = cache_hit_share(warm.grpc_port, r)
    results["memory_pass"] = every
    estimate = record_memory_estimate()
    results["sidecar_rss_mb_100k_keys_estimate"] = {
        "mb": round(rss_before + estimate["mb"], 1),
        "how": f"RSS before the pass ({rss_before:.1f}) + {estimate['mb']} MiB for {estimate['records']:,} "
               f"records built with extauthz.records.record in an OrderedDict, in a separate process"}

    step("three Envoys: direct, ext_authz to the no-op server, ext_authz to the sidecar")
    cases = []
    sample = [rounds[0][0], rounds[0][6], rounds[0][9], rounds[0][10], rounds[0][11]]
    for kind, authz_port, authz_pid in (("direct", noop_port, None), ("noop", noop_port, noop.pid),
                                        ("sidecar", warm.grpc_port, warm.proc.pid)):
        listen, admin = free_port(), free_port()
        boot = bootstrap(kind, cfg, listen, admin, authz_port, warm.admin_port, free_port())
        proc = started(start_envoy(workdir, kind, boot, admin))
        verify_envoy(listen, sample, decisions=kind == "sidecar")
        cases.append(EnvoyCase(f"envoy_{kind}", proc, listen, authz_pid, kind == "sidecar"))
    step(f"wrk: {WRK_REPS} x (direct, noop, sidecar), {WRK_S} s each, 1 thread x {WRK_CONNECTIONS} connections")
    results.update(envoy_phase(cases, r, calibration))
    for case in cases:
        case.proc.stop()
        _trim(case.proc.log)

    results["warm_sidecar_cache_stats_at_end"] = cache_stats(warm.admin_port)
    uptime = time.monotonic() - warm_started
    warm.proc.stop()
    log_text = warm.proc.log.read_text(errors="replace")
    results["warm_sidecar_invalidation_channel_losses"] = {
        "count": log_text.count("invalidation channel lost"), "uptime_s": round(uptime, 1),
        "store_unavailable_log_lines": log_text.count("store unavailable")}
    calibration.append(calibrate())
    results["machine_calibration_ms"] = {"min": min(calibration), "median": statistics.median(calibration),
                                         "max": max(calibration), "all": calibration}

    results["targets"] = targets(results)
    results["warnings"] = warnings(results)
    denied = sum(not p.allowed for p in all_probes) / len(all_probes)
    results["setup"] = {
        "populate_seconds": round(populate_s, 1), "keys": N_KEYS, "teams": N_TEAMS,
        "grpc_load": {"tool": "h2load", "processes_per_round": H2_PROCS, "streams_per_process": H2_STREAMS,
                      "repetitions": REPS, "round_seconds": ROUND_S, "distinct_keys": len(all_probes),
                      "denied_share": round(denied, 3), "round": [f"{p.label}: {p.key} {p.model}" for p in rounds[0]]},
        "envoy_load": {"tool": "wrk", "threads": 1, "connections": WRK_CONNECTIONS, "repetitions": WRK_REPS,
                       "run_seconds": WRK_S, "script": "bench/mix.lua", "envoy_concurrency": 1,
                       "envoy_noop_filters": "as rendered (decompressor, ext_authz, lua splice, router), fixed route",
                       "envoy_direct_filters": "decompressor, router, fixed route",
                       "envoy_sidecar_filters": "the rendered bootstrap as it is",
                       "all": "listener bound to 127.0.0.1; the upstream cluster (its rendered name) pointed at a "
                              "second listener of the same Envoy answering direct_response 200"},
        "warm_sidecar_env": WARM_ENV,
        "cold_sidecar_env": COLD_ENV,
        "rss_unit": "MiB (VmRSS kB / 1024)",
        "latency": "gRPC rows: nearest-rank percentiles of every request's duration in the h2load logs; "
                   "Envoy rows: median over the wrk runs of wrk's percentiles",
    }
    results["note"] = (
        f"{os.cpu_count()} cores shared by everything: Envoy --concurrency 1, wrk 1 thread, one authorization "
        f"process, redis-server and the load generators. gRPC rows: h2load {H2_PROCS} processes x {H2_STREAMS} "
        f"streams, {REPS} rounds x {ROUND_S:g} s per server in alternation, {denied:.0%} denied. Envoy rows: wrk "
        f"{WRK_CONNECTIONS} connections, {WRK_REPS} runs x {WRK_S} s per Envoy in alternation, bench/mix.lua "
        f"({results['envoy_sidecar']['denied_share']:.0%} denied). 'x floor': against the no-op server "
        f"(Envoy rows: against Envoy + no-op server).")
    return results


def _trim(log: Path, keep: int = 64 * 1024) -> None:
    """Envoy's access log is one line per request: keep its tail only."""
    try:
        size = log.stat().st_size
        if size > keep:
            with open(log, "rb") as f:
                f.seek(size - keep)
                tail = f.read()
            log.write_bytes(tail)
    except OSError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
