"""Load through Envoy: the bootstraps (direct, no-op, sidecar), wrk with mix.lua."""

from __future__ import annotations

import copy
import json
import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from extauthz import config as config_module
from extauthz.domain import providers
from extauthz.envoy.render import EXT_AUTHZ_FILTER, SPLICE_FILTER, render
from tests.harness import BIN, Proc, http, http_ok
from bench.shape import GROUP, MASTER_KEY, MIX_LUA, MODEL_A, MODEL_B, N_KEYS, WRK_CONNECTIONS, WRK_REPS, WRK_S, WRK_WARMUP_S
from bench.population import Probe, chat_body, lua_mix
from bench.measure import Window, calibrate, rotated

# == Envoy ======================================================================================

def bench_config(workdir: Path, upstream_port: int) -> Path:
    base = f"http://127.0.0.1:{upstream_port}/v1"
    doc = {
        "model_list": [
            {"model_name": MODEL_A, "litellm_params": {"model": f"openai/{MODEL_A}", "api_base": base,
                                                     "api_key": "sk-upstream-bench-a",
                                                     # priced: a settled response adds to spend
                                                     "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06},
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
    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 31, "completion_tokens": 12, "total_tokens": 43}}, separators=(",", ":"))
# A streamed answer as OpenAI sends it with stream_options.include_usage: chunks, then usage.
_CHUNK = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench"}
UPSTREAM_STREAM = "".join(f"data: {json.dumps(c, separators=(',', ':'))}\n\n" for c in (
    *({**_CHUNK, "choices": [{"index": 0, "delta": {"content": w}}], "usage": None} for w in ("o", "k", ".")),
    {**_CHUNK, "choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 12, "total_tokens": 43}})) \
    + "data: [DONE]\n\n"
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
            "routes": [{"match": {"prefix": "/", "headers": [{"name": "x-bench-stream", "present_match": True}]},
                        "direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_STREAM}},
                        "response_headers_to_add": [{"header": {"key": "content-type",
                                                                "value": "text/event-stream"}}]},
                       {"match": {"prefix": "/"},
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
    stream: bool = False   # streamed calls (mix.lua's third argument)


def start_envoy(workdir: Path, name: str, boot: dict[str, Any], admin_port: int) -> Proc:
    path = workdir / f"envoy-{name}.yaml"
    path.write_text(yaml.safe_dump(boot, sort_keys=False))
    proc = Proc(f"envoy ({name})", [str(BIN / "envoy"), "-c", str(path), "--disable-hot-restart",
                                     "--concurrency", "1", "--log-level", "warn"], workdir / f"envoy-{name}.log")
    proc.start()
    proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{admin_port}/ready"))
    return proc


def verify_envoy(port: int, probes: list[Probe], decisions: bool, stream: bool = False) -> None:
    for p in probes:
        body = chat_body(p.model, "1")
        headers = {"Authorization": f"Bearer {p.key}", "Content-Type": "application/json"}
        if stream:
            body = body[:-1] + b',"stream":true}'
            headers["x-bench-stream"] = "1"
        resp = http("POST", f"http://127.0.0.1:{port}/v1/chat/completions", raw=body, headers=headers)
        want = p.allowed if decisions else True
        ok = resp.status == 200 and "chatcmpl-bench" in resp.text and ("data: [DONE]" in resp.text) == stream
        if ok != want:
            raise RuntimeError(f"through Envoy, {p.label} ({p.key}, {p.model}): expected "
                               f"{'200 from the upstream' if want else 'a deny'}, got {resp.status} {resp.text[:300]}")


WRK_LATENCY = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk(port: int, seconds: int, start: int, stream: bool = False) -> dict[str, Any]:
    """wrk with mix.lua from request number ``start`` on."""
    args = ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--latency", "-s", str(MIX_LUA),
            f"http://127.0.0.1:{port}", "--", str(N_KEYS), str(start), *(["stream"] if stream else [])]
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
        wrk(case.port, WRK_WARMUP_S, 0, case.stream)
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
                res = wrk(case.port, WRK_S, start, case.stream)
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
